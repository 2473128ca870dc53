"""The worker's log lines: stderr only (its stdout is the protocol)."""

from __future__ import annotations

import os
import sys
import traceback


def log(msg: str) -> None:
    print(f"[ckptd.worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def log_traceback() -> None:
    traceback.print_exc(file=sys.stderr)
