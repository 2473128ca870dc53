"""Reconcile: list a run directory, diff it against the database, write the difference.

Filesystem events only say "look at run R again"; this module is the truth. It is idempotent, so a
dropped event costs latency (until the periodic full rescan), never a checkpoint, and a restart
is just a full reconcile.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, String, bindparam, insert, literal, select, update

from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNED, PRUNING, utcnow
from ckptd.daemon import metrics
from ckptd.daemon.runs import RunSpec
from ckptd.io import formats
from ckptd.io.observe import (
    STALE_AFTER,
    EventTail,
    Fingerprint,
    Observation,
    ObservePool,
    Request,
    fingerprint_holds,
    observe,
    observe_many,
)
from ckptd.store.db import insert_id, rowcount, session_scope
from ckptd.store.tables import (
    ActionRow,
    CheckpointRow,
    EventFileRow,
    MetricRow,
    RunRow,
    ScalarRow,
    table_of,
)
from ckptd.store.upsert import insert_many

log = logging.getLogger(__name__)

BULK_AUDIT = 20  # more new checkpoints than this in one scan get one audit entry, not one each

# States the reconciler owns. ``pruning``/``pruned`` belong to the pruner and are left alone.
_OWNED = (COMPLETE, CORRUPT, GONE)


@dataclass
class _Known:
    id: int
    state: str
    step: int | None
    signature: tuple[int, ...]


_GENERATION = itertools.count()


@dataclass
class _RunCache:
    run_id: int
    checkpoints: dict[str, _Known] = field(default_factory=dict)
    by_step: dict[int, list[int]] = field(default_factory=dict)
    event_files: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)
    unsupported: set[str] = field(default_factory=set)  # names already reported
    unreadable_events: set[str] = field(
        default_factory=set
    )  # event files failing to open, reported
    present: bool = True  # whether the run directory existed at the last scan
    scanned: bool = True  # False until the first scan of a newly discovered run is committed
    # Bumped on every commit for this run: an observation made against an older generation is
    # stale (observed before a write it does not know about) and is redone.
    generation: int = field(default_factory=lambda: next(_GENERATION))
    fingerprint: Fingerprint | None = None  # of the last observation applied
    unreadable: str | None = None  # why the last scan could not read the run directory

    def add(self, prefix: str, known: _Known) -> None:
        self.checkpoints[prefix] = known
        if known.step is not None:
            self.by_step.setdefault(known.step, []).append(known.id)


@dataclass
class Outcome:
    """What one reconcile of one run changed (used for logs, status and tests)."""

    run: str
    recorded: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    scalars: int = 0
    new_complete_ids: list[int] = field(default_factory=list)
    written_at: list[float] = field(default_factory=list)  # newest file mtime of each recorded


class Reconciler:
    """Owns the in-memory view of what the DB holds per run; every write goes through it.

    One instance per daemon; ``reconcile`` is serialised by a lock so the database has one writer
    path.
    """

    def __init__(
        self, engine: Engine, *, stale_after: float = STALE_AFTER, on_recorded: Any = None
    ) -> None:
        self.engine = engine
        self.stale_after = stale_after
        self.on_recorded = on_recorded  # callback(list[checkpoint id]) for evaluate-on-new
        self._cache: dict[str, _RunCache] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------- cache

    def _load(self, session: Any, spec: RunSpec) -> _RunCache:
        self._load_runs(session, [spec])
        return self._cache[str(spec.path)]

    def _load_runs(self, session: Any, specs: list[RunSpec]) -> int:
        """Caches for runs not cached yet: what the database holds, or new run rows (each with
        its ``run_discovered`` audit entry). Returns how many runs were new. The caller drops
        these caches if its transaction fails."""
        new = {str(s.path): s for s in specs if str(s.path) not in self._cache}
        if not new:
            return 0
        runs, actions = table_of(RunRow), table_of(ActionRow)
        conn = session.connection()

        def ids(paths: list[str]) -> dict[str, tuple[int, bool]]:
            out = {}
            for i in range(0, len(paths), 500):
                q = select(runs.c.path, runs.c.id, runs.c.present)
                for path, rid, present in conn.execute(
                    q.where(runs.c.path.in_(paths[i : i + 500]))
                ):
                    out[path] = (rid, bool(present))
            return out

        known = ids(list(new))
        missing = [p for p in new if p not in known]
        now = utcnow()
        insert_many(
            conn,
            runs,
            ("name", "path", "watch_path", "present", "created_at"),
            [(new[p].name, p, str(new[p].watch.path), True, now) for p in missing],
        )
        created = ids(missing)
        insert_many(
            conn,
            actions,
            ("at", "kind", "run_id", "subject", "detail"),
            [(now, "run_discovered", created[p][0], new[p].name, {"path": p}) for p in missing],
        )
        loaded = self._read_caches(
            session, [(rid, p, present) for p, (rid, present) in known.items()]
        )
        for p in missing:
            self._cache[p] = _RunCache(created[p][0], scanned=False)
        self._cache.update(loaded)
        return len(missing)

    @staticmethod
    def _read_caches(
        session: Any, runs: list[tuple[int, str, bool]], *, everything: bool = False
    ) -> dict[str, _RunCache]:
        """What the database holds for ``runs`` (id, path, present): 3 queries, whatever the
        number of runs when ``everything`` (all runs of the database) is asked for."""
        by_id = {rid: _RunCache(rid, present=present) for rid, _path, present in runs}
        ckpt, files = table_of(CheckpointRow), table_of(EventFileRow)
        q1 = select(ckpt.c.id, ckpt.c.run_id, ckpt.c.prefix, ckpt.c.state, ckpt.c.step)
        q1 = q1.add_columns(ckpt.c.signature)
        q2 = select(files.c.id, files.c.run_id, files.c.path, files.c.offset, files.c.error)
        if not everything:
            q1 = q1.where(ckpt.c.run_id.in_(list(by_id)))
            q2 = q2.where(files.c.run_id.in_(list(by_id)))
        conn = session.connection()
        for cid, run_id, prefix, state, step, sig in conn.execute(q1):
            if run_id in by_id:
                by_id[run_id].add(prefix, _Known(cid, state, step, tuple(sig or ())))
        for fid, run_id, fpath, offset, error in conn.execute(q2):
            if run_id in by_id:
                if error and error.startswith(_UNREADABLE):
                    error = None  # recorded by ckptd 0.1.0 as permanent; it is retried
                by_id[run_id].event_files[fpath] = (fid, offset, error)
        return {path: by_id[rid] for rid, path, _present in runs}

    def preload(self) -> int:
        """Load what the database knows about every run, in a few queries (daemon start).

        Then the first scan after a restart re-reads only what changed while the daemon was down
        — not every .index and event file — and writes nothing when nothing changed.
        """
        with self._lock, session_scope(self.engine) as session:
            runs = [
                (rid, path, bool(present))
                for rid, path, present in session.execute(
                    select(RunRow.id, RunRow.path, RunRow.present)
                )
            ]
            loaded = self._read_caches(session, runs, everything=True)
            for path, cache in loaded.items():
                self._cache.setdefault(path, cache)
        return len(loaded)

    def register(self, specs: list[RunSpec]) -> int:
        """Rows and caches for runs not cached yet, in one transaction (a backfill finds many
        new runs at once; one by one, each costs its own statements and commit)."""
        with self._lock:
            new = [str(s.path) for s in specs if str(s.path) not in self._cache]
            try:
                with session_scope(self.engine) as session:
                    return self._load_runs(session, specs)
            except BaseException:
                for path in new:  # rolled back: what was learnt about them never happened
                    self._cache.pop(path, None)
                raise

    def unchanged(self, spec: RunSpec) -> bool:
        """Whether a quick rescan may skip ``spec``: its fingerprint still holds (no listing)."""
        cache = self._cache.get(str(spec.path))
        fp = cache.fingerprint if cache is not None else None
        return fp is not None and fingerprint_holds(spec.path, fp)

    def request(self, spec: RunSpec) -> Request:
        """What observing ``spec`` needs from the cache (see observe.Request)."""
        cache = self._cache.get(str(spec.path))
        if cache is None:
            return Request.first_look(
                spec.path, spec.watch.keras_template, self.stale_after, spec.watch.path
            )
        return Request(
            spec.path,
            spec.watch.keras_template,
            {p: k.signature for p, k in cache.checkpoints.items() if k.state == COMPLETE},
            {p: offset for p, (_fid, offset, _error) in cache.event_files.items()},
            frozenset(p for p, (_fid, _offset, error) in cache.event_files.items() if error),
            self.stale_after,
            cache.generation,
            spec.watch.path,
        )

    def forget(self) -> None:
        """Drop the cache (after another writer, e.g. the pruner, changed rows)."""
        with self._lock:
            self._cache.clear()

    # ----------------------------------------------------------- public

    def reconcile(self, spec: RunSpec, observation: Observation | None = None) -> Outcome:
        """Bring the database in line with ``spec``'s directory. ``observation``: what a worker
        saw (``observe_many``); used only if nothing was written for this run since."""
        with self._lock:
            try:
                path = str(spec.path)
                if path not in self._cache:
                    with session_scope(self.engine) as session:
                        self._load(session, spec)
                cache = self._cache[path]
                # Observed before a write to this run it cannot know about: observe again. (A
                # run unknown when observed is still fine if nothing has been recorded for it.)
                if observation is None or (
                    observation.basis != cache.generation
                    and not (observation.basis == -1 and self._unknown(path))
                ):
                    observation = observe(self.request(spec))
                outcome = self._reconcile(spec, cache, observation)
            except BaseException:
                # The transaction rolled back: what the cache learned in it never happened.
                self._cache.pop(str(spec.path), None)
                raise
        if outcome.new_complete_ids and self.on_recorded:
            try:
                self.on_recorded(outcome.new_complete_ids)
            except Exception:  # a listener never breaks recording
                log.exception("on_recorded listener failed")
        return outcome

    def observe_all(
        self, specs: list[RunSpec], workers: int = 1, *, prefetched: ObservePool | None = None
    ) -> Iterator[Observation | None]:
        """Observations of ``specs`` in order, ``workers`` processes at a time (backfill).

        ``prefetched``: first looks at runs started before the database was read (a cold start,
        see ``prefetch.py``), used if they are of exactly these runs, all still unknown here.
        """
        with self._lock:
            requests = [self.request(s) for s in specs]
            if prefetched is not None:
                if [_looked_at(r) for r in prefetched.requests] == [
                    _looked_at(r) for r in requests
                ] and all(self._unknown(str(s.path)) for s in specs):
                    return observe_many(prefetched.requests, workers, pool=prefetched)
                prefetched.close()
        return observe_many(requests, workers)

    def _unknown(self, path: str) -> bool:
        """Whether the database holds nothing for this run (a first look at it is current)."""
        cache = self._cache.get(path)
        return cache is None or not (cache.checkpoints or cache.event_files)

    def reconcile_many(self, specs: Iterable[RunSpec], workers: int = 1) -> list[Outcome]:
        specs = list(specs)
        return [
            self.reconcile(s, o)
            for s, o in zip(specs, self.observe_all(specs, workers), strict=True)
        ]

    # ----------------------------------------------------------- core

    def _reconcile(self, spec: RunSpec, cache: _RunCache, obs: Observation) -> Outcome:
        outcome = Outcome(spec.name)
        if obs.unreadable is not None:
            # Nothing was seen, so nothing is concluded: its checkpoints stay as recorded (none
            # turns "gone"), and no fingerprint lets a quick rescan skip it. Retried next scan.
            if cache.unreadable is None:
                log.warning(
                    "%s; its checkpoints stay as recorded and it is retried at every scan "
                    "(give the ckptd user read access to it)",
                    obs.unreadable,
                )
            cache.unreadable, cache.fingerprint = obs.unreadable, None
            return outcome
        if cache.unreadable is not None:
            log.info("%s: readable again", spec.path)
            cache.unreadable = None
        present = obs.present
        obs.found = [_storable_step(f) for f in obs.found]
        if not self._changed(cache, obs):
            cache.fingerprint = obs.fingerprint
            return outcome  # the common rescan: nothing new, no transaction at all
        with session_scope(self.engine) as session:
            now = utcnow()
            # Events first: scalars for checkpoints already known are upserted; checkpoints new in
            # this scan then take every value logged at their step in one plain insert.
            self._apply_events(session, spec, cache, obs.events, now, outcome)
            self._apply_checkpoints(session, spec, cache, obs.found, present, now, outcome)
            for name in obs.unsupported:
                if name not in cache.unsupported:
                    cache.unsupported.add(name)
                    log.warning("%s/%s: file name is not valid UTF-8; ignored", spec.path, name)
                    self._action(
                        session,
                        "unsupported_name",
                        cache.run_id,
                        None,
                        name,
                        "file name is not valid UTF-8; ckptd ignores it (rename it to "
                        "have it recorded)",
                        {},
                    )
            session.connection().execute(
                _UPDATE_RUN, {"run": cache.run_id, "at": now, "is_present": present}
            )
            cache.present = present
        cache.scanned = True
        cache.generation = next(_GENERATION)
        cache.fingerprint = obs.fingerprint
        if outcome.written_at:
            committed = time.time()
            metrics.detection_latency([committed - t for t in outcome.written_at])
        if len(outcome.recorded) > 20:  # a backfill: one line per run, not per checkpoint
            log.info("recorded %d checkpoints of %s", len(outcome.recorded), spec.name)
        else:
            for name in outcome.recorded:
                log.info("recorded %s", name)
        for name in outcome.corrupt:
            log.warning("corrupt checkpoint %s", name)
        return outcome

    @staticmethod
    def _changed(cache: _RunCache, obs: Observation) -> bool:
        """Whether an observation differs from what the database holds (decided without it)."""
        if (
            obs.present != cache.present
            or any(n not in cache.unsupported for n in obs.unsupported)
            or not cache.scanned
        ):
            return True
        seen = set()
        for f in obs.found:
            seen.add(f.prefix)
            if f.state == formats.INCOMPLETE:
                continue
            known = cache.checkpoints.get(f.prefix)
            if known is None or known.state != f.state or known.signature != f.signature:
                return True
        if any(
            k.state in (COMPLETE, CORRUPT) and p not in seen for p, k in cache.checkpoints.items()
        ):
            return True
        for key, tail in obs.events.items():
            fid, offset, _error = cache.event_files.get(key, (None, 0, None))
            if fid is None or tail.size != offset:
                return True
        return False

    def _apply_checkpoints(
        self,
        session: Any,
        spec: RunSpec,
        cache: _RunCache,
        found: list[formats.Found],
        present: bool,
        now: Any,
        outcome: Outcome,
    ) -> None:
        table: Any = CheckpointRow.__table__
        new: list[formats.Found] = []  # not in the database yet
        seen: set[str] = set()
        for f in found:
            seen.add(f.prefix)
            if f.state == formats.INCOMPLETE:
                continue  # not yet a checkpoint; its completion will trigger another scan
            known = cache.checkpoints.get(f.prefix)
            if known is None:
                new.append(f)
                continue
            if known.state == PRUNING:
                continue  # the pruner owns it until it commits "pruned"
            if (
                known.state == COMPLETE
                and f.state == CORRUPT
                and f.reason
                and f.reason.startswith("no .index")
            ):
                # TF deletes .index before the data files: this is a deletion in progress, and
                # the next scan (no files left) records it as gone.
                seen.discard(f.prefix)
                continue
            if known.state == f.state and known.signature == f.signature:
                continue
            values = dict(
                step=f.step,
                format=f.format,
                state=f.state,
                reason=f.reason,
                size_bytes=f.size,
                files=list(f.files),
                has_meta=f.has_meta,
                signature=list(f.signature),
                created_at=_from_ts(f.mtime),
            )
            if f.state == COMPLETE and known.state != COMPLETE:
                values["completed_at"] = now
                values["gone_at"] = None
                outcome.recorded.append(_label(spec, f.step, f.prefix))
                outcome.new_complete_ids.append(known.id)
            elif f.state == CORRUPT and known.state != CORRUPT:
                outcome.corrupt.append(_label(spec, f.step, f.prefix))
                self._action(session, "corrupt", cache.run_id, known.id, f.prefix, f.reason, {})
            if not rowcount(
                session,
                update(table)
                .where(table.c.id == known.id, table.c.state.in_((*_OWNED, PRUNED)))
                .values(**values),
            ):
                continue  # the pruner took it meanwhile; the next scan sees its state
            known.state, known.signature = f.state, f.signature

        if new:
            self._insert_new(session, spec, cache, new, now, outcome)

        # Checkpoints that vanished: deleted by the trainer (Saver max_to_keep) or by hand.
        why = "deleted outside ckptd" if present else "run directory is gone"
        for prefix, known in cache.checkpoints.items():
            if prefix in seen or known.state not in (COMPLETE, CORRUPT):
                continue
            changed = rowcount(
                session,
                update(table)
                .where(table.c.id == known.id, table.c.state.in_((COMPLETE, CORRUPT)))
                .values(state=GONE, gone_at=now, reason=why),
            )
            if not changed:
                # Another writer (the pruner, `ckptd prune`) owns it now: take its state.
                known.state = session.execute(
                    select(table.c.state).where(table.c.id == known.id)
                ).scalar_one()
                continue
            self._action(session, "gone", cache.run_id, known.id, prefix, why, {})
            known.state = GONE
            outcome.gone.append(_label(spec, known.step, prefix))

    def _insert_new(
        self,
        session: Any,
        spec: RunSpec,
        cache: _RunCache,
        new: list[formats.Found],
        now: Any,
        outcome: Outcome,
    ) -> None:
        """Record checkpoints the database does not hold yet (at backfill: every one of them)."""
        table: Any = CheckpointRow.__table__
        run_id = cache.run_id
        rows = [
            (
                run_id,
                f.prefix,
                f.step,
                f.format,
                f.state,
                f.reason,
                f.size,
                list(f.files),
                f.has_meta,
                list(f.signature),
                _from_ts(f.mtime),
                now,
                now if f.state == COMPLETE else None,
            )
            for f in new
        ]
        ids = _insert_checkpoints(session, table, rows)
        complete = sum(f.state == COMPLETE for f in new)
        bulk = complete > BULK_AUDIT
        actions: list[tuple[Any, ...]] = []
        recorded_steps: list[int] = []
        for f, cid in zip(new, ids, strict=True):
            cache.add(f.prefix, _Known(cid, f.state, f.step, f.signature))
            label = _label(spec, f.step, f.prefix)
            if f.state == COMPLETE:
                outcome.recorded.append(label)
                outcome.new_complete_ids.append(cid)
                outcome.written_at.append(f.mtime)
                if f.step is not None:
                    recorded_steps.append(f.step)
            else:
                outcome.corrupt.append(label)
            if f.state != COMPLETE or not bulk:
                kind = "recorded" if f.state == COMPLETE else "corrupt"
                detail: dict[str, Any] = {"step": f.step, "format": f.format}
                actions.append((now, kind, run_id, cid, f.prefix, f.reason, detail))
        if bulk:
            # A backfill: one audit entry for the batch instead of thousands (the rows
            # themselves carry recorded_at); corrupt ones are still listed one by one.
            steps = [min(recorded_steps), max(recorded_steps)] if recorded_steps else None
            reason = f"{complete} checkpoints found in one scan"
            detail = {"count": complete, "steps": steps}
            actions.append((now, "recorded", run_id, None, str(spec.path), reason, detail))
        insert_many(
            session.connection(),
            table_of(ActionRow),
            ("at", "kind", "run_id", "checkpoint_id", "subject", "reason", "detail"),
            actions,
        )
        metric_rows = [
            dict(
                checkpoint_id=cache.checkpoints[f.prefix].id,
                name=k,
                value=_num(v),
                step=f.step,
                source="filename",
                recorded_at=now,
            )
            for f in new
            for k, v in f.metrics.items()
        ]
        self._metrics(session, metric_rows, new=True)
        at_steps = [(f.step, cid) for f, cid in zip(new, ids, strict=True) if f.step is not None]
        self._attach_scalars(session, cache, at_steps, now)

    def note_states(self, states: dict[str, str]) -> None:
        """Another writer changed these checkpoints' states (prefix -> state)."""
        with self._lock:
            for cache in self._cache.values():
                for prefix, state in states.items():
                    if prefix in cache.checkpoints:
                        cache.checkpoints[prefix].state = state

    def _apply_events(
        self,
        session: Any,
        spec: RunSpec,
        cache: _RunCache,
        events: dict[str, EventTail],
        now: Any,
        outcome: Outcome,
    ) -> None:
        new_scalars: dict[tuple[str, int], tuple[float | None, float]] = {}
        new_files: list[tuple[int, str, int, str | None, Any]] = []
        for key, tail in events.items():
            result = tail.read
            if result is None:
                continue  # unchanged since the offset we hold
            fid, offset, error = cache.event_files.get(key, (None, 0, None))
            if error:
                continue  # reported once; a corrupt file is skipped, not re-read forever
            offset = tail.start
            path = key
            for s in result.scalars:
                new_scalars[(s.name, s.step)] = (_num(s.value), s.wall_time)
            if result.skipped:
                log.warning(
                    "event file %s: skipped %d value(s) that are not valid scalars (first: %s)",
                    path,
                    result.skipped,
                    result.skip_reason,
                )
            if result.retry and key not in cache.unreadable_events:
                log.warning("event file %s: %s; retrying at the next scan", path, result.retry)
            if result.retry:
                cache.unreadable_events.add(key)
            else:
                cache.unreadable_events.discard(key)
            if result.error:
                log.warning("event file %s: %s; skipping the rest of it", path, result.error)
                self._action(
                    session, "event_file_corrupt", cache.run_id, None, key, result.error, {}
                )
            if fid is None:
                new_files.append((cache.run_id, key, result.offset, result.error, now))
                continue
            if result.offset != offset or result.error:
                session.execute(
                    update(EventFileRow)
                    .where(EventFileRow.id == fid)
                    .values(offset=result.offset, error=result.error, updated_at=now)
                )
            cache.event_files[key] = (fid, result.offset, result.error)
        if new_files:  # one statement for all of them (a backfill meets every file as new)
            conn = session.connection()
            files = table_of(EventFileRow)
            insert_many(conn, files, ("run_id", "path", "offset", "error", "updated_at"), new_files)
            paths = [row[1] for row in new_files]
            ids = {path: fid for path, fid in conn.execute(_IDS_BY_PATH, {"paths": paths})}
            for _run, key, offset, error, _now in new_files:
                cache.event_files[key] = (ids[key], offset, error)
        if not new_scalars:
            return
        outcome.scalars = len(new_scalars)
        run_id = cache.run_id
        insert_many(
            session.connection(),
            table_of(ScalarRow),
            ("run_id", "name", "step", "value", "wall_time"),
            [(run_id, n, st, v, w) for (n, st), (v, w) in new_scalars.items()],
            conflict_keys=("run_id", "name", "step"),
            update=("value", "wall_time"),
        )
        rows = []
        for (name, step), (value, _w) in new_scalars.items():
            for cid in cache.by_step.get(step, ()):
                rows.append(
                    dict(
                        checkpoint_id=cid,
                        name=name,
                        value=value,
                        step=step,
                        source="tfevents",
                        recorded_at=now,
                    )
                )
        self._metrics(session, rows)

    def _attach_scalars(
        self, session: Any, cache: _RunCache, steps: list[tuple[int, int]], now: Any
    ) -> None:
        """Give newly recorded checkpoints the event-file values logged at their step.

        One INSERT … SELECT per chunk: the join runs inside SQLite, no row passes through Python.
        """
        if not steps:
            return
        ids = sorted(cid for _step, cid in steps)
        conn = session.connection()
        # New rows get ids above every existing one (rowid = max + 1 under our write lock), so a
        # contiguous range is one cheap range condition; SQLite is much slower with long IN lists.
        if ids[-1] - ids[0] + 1 == len(ids):
            conn.execute(
                _ATTACH_RANGE, {"run": cache.run_id, "at": now, "lo": ids[0], "hi": ids[-1]}
            )
            return
        for i in range(0, len(ids), 500):
            conn.execute(_ATTACH_IDS, {"run": cache.run_id, "at": now, "ids": ids[i : i + 500]})

    @staticmethod
    def _metrics(session: Any, rows: list[dict[str, Any]], *, new: bool = False) -> None:
        """Store metric rows; ``new``: only checkpoints inserted in this transaction."""
        if not rows:
            return
        insert_many(
            session.connection(),
            table_of(MetricRow),
            _METRIC_COLUMNS,
            [[r[c] for c in _METRIC_COLUMNS] for r in rows],
            conflict_keys=() if new else ("checkpoint_id", "name", "source"),
            update=() if new else ("value", "step", "recorded_at"),
        )

    @staticmethod
    def _action(
        session: Any,
        kind: str,
        run_id: int | None,
        checkpoint_id: int | None,
        subject: str | None,
        reason: str | None,
        detail: dict[str, Any],
    ) -> None:
        insert_id(
            session,
            insert(ActionRow).values(
                at=utcnow(),
                kind=kind,
                run_id=run_id,
                checkpoint_id=checkpoint_id,
                subject=subject,
                reason=reason,
                detail=detail,
            ),
        )


