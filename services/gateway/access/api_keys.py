"""API keys → tenants (or admin roles). Keys are held as SHA-256 digests only; the plaintext is dropped
after start-up.

Two kinds of key exist: keys written in the config file (read-only, held in memory by `KeyRing`) and
keys created through the admin API (stored in Redis by `services.gateway.access.key_store`). Either kind
is a tenant key (calls the data plane, possibly scoped to models and endpoints) or an admin key (calls
the admin API with a role, possibly scoped to tenants).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from libs.config import AuthConfig
from libs.logs import register_secret
from services.gateway.access.roles import AdminPrincipal, Endpoint, KeyScope, Role
from services.gateway.domain import Principal

CONFIG_KEY_PREFIX = "cfg-"
BOOTSTRAP_ADMIN_KEY_ID = f"{CONFIG_KEY_PREFIX}admin"


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
    tenant_id: str  # "" for an admin key
    name: str
    requests_per_minute: int  # 0 = unlimited
    tokens_per_minute: int  # 0 = unlimited
    created: int  # Unix seconds; 0 for keys from the config file
    revoked: bool = False
    role: Role | None = None  # None: a tenant key
    tenants: tuple[str, ...] = ()  # an admin key's tenants; empty: all
    scope: KeyScope = field(default_factory=KeyScope)
    expires_at: int = 0  # Unix seconds; 0: never
    rotated_at: int = 0  # Unix seconds of the last rotation; 0: never rotated
    last_used: int = 0  # Unix seconds, to the minute; 0: not used yet

    @property
    def from_config(self) -> bool:
        return self.key_id.startswith(CONFIG_KEY_PREFIX)

    @property
    def principal(self) -> Principal:
        return Principal(
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            scope=self.scope,
        )

    @property
    def admin(self) -> AdminPrincipal:
        assert self.role is not None
        return AdminPrincipal(self.key_id, self.role, self.tenants)


class KeyRing:
    """The keys of the config file (tenant keys and admin keys), checked in memory."""

    def __init__(self, config: AuthConfig) -> None:
        self._keys: dict[str, ApiKey] = {}
        for tenant_id, tenant in config.tenants.items():
            for key in tenant.api_keys:
                self._add(
                    key.key,
                    ApiKey(
                        key_id=f"{CONFIG_KEY_PREFIX}{tenant_id}-{key.name}",
                        tenant_id=tenant_id,
                        name=key.name,
                        requests_per_minute=key.requests_per_minute,
                        tokens_per_minute=key.tokens_per_minute,
                        created=0,
                        scope=KeyScope(tuple(key.models), tuple(Endpoint(e) for e in key.endpoints)),
                    ),
                )
        if config.admin_key:
            self._add(config.admin_key, _admin_key(BOOTSTRAP_ADMIN_KEY_ID, "bootstrap", Role.ADMIN, ()))
        for admin in config.admin_keys:
            key_id = f"{CONFIG_KEY_PREFIX}admin-{admin.name}"
            self._add(admin.key, _admin_key(key_id, admin.name, Role(admin.role), tuple(admin.tenants)))

    def _add(self, secret: str, key: ApiKey) -> None:
        register_secret(secret)
        self._keys[key_digest(secret)] = key

    @property
    def admin_enabled(self) -> bool:
        return any(key.role is not None for key in self._keys.values())

    def find(self, digest: str) -> ApiKey | None:
        return self._keys.get(digest)

    def keys(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda key: key.key_id)

    def owns(self, key_id: str) -> bool:
        return any(key.key_id == key_id for key in self._keys.values())


def _admin_key(key_id: str, name: str, role: Role, tenants: tuple[str, ...]) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        tenant_id="",
        name=name,
        requests_per_minute=0,
        tokens_per_minute=0,
        created=0,
        role=role,
        tenants=tenants,
    )
