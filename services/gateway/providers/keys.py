"""A provider's API keys: several may be configured, they are used in turn, and they rotate without a
restart.

Keys come from the environment variable `api_key_env` (one key, or several separated by commas) and from
the file `api_key_file` (one key per line; blank lines and `#` comments ignored), the way a Kubernetes
Secret is mounted. The file is looked at again at most once a second when a key is needed, so a rotated
Secret takes effect within a second, with no restart; a request already under way keeps the key it
started with.

A key the provider answers 401 or 403 for is set aside (with one WARNING naming its position, never the
key) and the next one is used; it comes back when the keys change, or after `SET_ASIDE_SECONDS` in case
the provider's trouble was passing. When every key has been set aside they are all tried again rather
than none: the provider's answer then reaches the caller.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

from opentelemetry import metrics

from libs.config import ProviderConfig
from libs.logs import register_secret

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0
SET_ASIDE_SECONDS = 600.0

_meter = metrics.get_meter("sophia.gateway")
_set_aside_counter = _meter.create_counter(
    "sophia.gateway.provider.keys_set_aside",
    description="Provider API keys set aside after the provider refused them (401/403)",
)


@dataclass(frozen=True)
class ProviderKey:
    secret: str
    # 1-based position among the provider's keys: how logs and metrics name a key, never by its value.
    position: int


def _parse(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class ProviderKeys:
    def __init__(self, provider: str, config: ProviderConfig, *, clock=time.monotonic) -> None:
        self._provider = provider
        self._env = config.api_key_env
        self._file = config.api_key_file
        self._clock = clock
        self._keys: list[ProviderKey] = []
        self._turn = itertools.count()
        self._set_aside: dict[str, float] = {}  # secret → when it may be used again
        self._file_stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self._load()

    @property
    def source(self) -> str:
        """Where keys come from, for error messages (names, never values)."""
        sources = [f"environment variable {self._env}" if self._env else "", self._file]
        return " or ".join(s for s in sources if s) or "api_key_env or api_key_file in the provider's config"

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self._file)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _load(self) -> None:
        secrets = [s.strip() for s in os.environ.get(self._env, "").split(",")] if self._env else []
        self._file_stamp = self._stamp() if self._file else None
        if self._file:
            try:
                with open(self._file, encoding="utf-8") as handle:
                    secrets += _parse(handle.read())
            except OSError as exc:
                log.warning("provider %s: cannot read api_key_file (%s)", self._provider, exc.strerror)
        secrets = list(dict.fromkeys(s for s in secrets if s))
        for secret in secrets:
            register_secret(secret)
        changed = [k.secret for k in self._keys] != secrets
        self._keys = [ProviderKey(secret, position) for position, secret in enumerate(secrets, start=1)]
        if changed:
            # New keys get a fresh start; a key that stayed keeps its verdict only if it is still listed.
            self._set_aside = {s: until for s, until in self._set_aside.items() if s in secrets}
            if self._file_stamp is not None or self._env:
                log.info("provider %s: %d API key(s) loaded", self._provider, len(self._keys))

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if not self._file or now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_SECONDS
        if self._stamp() != self._file_stamp:
            self._load()

    def count(self) -> int:
        self._reload_if_changed()
        return len(self._keys)

    def pick(self, exclude: frozenset[str] = frozenset()) -> ProviderKey | None:
        """The next key in turn that is not set aside (nor in `exclude`, the keys this request already
        tried); None when there is no key at all or every key was tried by this request."""
        self._reload_if_changed()
        candidates = [k for k in self._keys if k.secret not in exclude]
        if not candidates:
            return None
        now = self._clock()
        usable = [k for k in candidates if self._set_aside.get(k.secret, 0.0) <= now] or candidates
        return usable[next(self._turn) % len(usable)]

    def refused(self, key: ProviderKey, status_code: int) -> None:
        """The provider answered 401/403 for this key: set it aside while others remain."""
        if self._set_aside.get(key.secret, 0.0) > self._clock():
            return
        self._set_aside[key.secret] = self._clock() + SET_ASIDE_SECONDS
        _set_aside_counter.add(1, {"provider": self._provider})
        log.warning(
            "provider %s refused API key #%d of %d (HTTP %d); it is set aside while others remain",
            self._provider, key.position, len(self._keys), status_code,
        )  # fmt: skip

    def secrets(self) -> list[str]:
        """Every current key, for scrubbing provider messages."""
        return [k.secret for k in self._keys]
