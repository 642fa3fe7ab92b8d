"""Builds the Router's state (config, classifier, flags) and replaces it whole on ReloadConfig or when
a watched file changes: validated first, swapped atomically, the old state kept when anything is wrong."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
from collections.abc import Callable

from libs.config import DEFAULT_CONFIG_PATH, REPO_ROOT, Config, ConfigError, load_config
from libs.errors import FailedPrecondition
from libs.feature_flags import EMPTY, FileWatch, FlagError, load_flags
from services.router.classifier import ExamplesError, TaskClassifier, load_examples
from services.router.embedder import PromptEmbedder, seed_path
from services.router.router import RoutingState

log = logging.getLogger(__name__)


def repo_path(value: str) -> pathlib.Path:
    path = pathlib.Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def config_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SOPHIA_CONFIG") or DEFAULT_CONFIG_PATH)


def build_state(config: Config, embedder: PromptEmbedder | None) -> RoutingState:
    """Everything routing reads, from one config; raises ConfigError naming the problem. Blocking."""
    settings = config.routing.classifier
    classifier = None
    try:
        if embedder is not None:
            example_set = load_examples(
                repo_path(settings.examples_file), [repo_path(f) for f in settings.extra_examples_files]
            )
            unknown = sorted(set(config.routing.task_types) - set(example_set.task_types))
            if unknown:
                log.warning(
                    "routing.task_types %s have no examples: they apply to explicit task types only", unknown
                )
            vectors = embedder.embed_cached(
                [e.text for e in example_set.examples],
                repo_path(settings.embedding_cache_dir),
                seed_path(repo_path(settings.examples_file)),
            )
            classifier = TaskClassifier(example_set, vectors, settings.complex_threshold)
        flags = load_flags(repo_path(config.routing.flags_file)) if config.routing.flags_file else EMPTY
    except (ExamplesError, FlagError) as exc:
        raise ConfigError(str(exc)) from None
    return RoutingState(config, classifier, flags)


def watched_files(config: Config) -> list[pathlib.Path]:
    settings = config.routing.classifier
    files = [
        config_path(),
        repo_path(settings.examples_file),
        *(repo_path(f) for f in settings.extra_examples_files),
    ]
    if config.routing.flags_file:
        files.append(repo_path(config.routing.flags_file))
    return files


class Reloader:
    def __init__(self, embedder: PromptEmbedder | None, apply: Callable[[RoutingState], None]) -> None:
        self.embedder = embedder
        self._apply = apply
        # One reload at a time, so a slow older read can never replace a newer one.
        self._lock = asyncio.Lock()
        self._watches: list[FileWatch] = []

    async def reload(self) -> RoutingState:
        async with self._lock:
            try:
                state = await asyncio.to_thread(lambda: build_state(load_config(), self.embedder))
            except ConfigError as exc:
                log.warning("config reload refused; the current routing stays: %s", exc)
                raise FailedPrecondition(f"config not reloaded, the current routing stays: {exc}") from None
            self._apply(state)
            self._watch(state.config)
        # Only routing, models, prices and flags take effect; ports and the rest need a restart.
        log.info(
            "routing reloaded: %d models, %d task types, %s",
            len(state.config.models),
            len(state.classifier.task_types) if state.classifier else 0,
            state.flags.describe(),
        )
        return state

    def _watch(self, config: Config) -> None:
        """Watches the files `config` names. A file already watched keeps its watch, so a change made
        while a reload was running is still seen at the next look (a new watch would swallow it)."""
        kept = {watch.path: watch for watch in self._watches}
        self._watches = [kept.get(path) or FileWatch(path) for path in watched_files(config)]

    async def watch_forever(self, config: Config) -> None:
        """Reloads when a watched file changes (polled every routing.watch_seconds)."""
        self._watch(config)
        interval = config.routing.watch_seconds
        while interval:
            await asyncio.sleep(interval)
            changed = [w.path.name for w in self._watches if w.changed()]
            if not changed:
                continue
            log.info("%s changed: reloading", ", ".join(changed))
            try:
                await self.reload()
            except FailedPrecondition:
                pass  # logged by reload; the old state stays
