"""The ``command`` evaluator: a program of the user's, run per checkpoint (no TensorFlow)."""

from __future__ import annotations

import json
import subprocess

from ckptd.config import EvaluateConfig
from ckptd.core.model import Checkpoint
from ckptd.worker.client import WorkerError, terminate_group, worker_env


def run_command(ev: EvaluateConfig, c: Checkpoint, run_name: str) -> dict[str, float]:
    """The ``command`` evaluator: an argv template, JSON object of numbers on stdout."""
    values = {
        "checkpoint": c.prefix,
        "step": "" if c.step is None else str(c.step),
        "run": run_name,
    }
    argv = [arg.format(**values) for arg in ev.command]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=worker_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=ev.timeout.total_seconds())
    except subprocess.TimeoutExpired:
        terminate_group(proc)  # type: ignore[arg-type]
        raise WorkerError(
            "timeout", f"{argv[0]} did not finish within {ev.timeout}; killed it"
        ) from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise WorkerError("tf_error", f"{argv[0]} exited with status {proc.returncode}: {tail[0]}")
    try:
        data = json.loads(out)
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError):
        raise WorkerError(
            "bad_request", f"{argv[0]} must print one JSON object of numbers, got {out[:200]!r}"
        ) from None
