"""The queue of runs to look at: observers add the runs their events touch, the reconcile thread
takes them in debounced batches."""

from __future__ import annotations

import threading
import time

from ckptd.daemon.runs import RunSpec

RunKey = tuple[str, str]  # (watch path, run name): stable across reloads, unlike a watch's index


def run_key(spec: RunSpec) -> RunKey:
    return (str(spec.watch.path), spec.name)


class DirtyRuns:
    """A set of runs to rescan, with a short debounce so a burst of events costs one scan."""

    def __init__(self) -> None:
        self._pending: dict[RunKey, RunSpec] = {}
        self._cond = threading.Condition()

    def add(self, spec: RunSpec) -> None:
        key = run_key(spec)
        with self._cond:
            if key not in self._pending:
                self._pending[key] = spec
                self._cond.notify()

    def take(self, timeout: float, debounce: float) -> list[RunSpec]:
        with self._cond:
            if not self._pending and not self._cond.wait(timeout):
                return []
        if debounce > 0:
            time.sleep(debounce)  # let the rest of a save's renames land in the same scan
        with self._cond:
            out = list(self._pending.values())
            self._pending.clear()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)
