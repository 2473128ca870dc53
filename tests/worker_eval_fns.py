"""Python evaluators of the worker tests (``tests.worker_eval_fns:NAME``, run in TF workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def slow_once(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """Hangs the first time it evaluates a step listed in ``RUN/.slow`` (its worker is stopped
    or killed meanwhile; ``RUN/.slow-STEP.started`` holds this process's pid), else scores as
    ``daemon_eval_fns.step_score``; ``RUN/.evaluated`` gets a line per finished evaluation."""
    slow = Path(run) / ".slow"
    started = Path(run) / f".slow-{step}.started"
    if slow.exists() and str(step) in slow.read_text().split() and not started.exists():
        started.write_text(str(os.getpid()))
        time.sleep(600)
    with (Path(run) / ".evaluated").open("a") as fh:
        fh.write(f"{step}\n")
    return {"eval/score": float(step or 0) / 1000, "eval/pid": float(os.getpid())}
