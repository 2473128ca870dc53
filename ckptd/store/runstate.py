"""Loading recording's state: what the store holds for runs (their live rows, event-file
offsets, incarnations), creating the runs it does not know yet."""

from __future__ import annotations

from collections.abc import Sequence
from json import loads

from sqlalchemy import Connection, bindparam, select

from ckptd.core.model import utcnow
from ckptd.core.recording import EventFile, Known, RunDir, RunState
from ckptd.store import audit, tables
from ckptd.store.handle import Store
from ckptd.store.tables import LIVE, json_text
from ckptd.store.upsert import insert_many

_CHUNK = 500  # ids or paths per IN (...): SQLite is slow with long lists
# Event-file errors starting so were transient (EACCES, EIO…): ckptd 0.1.0 stored them as if
# the file were corrupt; they are read again.
_UNREADABLE = "unreadable: "


def load_states(store: Store, runs: Sequence[RunDir]) -> dict[str, RunState]:
    """What the store holds for ``runs``, by path: two SELECTs per 500 runs, whatever their
    size. Runs it does not know are created (each with its ``run_discovered`` entry) and start
    empty, with no further query."""
    with store.session() as conn:
        return _load(conn, runs)


def load_state(store: Store, run: RunDir) -> RunState:
    return load_states(store, [run])[run.key]


def run_versions(store: Store) -> dict[int, int]:
    """Every run's version (one SELECT): a quick rescan trusts what it saw at that version."""
    with store.session() as conn:
        return dict(conn.execute(select(_runs.c.id, _runs.c.version)).all())


def _load(conn: Connection, runs: Sequence[RunDir]) -> dict[str, RunState]:
    wanted = {r.key: r for r in runs}
    paths = list(wanted)
    found: dict[str, tuple[int, int, bool, bool, str | None]] = {}
    checkpoints: dict[int, dict[str, Known]] = {}
    for i in range(0, len(paths), _CHUNK):
        rows = conn.execute(_LOAD_RUNS, {"paths": paths[i : i + _CHUNK]})
        for path, rid, version, present, scanned, starts, cid, *known in rows:
            if path not in found:
                found[path] = (rid, version, bool(present), bool(scanned), starts)
                checkpoints[rid] = {}
            if cid is not None:
                prefix, state, step, sig, fmt, incarnation = known
                signature = tuple(loads(sig) if sig else ())
                checkpoints[rid][prefix] = Known(cid, state, step, signature, fmt, incarnation)
    files: dict[int, dict[str, EventFile]] = {rid: {} for rid in checkpoints}
    ids = list(files)
    for i in range(0, len(ids), _CHUNK):
        for rid, fpath, offset, error in conn.execute(_LOAD_FILES, {"ids": ids[i : i + _CHUNK]}):
            if error and error.startswith(_UNREADABLE):
                error = None
            files[rid][fpath] = EventFile(offset, error)
    out = {
        path: RunState(
            rid,
            version,
            present,
            scanned,
            checkpoints[rid],
            files[rid],
            incarnation_starts=tuple(loads(starts)) if starts else (),
        )
        for path, (rid, version, present, scanned, starts) in found.items()
    }
    missing = [wanted[p] for p in paths if p not in found]
    if missing:
        out.update(_create(conn, missing))
    return out


def _create(conn: Connection, runs: list[RunDir]) -> dict[str, RunState]:
    now = utcnow()
    insert_many(
        conn,
        _runs,
        ("name", "path", "watch_path", "present", "created_at"),
        [(r.name, r.key, r.root_key, True, now) for r in runs],
        conflict_keys=("path",),
    )
    created: dict[str, tuple[int, int]] = {}
    paths = [r.key for r in runs]
    for i in range(0, len(paths), _CHUNK):
        q = select(_runs.c.path, _runs.c.id, _runs.c.version)
        for path, rid, version in conn.execute(q.where(_runs.c.path.in_(paths[i : i + _CHUNK]))):
            created[path] = (rid, version)
    audit.record_many(
        conn,
        [
            audit.Entry(now, "run_discovered", created[r.key][0], None, r.name, None, {"path": p})
            for r, p in zip(runs, paths, strict=True)
        ],
    )
    return {p: RunState(rid, version) for p, (rid, version) in created.items()}


_runs, _ckpts, _files = tables.runs, tables.checkpoints, tables.event_files
_LOAD_RUNS = (
    select(
        _runs.c.path,
        _runs.c.id,
        _runs.c.version,
        _runs.c.present,
        _runs.c.scanned_at.is_not(None),
        json_text(_runs.c.incarnation_starts),
        _ckpts.c.id,
        _ckpts.c.prefix,
        _ckpts.c.state,
        _ckpts.c.step,
        json_text(_ckpts.c.signature),  # decoded here, without a wrapper
        _ckpts.c.format,
        _ckpts.c.incarnation,
    )
    # Replaced versions are history: a run's state is its live rows.
    .select_from(_runs.outerjoin(_ckpts, (_ckpts.c.run_id == _runs.c.id) & LIVE))
    .where(_runs.c.path.in_(bindparam("paths", expanding=True)))
)
_LOAD_FILES = select(_files.c.run_id, _files.c.path, _files.c.offset, _files.c.error).where(
    _files.c.run_id.in_(bindparam("ids", expanding=True))
)