def _looked_at(r: Request) -> tuple[Any, ...]:
    """What makes two first looks at a run the same observation."""
    return (r.run_dir, r.keras_template, r.stale_after, r.root)


def _label(spec: RunSpec, step: int | None, prefix: str) -> str:
    return f"{spec.name}@{step}" if step is not None else prefix


def _num(value: float) -> float | None:
    """SQLite stores NaN as NULL; NULL ranks worst, exactly as NaN must."""
    return None if value is None or math.isnan(value) else value


# Event-file errors starting so were transient (EACCES, EIO…): ckptd 0.1.0 stored them as if
# the file were corrupt.
_UNREADABLE = "unreadable: "
# mtimes a datetime can hold: a file may claim any (year 10000 is legal on tmpfs and btrfs)
_MIN_TS = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_TS = datetime(9999, 12, 30, tzinfo=UTC).timestamp()
_INT64 = 1 << 63  # SQLite's INTEGER is 64-bit


def _storable_step(f: formats.Found) -> formats.Found:
    """``f`` with a step the database can hold (64-bit): a file name claiming a bigger one
    (``ckpt-99999999999999999999``) is recorded without a step, not refused by SQLite with the
    rest of its run."""
    if f.step is None or f.step < _INT64:
        return f
    return dataclasses.replace(f, step=None)


