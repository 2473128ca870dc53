"""Incarnations of a run, and which checkpoint a value from an event file belongs to.

A trainer restarted from scratch in the same directory saves low steps again (``ckpt-1`` after
``ckpt-41``): a new **incarnation** of the run. Each starts after the last save of the one
before; ``starts`` holds those times (POSIX seconds), so incarnation ``k`` (1-based) spans
``(starts[k-2], starts[k-1]]``. A checkpoint belongs to the incarnation its save time falls in.

An event file belongs to the incarnation its *creation* time falls in: TF's writers (and Keras',
PyTorch's) put it in the file name (``events.out.tfevents.<seconds>.<host>…``), and a trainer
opens its event files when it starts, before its first save. So values the old trainer logs
after its last save (a final evaluation) stay with its checkpoints, and the new trainer's, even
those logged before its first save, go to the new incarnation. Not a value's own wall time (the
final evaluation would move), nor the order ckptd read things in (a scan can see the new
trainer's event file before its first checkpoint).

Keras ``ModelCheckpoint`` numbers files by ``{epoch}`` from 1, while ``TensorBoard`` logs its
``epoch_*`` series at step = epoch - 1: a Keras checkpoint takes ``epoch_*`` values logged at its
step - 1, and no other series (iteration steps such as ``evaluation_loss_vs_iterations`` have
nothing to do with epoch numbers).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence

from ckptd.core.model import COMPLETE, CORRUPT
from ckptd.core.runstate import (
    Audit,
    EventFileWrite,
    EventRead,
    Found,
    Known,
    Metric,
    Observation,
    RunState,
    Scalar,
)

KERAS_FORMATS = ("keras", "keras_weights")
NO_TIME = 0.0  # an event file whose creation time is unknown counts as the oldest
_BORN = re.compile(r"\.tfevents\.(\d{1,12})(?:\.|$)")


def epoch_numbered(fmt: str) -> bool:
    """Whether a checkpoint of format ``fmt`` is numbered by Keras epoch (1-based)."""
    return fmt in KERAS_FORMATS


def epoch_series(name: str) -> bool:
    """Whether ``name`` (``validation/epoch_loss``) is a Keras per-epoch series."""
    return name.rpartition("/")[2].startswith("epoch_")


def checkpoint_steps(name: str, step: int) -> list[tuple[bool, int]]:
    """The checkpoints a value of ``name`` logged at ``step`` belongs to, as (epoch-numbered,
    checkpoint step): TF checkpoints take every series at their step, Keras ones only the
    ``epoch_*`` series logged at their step - 1."""
    out = [(False, step)]
    if epoch_series(name):
        out.append((True, step + 1))
    return out


def saved_at(signature: Sequence[int]) -> float | None:
    """When a checkpoint was saved: every format's signature begins with the size and mtime (ns)
    of the file a save writes last (the ``.index``, the Keras file). None: no such file."""
    return signature[1] / 1e9 if len(signature) >= 2 else None


def identity(signature: Sequence[int]) -> tuple[int, ...]:
    """What changes when the file is written anew (size, mtime); other parts of a signature
    (a TF1 ``.meta`` arriving, data shards completing) belong to the same save."""
    return tuple(signature[:2])


def born_of(path: str, wall_times: Iterable[float] = ()) -> float:
    """When the event file ``path`` was created: from its name, else its earliest value read."""
    m = _BORN.search(path.rpartition("/")[2])
    if m:
        return float(m.group(1))
    return min(wall_times, default=NO_TIME)


def incarnation_of(starts: Sequence[float], at: float) -> int:
    """The incarnation (1-based) a save or an event file's creation at time ``at`` falls in."""
    return 1 + bisect.bisect_left(starts, at)


def span(starts: Sequence[float], incarnation: int) -> tuple[float, float]:
    """The times (lo, hi] of ``incarnation``; unbounded ends as ±1e308 (SQL compares them)."""
    lo = starts[incarnation - 2] if incarnation >= 2 else -1e308
    hi = starts[incarnation - 1] if incarnation - 1 < len(starts) else 1e308
    return lo, hi


def family(fmt: str) -> str:
    """Checkpoints whose steps count the same thing: TF steps, Keras epochs. Only steps of one
    family going back mean a restart (a run may hold both)."""
    return "keras" if epoch_numbered(fmt) else "tf"


