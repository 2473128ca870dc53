"""Helpers for the benchmarks that drive ckptd's own classes in-process (Evaluator, Freezer,
Pruner), as the daemon's threads do. Imports ckptd (never TensorFlow): the TensorFlow work
happens in ckptd's real worker subprocesses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from _common import ENV, RUN_CWD

from ckptd.config import Config, WatchConfig, load_config
from ckptd.core.model import Run
from ckptd.store import runs as store_runs
from ckptd.store.db import make_engine, session_scope
from ckptd.worker.client import WorkerClient


def prepare_process() -> None:
    """Make this process's environment the one the CLI subprocesses get (_common.ENV and a
    cwd outside the checkout), so worker subprocesses started from here import the same ckptd."""
    os.environ.update({k: v for k, v in ENV.items() if k.startswith(("TF_", "PYTHON"))})
    for key in ("NOTIFY_SOCKET", "CKPTD_CONFIG"):
        os.environ.pop(key, None)
    os.chdir(RUN_CWD)


def open_store(config_path: Path) -> tuple[Config, Any]:
    """The parsed config and a read-write engine on its (already migrated) database."""
    cfg = load_config(config_path)
    return cfg, make_engine(cfg.daemon.database)


def watch_for(cfg: Config, run: Run) -> WatchConfig:
    for w in cfg.watches:
        if str(w.path) == run.watch_path:
            return w
    raise LookupError(f"run {run.name} is under no watch of {cfg.source}")


def runs(engine: Any) -> list[Run]:
    with session_scope(engine) as s:
        return store_runs.runs(s)


class RecordingClient(WorkerClient):
    """The real WorkerClient, also recording each request's round trip and the worker's own
    reported compute time (``result["seconds"]``, measured inside the worker around the op)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict[str, Any]] = []

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        spawned = self.started
        t0 = time.perf_counter()
        result = super().call(request, timeout)
        wall = time.perf_counter() - t0
        self.calls.append(
            {
                "op": request.get("op"),
                "format": request.get("format"),
                "wall_s": wall,
                "worker_s": result.get("seconds"),
                "spawned": self.started > spawned,
                "warm": result.get("warm"),
            }
        )
        return result

    def ping(self, timeout: float = 300) -> float:
        """Start the worker (TensorFlow imported) if needed; the round trip in seconds."""
        t0 = time.perf_counter()
        self.call({"op": "ping"}, timeout)
        return time.perf_counter() - t0
