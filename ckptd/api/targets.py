"""The run (and checkpoint) an on-demand command names, with the watch it is configured by."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.config import Config, WatchConfig
from ckptd.core.model import Checkpoint, Run
from ckptd.store import targets
from ckptd.store.handle import Store


class NotConfigured(Exception):
    """The run's watch lacks the section a command needs; the message says what to add."""


@dataclass(frozen=True)
class Target:
    run: Run
    watch: WatchConfig
    checkpoint: Checkpoint | None  # None: the whole run


def watch_of(config: Config, watch_path: str) -> WatchConfig | None:
    """The configured watch a run belongs to (by the watch path recorded with the run)."""
    for w in config.watches:
        if str(w.path) == watch_path:
            return w
    return None


def resolve(store: Store, config: Config, text: str) -> Target:
    """A ``RUN`` or ``CHECKPOINT`` argument (NotFound when it names nothing)."""
    run, checkpoint = targets.resolve(store, text)
    watch = watch_of(config, run.watch_path)
    if watch is not None:
        return Target(run, watch, checkpoint)
    raise NotConfigured(f"run {run.name} is not under any watch in {config.source}")
