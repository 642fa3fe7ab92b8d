"""One admin RPC as an audited action: authenticate the admin key, check its role and tenants, run, and
write one audit entry saying who did what to what, and how it ended.

    async with actions.begin(context, "revoke_key", target=key_id) as action:
        admin = await action.admin()                      # UNAUTHENTICATED / PERMISSION_DENIED, audited
        await action.require(Permission.MANAGE_KEYS, key.tenant_id)   # PERMISSION_DENIED, audited
        ...                                               # an error → outcome "failed"; else "ok"

Refused attempts are recorded; reads (`audit_success=False`) are recorded only when refused, so the log
holds every change and every refusal without one line per dashboard refresh. What a caller wrote goes in
cut to MAX_FIELD_CHARS, and attempts without a valid admin key are recorded at most REFUSALS_PER_SECOND a
second (after a burst of REFUSAL_BURST), each saying how many were left out before it: anyone can make
them, and the log is trimmed to `auth.audit.max_entries`, so unthrottled they would push every real
entry out of it. An action that ends in an unexpected error is recorded as failed.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

# How many hex digits of an unauthenticated key's SHA-256 the audit log keeps: enough to tell repeated
# attempts with the same key apart, far too few to help guess it.
PRESENTED_DIGEST_CHARS = 12
# The most of a caller's own text (tenant, target, a message quoting it) one entry keeps.
MAX_FIELD_CHARS = 200
REFUSALS_PER_SECOND = 1.0
REFUSAL_BURST = 30


def _clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"


class _RefusalThrottle:
    """A token bucket over the entries of attempts without a valid admin key (per replica)."""

    def __init__(self, rate: float = REFUSALS_PER_SECOND, burst: int = REFUSAL_BURST) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.left_out = 0  # refused attempts not recorded since the last one that was

    def allows(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            self.left_out += 1
            return False
        self._tokens -= 1
        return True


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

    async def require_all_tenants(self, permission: Permission) -> None:
        """For actions over every tenant (e.g. the whole audit log): a key scoped to tenants is refused."""
        assert self.principal is not None, "admin() first"
        try:
            self.principal.require_all_tenants(permission)
        except PermissionDenied:
            self.refused = True
            raise

    def entry(self, outcome: AuditOutcome, detail: str = "") -> AuditEntry:
        return AuditEntry(
            at=time.time(),
            actor=self._actor(),
            role=self.principal.role.value if self.principal else "",
            action=self.action,
            tenant_id=_clip(self.tenant_id),
            target=_clip(self.target),
            outcome=outcome,
            request_id=request_id_var.get(),
            detail=_clip(detail),
        )


class AdminActions:
    def __init__(self, access: AccessControl, audit: AuditLog) -> None:
        self._access = access
        self._audit = audit
        self._refusals = _RefusalThrottle()

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
            if step.refused:
                await self._record_refusal(step, error.message)
            elif audit_success:
                await self._audit.record(step.entry(AuditOutcome.FAILED, error.message))
            raise
        except Exception as error:  # a bug, not the caller: still on record (the caller sees INTERNAL)
            detail = f"internal error ({type(error).__name__})"
            await self._audit.record(step.entry(AuditOutcome.FAILED, detail))
            raise
        if audit_success:
            await self._audit.record(step.entry(AuditOutcome.OK))

    async def _record_refusal(self, step: AdminAction, message: str) -> None:
        if step.principal is not None:  # a valid admin key, refused by its role or tenants
            await self._audit.record(step.entry(AuditOutcome.DENIED, message))
            return
        if not self._refusals.allows():
            return
        left_out, self._refusals.left_out = self._refusals.left_out, 0
        if left_out:  # said first: a long message is cut at its end
            message = f"after {left_out} unrecorded attempts without a valid admin key: {message}"
        await self._audit.record(step.entry(AuditOutcome.DENIED, message))
