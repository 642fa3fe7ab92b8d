"""API keys → tenants. Keys are held as SHA-256 digests only; the plaintext is dropped after start-up.

Two kinds of key exist: keys written in the config file (read-only, held in memory by `KeyRing`) and
keys created through the admin API (stored in Redis by `services.gateway.access.key_store`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from libs.config import AuthConfig
from libs.errors import PermissionDenied, Unauthenticated
from libs.logs import register_secret
from services.gateway.domain import Principal

CONFIG_KEY_PREFIX = "cfg-"


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


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key, never the key itself."""

    key_id: str
    tenant_id: str
    name: str
    requests_per_minute: int  # 0 = unlimited
    tokens_per_minute: int  # 0 = unlimited
    created: int  # Unix seconds; 0 for keys from the config file
    revoked: bool = False

    @property
    def principal(self) -> Principal:
        return Principal(
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


class KeyRing:
    """The keys of the config file and the admin key, checked in memory."""

    def __init__(self, config: AuthConfig) -> None:
        self._keys: dict[str, ApiKey] = {}
        for tenant_id, tenant in config.tenants.items():
            for key in tenant.api_keys:
                register_secret(key.key)
                self._keys[key_digest(key.key)] = ApiKey(
                    key_id=f"{CONFIG_KEY_PREFIX}{tenant_id}-{key.name}",
                    tenant_id=tenant_id,
                    name=key.name,
                    requests_per_minute=key.requests_per_minute,
                    tokens_per_minute=key.tokens_per_minute,
                    created=0,
                )
        register_secret(config.admin_key)
        self._admin_digest = key_digest(config.admin_key) if config.admin_key else ""

    def find(self, digest: str) -> Principal | None:
        key = self._keys.get(digest)
        return key.principal if key is not None else None

    def keys(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda key: key.key_id)

    def owns(self, key_id: str) -> bool:
        return any(key.key_id == key_id for key in self._keys.values())

    def authenticate_admin(self, token: str) -> None:
        if not self._admin_digest:
            raise PermissionDenied("the admin API is disabled: set SOPHIA_ADMIN_KEY to enable it")
        if not token:
            raise Unauthenticated("missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(key_digest(token), self._admin_digest):
            raise Unauthenticated("invalid admin key")
