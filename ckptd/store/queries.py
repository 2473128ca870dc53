"""Transitional re-exports: the read queries now live in ``store/reads.py`` (checkpoints),
``store/runs.py`` and ``store/audit_reads.py``. Kept only for callers on other branches of
issue 11; delete once none imports it."""

from ckptd.core.errors import NotFound
from ckptd.store.audit_reads import actions
from ckptd.store.reads import (
    SOURCE_RANK,
    best_sources,
    checkpoints,
    resolve_checkpoint,
    state_counts,
    work_counts,
)
from ckptd.store.runs import resolve_run, run_summaries, runs, to_run

__all__ = [
    "SOURCE_RANK",
    "NotFound",
    "actions",
    "best_sources",
    "checkpoints",
    "resolve_checkpoint",
    "resolve_run",
    "run_summaries",
    "runs",
    "state_counts",
    "to_run",
    "work_counts",
]
