"""Recording as a pure diff: what a run directory shows, what the store holds, what to write.

``io/observe`` builds an :class:`Observation` of one run directory; ``store/recording`` loads the
run's :class:`RunState` and applies :class:`Changes` in one transaction, conditional on the run's
``version``. :func:`diff` decides, with no I/O: applying ``diff(obs, state)`` makes the state what
the observation shows, and diffing the same observation again yields nothing. The records
themselves are in ``core/runstate.py`` (re-exported here); incarnations and which checkpoint a
logged value belongs to, in ``core/incarnations.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ckptd.core import incarnations as inc
from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNING
from ckptd.core.runstate import (
    INCOMPLETE,
    Audit,
    Changes,
    EventFile,
    EventFileWrite,
    EventRead,
    EventTail,
    Fingerprint,
    Found,
    Gone,
    Known,
    Metric,
    Observation,
    RunDir,
    RunState,
    Scalar,
    ScalarValue,
    Update,
)

__all__ = [
    "INCOMPLETE",
    "Audit",
    "Changes",
    "EventFile",
    "EventFileWrite",
    "EventRead",
    "EventTail",
    "Fingerprint",
    "Found",
    "Gone",
    "Known",
    "Metric",
    "Observation",
    "RunDir",
    "RunState",
    "Scalar",
    "ScalarValue",
    "Update",
    "apply_to",
    "diff",
    "storable_step",
]

_INT64 = 1 << 63  # the database's INTEGER is 64-bit
BULK_AUDIT = 20  # more new checkpoints than this in one scan get one audit entry, not one each


def storable_step(f: Found) -> Found:
    """``f`` with a step the database can hold: a file name claiming a bigger one
    (``ckpt-99999999999999999999``) is recorded without a step, not refused with its run."""
    if f.step is None or f.step < _INT64:
        return f
    return dataclasses.replace(f, step=None)


def _deleting(known: Known, f: Found) -> bool:
    """TF deletes the .index before the data files: a recorded checkpoint whose index is gone
    is being deleted (and stays gone while leftovers of its data remain)."""
    return (
        known.state in (COMPLETE, GONE)
        and f.state == CORRUPT
        and (f.reason or "").startswith("no .index")
    )


def diff(obs: Observation, state: RunState) -> Changes:
    """The changes that make ``state`` hold what ``obs`` shows. ``pruning``/``pruned`` rows
    belong to the pruner: never turned gone (a ``pruned`` one seen again is recorded anew)."""
    if obs.unreadable is not None:
        return Changes(present=state.present)  # nothing was seen, so nothing is concluded
    audit: list[Audit] = []

    new: list[Found] = []
    updated: list[Update] = []
    replaced: list[Gone] = []
    seen: set[str] = set()
    for f in map(storable_step, obs.found):
        if f.state == INCOMPLETE:
            seen.add(f.prefix)  # not yet a checkpoint; its completion triggers another scan
            continue
        known = state.checkpoints.get(f.prefix)
        if known is None:
            seen.add(f.prefix)
            new.append(f)
            continue
        if _deleting(known, f):
            continue  # not seen: gone now if it was complete
        seen.add(f.prefix)
        if known.state == PRUNING:
            continue  # the pruner owns it until it commits "pruned"
        if _rewritten(known, f):
            replaced.append(Gone(known.id, f.prefix, known.step))
            new.append(f)
            audit.append(
                Audit(
                    "replaced",
                    f.prefix,
                    "written again under the same name; the old version is kept as history",
                    {"step": known.step, "was": known.state},
                    checkpoint_id=known.id,
                )
            )
            continue
        if known.state == f.state and known.signature == f.signature:
            continue  # nothing changed
        completed = f.state == COMPLETE and known.state != COMPLETE
        corrupted = f.state == CORRUPT and known.state != CORRUPT
        updated.append(Update(known.id, f, completed, corrupted))
        if corrupted:
            audit.append(Audit("corrupt", f.prefix, f.reason, prefix=f.prefix))

    # Checkpoints that vanished: deleted by the trainer (Saver max_to_keep) or by hand.
    why = "deleted outside ckptd" if obs.present else "run directory is gone"
    gone = [
        Gone(k.id, prefix, k.step)
        for prefix, k in state.checkpoints.items()
        if prefix not in seen and k.state in (COMPLETE, CORRUPT)
    ]
    audit += [Audit("gone", g.prefix, why, prefix=g.prefix) for g in gone]

    incarnations, starts = inc.assign(obs.run_dir, state, new, audit)
    audit += _new_audit(obs.run_dir, new)
    superseded = {r.prefix for r in replaced}
    writes, reads, scalars, metrics = inc.event_values(
        obs, state, starts, {p: k for p, k in state.checkpoints.items() if p not in superseded}
    )
    audit = [Audit("event_file_corrupt", p, r.error) for p, r in reads if r.error] + audit
    metrics += [
        Metric(f.prefix, name, value, f.step, "filename")
        for f in new
        for name, value in f.metrics.items()
    ]
    reported = tuple(dict.fromkeys(n for n in obs.unsupported if n not in state.unsupported))
    audit += [
        Audit(
            "unsupported_name",
            name,
            "file name is not valid UTF-8; ckptd ignores it (rename it to have it recorded)",
        )
        for name in reported
    ]
    return Changes(
        present=obs.present,
        new=tuple(new),
        updated=tuple(updated),
        gone=tuple(gone),
        replaced=tuple(replaced),
        incarnations=incarnations,
        incarnation_starts=starts if starts != state.incarnation_starts else None,
        gone_reason=why,
        event_files=tuple(writes),
        event_reads=tuple(reads),
        scalars=scalars,
        metrics=tuple(metrics),
        audit=tuple(audit),
        reported=reported,
        touch=obs.present != state.present or not state.scanned,
    )


def _rewritten(known: Known, f: Found) -> bool:
    """Whether ``f`` is a new file under a recorded name (a trainer saving ``weights`` again, or
    restarted and writing ``ckpt-1`` anew): its identity changed, so it is a new version. Not
    when the recorded one is corrupt: that is the same save still arriving (``cp -p`` and
    ``shutil.copytree`` write the index, then set its time, then copy the data), and a corrupt
    row has nothing (evaluations, exports) to keep as history."""
    if known.state == CORRUPT:
        return False
    before, now = inc.identity(known.signature), inc.identity(f.signature)
    return bool(before) and bool(now) and before != now


def _new_audit(run_dir: str, new: list[Found]) -> list[Audit]:
    """One entry per new checkpoint; past BULK_AUDIT complete ones (a backfill), one for the
    batch instead (the rows themselves carry recorded_at), corrupt ones still one by one."""
    complete = [f for f in new if f.state == COMPLETE]
    bulk = len(complete) > BULK_AUDIT
    out = [
        Audit(
            "recorded" if f.state == COMPLETE else "corrupt",
            f.prefix,
            f.reason,
            {"step": f.step, "format": f.format},
            prefix=f.prefix,
        )
        for f in new
        if f.state != COMPLETE or not bulk
    ]
    if bulk:
        steps = [f.step for f in complete if f.step is not None]
        out.append(
            Audit(
                "recorded",
                run_dir,
                f"{len(complete)} checkpoints found in one scan",
                {"count": len(complete), "steps": [min(steps), max(steps)] if steps else None},
            )
        )
    return out


def apply_to(state: RunState, changes: Changes, new_ids: Mapping[str, int]) -> RunState:
    """The state after the store applied ``changes`` (``new_ids``: ids of the new checkpoints)."""
    if changes.empty:
        return state
    checkpoints = dict(state.checkpoints)
    for u in changes.updated:
        f = u.found
        was = checkpoints[f.prefix]
        checkpoints[f.prefix] = dataclasses.replace(
            was, state=f.state, step=f.step, signature=f.signature, format=f.format
        )
    for g in changes.gone:
        checkpoints[g.prefix] = dataclasses.replace(checkpoints[g.prefix], state=GONE)
    for r in changes.replaced:
        del checkpoints[r.prefix]  # history now; its successor is among the new
    for f in changes.new:
        n = changes.incarnations.get(f.prefix, 1)
        checkpoints[f.prefix] = Known(new_ids[f.prefix], f.state, f.step, f.signature, f.format, n)
    event_files = dict(state.event_files)
    for w in changes.event_files:
        event_files[w.path] = EventFile(w.offset, w.error)
    starts = changes.incarnation_starts
    return RunState(
        state.run_id,
        state.version + 1,
        changes.present,
        True,
        checkpoints,
        event_files,
        state.unsupported | set(changes.reported),
        state.incarnation_starts if starts is None else starts,
    )
