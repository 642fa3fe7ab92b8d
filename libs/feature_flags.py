"""Feature flags from a YAML file: per model and per feature, rolled out to a share of tenants.

File format (config/flags.yaml):

    models:                      # a model whose flag is off for a tenant is never routed to it
      gpt-4o:
        enabled: true            # false: off for everyone, whatever the rest says
        rollout_percentage: 25   # share of tenants that get it, 0-100
        tenant_overrides:        # tenant id or tenant tier -> percentage (100 = on, 0 = off)
          acme: 100
          free: 0
    features:                    # the Gateway's own features
      semantic_caching: {enabled: true, rollout_percentage: 100}

A flag not in the file is on (models) or off (features): listing a model restricts it, listing nothing
leaves routing as configured; a feature exists only once someone turns it on.

Rollout is deterministic per tenant: a tenant's bucket (0-99.99) is a hash of the flag's name and the
tenant id, so the same tenant is always in or out of a given flag, each flag picks its own tenants, and
raising the percentage only adds tenants. A tenant id override wins over a tier override, both over the
percentage.

Written by hand rather than with OpenFeature's flagd provider: this format is not flagd's (it would
need compiling to JSON Logic with `fractional`), refusing a bad file with the old flags kept needs our
own validation before anything is handed over anyway, and an evaluation is one dict lookup and one hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

BUCKETS = 10_000  # buckets of 0.01 %
WATCH_INTERVAL_SECONDS = 1.0


class FlagError(Exception):
    """The flag file is unusable; the message names the file, the key and the problem."""


class FlagKind(StrEnum):
    MODEL = "models"
    FEATURE = "features"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Flag(_Strict):
    enabled: bool = True
    rollout_percentage: float = Field(default=100.0, ge=0, le=100)
    tenant_overrides: dict[str, float] = {}

    def model_post_init(self, _context) -> None:
        for key, percentage in self.tenant_overrides.items():
            if not key:
                raise ValueError("tenant_overrides: a key must not be empty")
            if not 0 <= percentage <= 100:
                raise ValueError(f"tenant_overrides.{key}: must be between 0 and 100, got {percentage}")


class FlagFile(_Strict):
    models: dict[str, Flag] = {}
    features: dict[str, Flag] = {}


def bucket(flag_name: str, tenant_id: str) -> int:
    """The tenant's fixed place (0 .. BUCKETS-1) for this flag."""
    digest = hashlib.sha256(f"{flag_name}\x1f{tenant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def _on_for(name: str, flag: Flag, tenant_id: str, tier: str | None) -> bool:
    if not flag.enabled:
        return False
    percentage = flag.tenant_overrides.get(tenant_id)
    if percentage is None and tier:
        percentage = flag.tenant_overrides.get(tier)
    if percentage is None:
        percentage = flag.rollout_percentage
    return bucket(name, tenant_id) < percentage * BUCKETS / 100


@dataclass(frozen=True)
class FlagSet:
    """One validated flag file; replaced whole on reload, never mutated."""

    flags: FlagFile
    source: str = ""

    def model_enabled(self, model_id: str, tenant_id: str, tier: str | None = None) -> bool:
        flag = self.flags.models.get(model_id)
        return flag is None or _on_for(f"models.{model_id}", flag, tenant_id, tier)

    def enabled(self, feature: str, tenant_id: str, tier: str | None = None) -> bool:
        flag = self.flags.features.get(feature)
        return flag is not None and _on_for(f"features.{feature}", flag, tenant_id, tier)

    def describe(self) -> str:
        return f"{len(self.flags.models)} model flags, {len(self.flags.features)} feature flags"


EMPTY = FlagSet(FlagFile())


def parse_flags(text: str, source: str = "flags") -> FlagSet:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FlagError(f"{source}: invalid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FlagError(f"{source}: the top level must be a mapping with `models` and/or `features`")
    try:
        return FlagSet(FlagFile.model_validate(raw), source)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            location = ".".join(str(part) for part in item["loc"]) or "(top level)"
            problems.append(f"{location}: {item['msg'].removeprefix('Value error, ')}")
        raise FlagError(f"{source}: {'; '.join(problems)}") from None


def load_flags(path: str | os.PathLike[str]) -> FlagSet:
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise FlagError(f"cannot read flag file {path}: {exc.strerror}") from None
    return parse_flags(text, str(path))


class FileWatch:
    """Polls a file's size and modification time; `changed()` says whether it differs since last asked.

    Polling (one stat a second) needs no extra dependency and sees edits through symlinks and
    ConfigMap-style atomic renames alike."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def changed(self) -> bool:
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        return True


class FeatureFlags:
    """The flags in force, reloaded when the file changes; a bad file is refused and the old flags stay.

    Per request: `flags.enabled("semantic_caching", tenant_id)` or `flags.model_enabled(model, tenant)`;
    a tenant's tier (`tiers`, from `auth.tenants.<id>.tier`) is looked up here unless one is given.
    """

    def __init__(self, path: str | os.PathLike[str] | None, tiers: Mapping[str, str] | None = None) -> None:
        self._tiers = dict(tiers or {})
        self.path = pathlib.Path(path) if path else None
        self.current = load_flags(self.path) if self.path else EMPTY
        self._watch = FileWatch(self.path) if self.path else None
        self._task: asyncio.Task | None = None
        self.last_error = ""

    def tier_of(self, tenant_id: str) -> str:
        return self._tiers.get(tenant_id, "")

    def enabled(self, feature: str, tenant_id: str, tier: str | None = None) -> bool:
        return self.current.enabled(feature, tenant_id, tier or self.tier_of(tenant_id))

    def model_enabled(self, model_id: str, tenant_id: str, tier: str | None = None) -> bool:
        return self.current.model_enabled(model_id, tenant_id, tier or self.tier_of(tenant_id))

    def reload(self) -> FlagSet:
        """Reads the file again; raises FlagError (the flags in force stay) when it is not valid."""
        if self.path is None:
            return self.current
        try:
            self.current = load_flags(self.path)
        except FlagError as exc:
            self.last_error = str(exc)
            raise
        self.last_error = ""
        return self.current

    def start_watching(
        self,
        interval_seconds: float = WATCH_INTERVAL_SECONDS,
        on_reload: Callable[[FlagSet], None] | None = None,
    ) -> None:
        if self._watch is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._poll(interval_seconds, on_reload))

    async def _poll(self, interval_seconds: float, on_reload) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            if not self._watch.changed():
                continue
            try:
                flags = await asyncio.to_thread(self.reload)
            except FlagError as exc:
                log.error("flag file refused, the flags in force stay: %s", exc)
                continue
            log.info("flags reloaded from %s: %s", self.path, flags.describe())
            if on_reload is not None:
                on_reload(flags)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
