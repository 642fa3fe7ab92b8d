"""API keys → tenants. Keys are held as SHA-256 digests only; the plaintext is dropped after start-up."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from libs.config import AuthConfig
from libs.errors import PermissionDenied, Unauthenticated
from libs.logs import register_secret
from services.gateway.domain import Principal


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The key from `authorization: Bearer <key>`; empty when absent."""
    for name, value in metadata:
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self._principals: dict[str, Principal] = {}
        for tenant_id, tenant in config.tenants.items():
            for key in tenant.api_keys:
                register_secret(key.key)
                digest = key_digest(key.key)
                self._principals[digest] = Principal(
                    tenant_id=tenant_id,
                    key_id=f"cfg-{tenant_id}-{key.name}",
                    requests_per_minute=key.requests_per_minute,
                    tokens_per_minute=key.tokens_per_minute,
                )
        register_secret(config.admin_key)
        self._admin_digest = key_digest(config.admin_key) if config.admin_key else ""

    def authenticate(self, token: str) -> Principal:
        if not token:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        principal = self._principals.get(key_digest(token))
        if principal is None:
            raise Unauthenticated("invalid API key")
        return principal

    def authenticate_admin(self, token: str) -> None:
        if not self._admin_digest:
            raise PermissionDenied("the admin API is disabled: set SOPHIA_ADMIN_KEY to enable it")
        if not token:
            raise Unauthenticated("missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(key_digest(token), self._admin_digest):
            raise Unauthenticated("invalid admin key")
