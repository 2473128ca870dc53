"""Runs whose event-file steps match no checkpoint step: shown by `ckptd status`, and reported
once as a ``steps_unmatched`` event (the daemon reports them after each scan of every run)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.core.model import utcnow
from ckptd.store import audit, unmatched
from ckptd.store.handle import Store

KIND = unmatched.KIND


@dataclass(frozen=True)
class StepMismatch:
    run: str
    checkpoints: int
    checkpoint_steps: tuple[int, int]
    logged_steps: tuple[int, int]

    @property
    def message(self) -> str:
        return (
            f"event files log steps {_span(self.logged_steps)} but its {self.checkpoints} "
            f"checkpoint(s) are at steps {_span(self.checkpoint_steps)}, so no checkpoint gets "
            "a logged value; if they hold the training step in a variable ckptd does not read, "
            "name it with step_variable in the run's [[watch]]"
        )


def _span(steps: tuple[int, int]) -> str:
    lo, hi = steps
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _of(u: unmatched.Unmatched) -> StepMismatch:
    return StepMismatch(u.run, u.checkpoints, u.checkpoint_steps, u.logged_steps)


def mismatches(store: Store) -> list[StepMismatch]:
    with store.session() as conn:
        return [_of(u) for u in unmatched.unmatched_runs(conn)]


class Reporter:
    """Writes one ``steps_unmatched`` event per run (ever: the audit log is asked once per run
    and process, then this process remembers)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._done: set[int] = set()

    def report(self) -> list[StepMismatch]:
        """The mismatches reported now."""
        with self.store.session() as conn:
            found = [u for u in unmatched.unmatched_runs(conn) if u.run_id not in self._done]
            if not found:
                return []
            already = unmatched.reported(conn, (u.run_id for u in found))
            new = [u for u in found if u.run_id not in already]
            now = utcnow()
            audit.record_many(
                conn,
                [
                    audit.Entry(
                        now,
                        KIND,
                        u.run_id,
                        subject=u.run,
                        reason=_of(u).message,
                        detail={
                            "checkpoint_steps": list(u.checkpoint_steps),
                            "logged_steps": list(u.logged_steps),
                        },
                    )
                    for u in new
                ],
            )
        self._done |= {u.run_id for u in found}
        return [_of(u) for u in new]
