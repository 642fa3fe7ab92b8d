"""One admin RPC as an audited action: authenticate the admin key, check its role and tenants, run, and
write one audit entry saying who did what to what, and how it ended.

    async with actions.begin(context, "revoke_key", target=key_id) as action:
        admin = await action.admin()                      # UNAUTHENTICATED / PERMISSION_DENIED, audited
        await action.require(Permission.MANAGE_KEYS, key.tenant_id)   # PERMISSION_DENIED, audited
        ...                                               # an error → outcome "failed"; else "ok"

Refused attempts are always recorded; reads (`audit_success=False`) are recorded only when refused, so
the log holds every change and every refusal without one line per dashboard refresh.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from libs.errors import PermissionDenied, ServiceError, Unauthenticated
from libs.logs import request_id_var
from services.gateway.access.api_keys import bearer_token, key_digest
from services.gateway.access.audit import AuditEntry, AuditLog, AuditOutcome
from services.gateway.access.control import AccessControl
from services.gateway.access.roles import AdminPrincipal, Permission

# How many hex digits of an unauthenticated key's SHA-256 the audit log keeps: enough to tell repeated
# attempts with the same key apart, far too few to help guess it.
PRESENTED_DIGEST_CHARS = 12


@dataclass
class AdminAction:
    _access: AccessControl
    _metadata: tuple
    action: str
    tenant_id: str = ""
    target: str = ""
    principal: AdminPrincipal | None = None
    refused: bool = False

    def _actor(self) -> str:
        if self.principal is not None:
            return self.principal.key_id
        token = bearer_token(self._metadata)
        return f"digest:{key_digest(token)[:PRESENTED_DIGEST_CHARS]}" if token else "none"

    async def admin(self) -> AdminPrincipal:
        try:
            self.principal = await self._access.authenticate_admin(self._metadata)
        except (Unauthenticated, PermissionDenied):
            self.refused = True
            raise
        return self.principal

    async def require(self, permission: Permission, tenant_id: str = "") -> None:
        assert self.principal is not None, "admin() first"
        if tenant_id:
            self.tenant_id = tenant_id
        try:
            self.principal.require(permission, tenant_id)
        except PermissionDenied:
            self.refused = True
            raise

    def entry(self, outcome: AuditOutcome, detail: str = "") -> AuditEntry:
        return AuditEntry(
            at=time.time(),
            actor=self._actor(),
            role=self.principal.role.value if self.principal else "",
            action=self.action,
            tenant_id=self.tenant_id,
            target=self.target,
            outcome=outcome,
            request_id=request_id_var.get(),
            detail=detail,
        )


class AdminActions:
    def __init__(self, access: AccessControl, audit: AuditLog) -> None:
        self._access = access
        self._audit = audit

    @asynccontextmanager
    async def begin(
        self, context, action: str, *, tenant_id: str = "", target: str = "", audit_success: bool = True
    ) -> AsyncIterator[AdminAction]:
        step = AdminAction(
            self._access, tuple(context.invocation_metadata() or ()), action, tenant_id, target
        )
        try:
            yield step
        except ServiceError as error:
            if step.refused or audit_success:
                outcome = AuditOutcome.DENIED if step.refused else AuditOutcome.FAILED
                await self._audit.record(step.entry(outcome, error.message))
            raise
        if audit_success:
            await self._audit.record(step.entry(AuditOutcome.OK))
