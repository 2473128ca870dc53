"""Attach event-file values to newly recorded checkpoints: copy the scalars logged at their
step (Keras ones: the ``epoch_*`` values at step - 1) into their metrics, by one INSERT … SELECT
per incarnation and kind, inside the recording transaction (``recording.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, and_, bindparam, exists, insert, literal, or_, select

from ckptd.core.incarnations import KERAS_FORMATS, span
from ckptd.core.recording import Changes
from ckptd.store import tables

_CHUNK = 500  # ids per IN (...): SQLite is slow with long lists

METRIC_COLUMNS = ("checkpoint_id", "name", "value", "step", "source", "recorded_at")


def attach_event_values(
    conn: Any,
    run: int,
    changes: Changes,
    new_ids: dict[str, int],
    starts: Sequence[float],
    now: datetime,
) -> None:
    """Give the run's newly recorded checkpoints (``new_ids`` by prefix) the event-file values
    logged at their step, per incarnation and kind (inside :func:`recording.apply`'s
    transaction)."""
    # Per incarnation and kind: TF checkpoints take values at their step, Keras ones at step - 1.
    by_incarnation: dict[tuple[int, bool], list[int]] = {}
    for f in changes.new:
        if f.step is not None:
            key = (changes.incarnations.get(f.prefix, 1), f.format in KERAS_FORMATS)
            by_incarnation.setdefault(key, []).append(new_ids[f.prefix])
    if by_incarnation and len(changes.new) > 1 and conn.dialect.name == "postgresql":
        # Hash joins for a batch: without statistics (a new database, until autovacuum's first
        # ANALYZE) PostgreSQL nests loops over every scalar x checkpoint of the run: quadratic.
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")  # this transaction only
    for (n, keras), ids in by_incarnation.items():
        _attach_scalars(conn, run, ids, now, n, span(starts, n), keras)


def _attach_scalars(
    conn: Any,
    run: int,
    ids: list[int],
    now: datetime,
    incarnation: int,
    born: tuple[float, float],
    keras: bool,
) -> None:
    """Give newly recorded checkpoints of ``incarnation`` (all Keras ones, or all TF ones) the
    event-file values logged at their step by event files ``born`` in its span: one INSERT …
    SELECT per chunk, the join runs inside the database."""
    ids.sort()
    values = {"run": run, "at": now, "inc": incarnation, "born_lo": born[0], "born_hi": born[1]}
    by_range, by_ids = _ATTACH_KERAS if keras else _ATTACH_TF
    # New rows get ids above every existing one (rowid = max + 1 under our write lock), so a
    # contiguous range is one cheap range condition.
    if ids[-1] - ids[0] + 1 == len(ids):
        conn.execute(by_range, {**values, "lo": ids[0], "hi": ids[-1]})
        return
    for i in range(0, len(ids), _CHUNK):
        conn.execute(by_ids, {**values, "ids": ids[i : i + _CHUNK]})


# Statements built once (building one costs more than running it).
_ckpts, _scalars, _metrics = tables.checkpoints, tables.scalars, tables.metrics
# A Keras per-epoch series, at the run's root or in a subdirectory (validation/epoch_loss).
_EPOCH_SERIES = (r"epoch\_%", r"%/epoch\_%")


def _attach_statement(which: Any, keras: bool) -> Any:
    """INSERT … SELECT of the event-file values of the checkpoints ``which`` picks (of one
    incarnation): at their step, for Keras ones the ``epoch_*`` values at step - 1 (see
    ``core/incarnations.py``); of the newest event file born in the incarnation's span.

    One statement per kind: a join on ``step`` plus an offset computed from the scalar's side
    lets the database look each checkpoint up by its (run, step) index, where an offset that
    depends on the checkpoint's format made it scan the run's checkpoints for every value."""
    newer = _scalars.alias("newer")
    kind = (
        and_(
            _ckpts.c.format.in_(KERAS_FORMATS),
            or_(*(_scalars.c.name.like(p, "\\") for p in _EPOCH_SERIES)),
        )
        if keras
        else _ckpts.c.format.not_in(KERAS_FORMATS)
    )
    rows = (
        select(
            _ckpts.c.id,
            _scalars.c.name,
            _scalars.c.value,
            _scalars.c.step,
            literal("tfevents", String),
            bindparam("at", type_=DateTime),
        )
        .select_from(_ckpts)
        .join(
            _scalars,
            (_ckpts.c.run_id == _scalars.c.run_id)
            & (_ckpts.c.step == _scalars.c.step + (1 if keras else 0)),
        )
        .where(
            _ckpts.c.run_id == bindparam("run"),
            which,
            _ckpts.c.incarnation == bindparam("inc"),
            kind,
            _scalars.c.born > bindparam("born_lo"),
            _scalars.c.born <= bindparam("born_hi"),
            ~exists().where(
                newer.c.run_id == _scalars.c.run_id,
                newer.c.name == _scalars.c.name,
                newer.c.step == _scalars.c.step,
                newer.c.born > _scalars.c.born,
                newer.c.born <= bindparam("born_hi"),
            ),
        )
    )
    return insert(_metrics).from_select(METRIC_COLUMNS, rows)


_BY_RANGE = _ckpts.c.id.between(bindparam("lo"), bindparam("hi"))
_BY_IDS = _ckpts.c.id.in_(bindparam("ids", expanding=True))
_ATTACH_TF = (_attach_statement(_BY_RANGE, False), _attach_statement(_BY_IDS, False))
_ATTACH_KERAS = (_attach_statement(_BY_RANGE, True), _attach_statement(_BY_IDS, True))
