"""Python evaluators of the worker tests (``tests.worker_eval_fns:NAME``, run in TF workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def slow_once(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """Hangs the first time it evaluates the step named in ``RUN/.slow`` (a worker is killed
    meanwhile), else scores as ``daemon_eval_fns.step_score``; ``RUN/.evaluated`` gets a line
    per evaluation that finished."""
    slow, started = Path(run) / ".slow", Path(run) / ".slow.started"
    if slow.exists() and slow.read_text().strip() == str(step) and not started.exists():
        started.write_text(str(os.getpid()))
        time.sleep(600)
    with (Path(run) / ".evaluated").open("a") as fh:
        fh.write(f"{step}\n")
    return {"eval/score": float(step or 0) / 1000, "eval/pid": float(os.getpid())}