def _from_ts(ts: float) -> Any:
    """A file time as a naive UTC datetime, clamped to the range a datetime can represent."""
    if not ts:
        return None
    return datetime.fromtimestamp(min(max(ts, _MIN_TS), _MAX_TS), UTC).replace(tzinfo=None)


_METRIC_COLUMNS = ("checkpoint_id", "name", "value", "step", "source", "recorded_at")
_CHECKPOINT_COLUMNS = (
    "run_id",
    "prefix",
    "step",
    "format",
    "state",
    "reason",
    "size_bytes",
    "files",
    "has_meta",
    "signature",
    "created_at",
    "recorded_at",
    "completed_at",
)


# Statements run for every run a scan changes, built once (building one costs more than running
# it, and a backfill runs a few per run).
_runs_t, _ckpt_t = table_of(RunRow), table_of(CheckpointRow)
_files_t, _scalars_t = table_of(EventFileRow), table_of(ScalarRow)
_UPDATE_RUN = (
    update(_runs_t)
    .where(_runs_t.c.id == bindparam("run"))
    .values(scanned_at=bindparam("at"), present=bindparam("is_present"))
)
_IDS_BY_PREFIX = select(_ckpt_t.c.prefix, _ckpt_t.c.id).where(
    _ckpt_t.c.prefix.in_(bindparam("prefixes", expanding=True))
)
_IDS_BY_PATH = select(_files_t.c.path, _files_t.c.id).where(
    _files_t.c.path.in_(bindparam("paths", expanding=True))
)