def assign(
    run_dir: str, state: RunState, new: list[Found], audit: list[Audit]
) -> tuple[dict[str, int], tuple[float, ...]]:
    """The incarnation of each new checkpoint, and the incarnations' starts (with one that
    begins now). A complete checkpoint saved after the newest *recorded* one of its family (TF
    steps, Keras epochs) with a lower step starts a new incarnation, which begins after the
    run's last save before it. Checkpoints first seen in one scan never start one between
    themselves: their save order may be a copy's (``cp -r`` gives files the times of the copy),
    and at most one begins per scan (the rest of the scan's checkpoints fall in it or before)."""
    if not new:
        return {}, state.incarnation_starts
    starts = list(state.incarnation_starts)
    saves: list[float] = []
    newest: dict[str, tuple[float, int]] = {}  # family -> (save time, step) of its newest save
    for k in state.checkpoints.values():
        t = saved_at(k.signature)
        if t is not None and k.state != CORRUPT:
            saves.append(t)
            fam = family(k.format)
            if k.step is not None and (fam not in newest or t > newest[fam][0]):
                newest[fam] = (t, k.step)
    out: dict[str, int] = {}
    began = False
    timed = [(t if (t := saved_at(f.signature)) is not None else f.mtime, f) for f in new]
    for t, f in sorted(timed, key=lambda tf: tf[0]):
        last = newest.get(family(f.format))
        if (
            not began
            and f.state == COMPLETE
            and last is not None
            and f.step is not None
            and t > last[0]
            and f.step < last[1]
        ):
            begins = max(x for x in saves if x < t)
            if not starts or begins > starts[-1]:
                began = True
                starts.append(begins)
                audit.append(
                    Audit(
                        "new_incarnation",
                        run_dir,
                        f"incarnation {len(starts) + 1}: step {f.step} saved after step "
                        f"{last[1]}; the trainer started over",
                        {"incarnation": len(starts) + 1, "step": f.step, "after": last[1]},
                        prefix=f.prefix,
                    )
                )
        if f.state == COMPLETE:
            saves.append(t)
        out[f.prefix] = incarnation_of(starts, t)
    return out, tuple(starts)


def event_values(
    obs: Observation, state: RunState, starts: tuple[float, ...], known: Mapping[str, Known]
) -> tuple[list[EventFileWrite], list[tuple[str, EventRead]], tuple[Scalar, ...], list[Metric]]:
    """What to write about the event files read, their scalars, and the values they give
    ``known`` checkpoints (in the incarnation that logged them; Keras epochs shifted by one).
    New checkpoints get theirs in the store, from every scalar stored."""
    writes: list[EventFileWrite] = []
    reads: list[tuple[str, EventRead]] = []
    scalars: dict[tuple[str, int, float], tuple[float, float]] = {}
    for path, tail in obs.events.items():
        known_file = state.event_files.get(path)
        if known_file is not None and known_file.error:
            continue  # reported once; a corrupt file is skipped, not re-read forever
        read = tail.read if tail.read is not None else EventRead(tail.start)
        if known_file is not None and known_file.offset == read.offset and not read.error:
            continue  # nothing new in it
        reads.append((path, read))
        born = born_of(path, (w for _n, _s, _v, w in read.scalars))
        for name, step, value, wall_time in read.scalars:
            scalars[(name, step, born)] = (value, wall_time)
        writes.append(EventFileWrite(path, read.offset, read.error, known_file is None))
    targets: dict[tuple[bool, int, int], list[str]] = {}
    for prefix, k in known.items() if scalars else ():
        if k.step is not None:
            key = (epoch_numbered(k.format), k.incarnation, k.step)
            targets.setdefault(key, []).append(prefix)
    chosen: dict[tuple[str, str], tuple[float, Metric]] = {}
    for (name, step, born), (value, _wall) in scalars.items() if targets else ():
        n = incarnation_of(starts, born)
        for epoch, at in checkpoint_steps(name, step):
            for prefix in targets.get((epoch, n, at), ()):
                was = chosen.get((prefix, name))
                if was is None or born >= was[0]:  # the newest event file's value wins
                    chosen[(prefix, name)] = (born, Metric(prefix, name, value, step, "tfevents"))
    return (
        writes,
        reads,
        tuple((n, s, v, w, b) for (n, s, b), (v, w) in scalars.items()),
        [m for _b, m in chosen.values()],
    )
