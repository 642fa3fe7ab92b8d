"""Who may call, and how much: API-key authentication and per-key limits, in front of every RPC."""

from __future__ import annotations

from collections.abc import Iterable

from services.gateway.auth import KeyRing, bearer_token
from services.gateway.domain import Principal


class AccessControl:
    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        return self._keys.authenticate(bearer_token(metadata))

    async def authenticate_admin(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self._keys.authenticate_admin(bearer_token(metadata))

    async def admit(self, principal: Principal, estimated_tokens: int) -> None:
        """Counts one request against the key's limits; raises ResourceExhausted when over them."""

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Adds the tokens a finished request really used to the key's tokens-per-minute window."""