def _attach_statement(which: Any) -> Any:
    """INSERT … SELECT of the event-file values at the steps of the checkpoints ``which`` picks."""
    rows = (
        select(
            _ckpt_t.c.id,
            _scalars_t.c.name,
            _scalars_t.c.value,
            _scalars_t.c.step,
            literal("tfevents", String),
            bindparam("at", type_=DateTime),
        )
        .select_from(_ckpt_t)
        .join(
            _scalars_t,
            (_scalars_t.c.run_id == _ckpt_t.c.run_id) & (_scalars_t.c.step == _ckpt_t.c.step),
        )
        .where(_ckpt_t.c.run_id == bindparam("run"), which)
    )
    return insert(table_of(MetricRow)).from_select(_METRIC_COLUMNS, rows)


_ATTACH_RANGE = _attach_statement(_ckpt_t.c.id.between(bindparam("lo"), bindparam("hi")))
_ATTACH_IDS = _attach_statement(_ckpt_t.c.id.in_(bindparam("ids", expanding=True)))


def _insert_checkpoints(session: Any, table: Any, rows: list[tuple[Any, ...]]) -> list[int]:
    """Bulk insert of rows in ``_CHECKPOINT_COLUMNS`` order, returning primary keys in row order.

    One executemany, then the new ids by prefix (unique) — cheaper than INSERT … RETURNING
    through the ORM, which re-processes every row's parameters.
    """
    conn = session.connection()
    if len(rows) == 1:
        values = dict(zip(_CHECKPOINT_COLUMNS, rows[0], strict=True))
        return [insert_id(session, insert(table).values(**values))]
    insert_many(conn, table, _CHECKPOINT_COLUMNS, rows)
    ids: dict[str, int] = {}
    prefixes = [r[1] for r in rows]
    for i in range(0, len(prefixes), 500):
        chunk = prefixes[i : i + 500]
        ids.update(
            (prefix, cid) for prefix, cid in conn.execute(_IDS_BY_PREFIX, {"prefixes": chunk})
        )
    return [ids[p] for p in prefixes]
