"""Who may do what: the admin roles, the permissions each holds, and the scopes of keys.

Admin keys have one of three roles:
- `admin`: everything, for every tenant, including creating admin keys (role changes);
- `operator`: tenant keys, budgets, flags and cache invalidation — for the tenants it is scoped to;
- `viewer`: read-only usage, recommendations, the audit log and health — for its tenants.
A tenant key may be limited to models (ids or shell-style patterns) and to endpoints. Anything outside a
scope is PERMISSION_DENIED with a message saying what is missing — never UNAUTHENTICATED, which means
the key itself is not valid.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass

from libs.errors import PermissionDenied, shown


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Endpoint(enum.StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"


class Permission(enum.StrEnum):
    """Admin actions, named as the audit log records them."""

    MANAGE_ADMIN_KEYS = "manage_admin_keys"
    MANAGE_KEYS = "manage_keys"
    SET_BUDGET = "set_budget"
    INVALIDATE_CACHE = "invalidate_cache"
    RELOAD_CONFIG = "reload_config"
    READ_KEYS = "read_keys"
    READ_USAGE = "read_usage"
    READ_AUDIT = "read_audit"


_GRANTS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset(
        {
            Permission.MANAGE_KEYS,
            Permission.SET_BUDGET,
            Permission.INVALIDATE_CACHE,
            Permission.RELOAD_CONFIG,
            Permission.READ_KEYS,
            Permission.READ_USAGE,
            Permission.READ_AUDIT,
        }
    ),
    Role.VIEWER: frozenset({Permission.READ_USAGE, Permission.READ_AUDIT}),
}


def roles_granting(permission: Permission) -> list[str]:
    return [role.value for role, granted in _GRANTS.items() if permission in granted]


@dataclass(frozen=True)
class AdminPrincipal:
    """An authenticated admin key: its id (what the audit log names, never the secret), role and scope."""

    key_id: str
    role: Role
    tenants: tuple[str, ...] = ()  # empty: every tenant

    def may(self, permission: Permission, tenant_id: str = "") -> bool:
        if permission not in _GRANTS[self.role]:
            return False
        return not tenant_id or not self.tenants or tenant_id in self.tenants

    def require(self, permission: Permission, tenant_id: str = "") -> None:
        if permission not in _GRANTS[self.role]:
            raise PermissionDenied(
                f"key {self.key_id} has role {self.role.value}; {permission.value} needs "
                f"{' or '.join(roles_granting(permission))}"
            )
        if tenant_id and self.tenants and tenant_id not in self.tenants:
            raise PermissionDenied(
                f"key {self.key_id} is scoped to tenants {', '.join(self.tenants)}; not {shown(tenant_id)}"
            )

    def require_all_tenants(self, permission: Permission) -> None:
        """For actions that span tenants (e.g. listing every tenant's keys)."""
        self.require(permission)
        if self.tenants:
            raise PermissionDenied(
                f"key {self.key_id} is scoped to tenants {', '.join(self.tenants)}; name one of them"
            )


@dataclass(frozen=True)
class KeyScope:
    """What a tenant key may reach; empty tuples mean everything."""

    models: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    def allows_model(self, model_id: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model_id, pattern) for pattern in self.models)

    def require_model(self, key_id: str, model_id: str) -> None:
        if not self.allows_model(model_id):
            raise PermissionDenied(
                f"key {key_id} may use only the models {', '.join(self.models)}; not {shown(model_id)}"
            )

    def require_endpoint(self, key_id: str, endpoint: Endpoint) -> None:
        if self.endpoints and endpoint not in self.endpoints:
            allowed = ", ".join(e.value for e in self.endpoints)
            raise PermissionDenied(f"key {key_id} may call only {allowed}; not {endpoint.value}")
