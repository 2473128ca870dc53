"""Python evaluators the daemon tests point the worker at (imported inside the worker)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def step_score(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """A deterministic 'metric' so tests can predict the best: higher step, higher score."""
    assert Path(checkpoint + ".index").exists(), checkpoint
    marker = Path(run) / ".evaluated"
    with marker.open("a") as fh:
        fh.write(f"{step}\n")  # lets tests count evaluations per checkpoint
    return {"eval/score": float(step or 0) / 1000, "eval/pid": float(os.getpid())}


def hang(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    time.sleep(3600)
    return {}


def crash(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def boom(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    raise ValueError(f"boom at step {step}")
