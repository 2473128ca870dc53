"""A big ckptd database for the read benchmarks, filled by set-based SQL (INSERT … SELECT over
a generated series), the same statements on SQLite and PostgreSQL: 1,000,000 checkpoints (and
their 3,000,000 metrics) load in under half a minute into SQLite, in about a minute and a half
into PostgreSQL, where a row at a time from Python would take many minutes.

Rows as the daemon writes them (see migrations/versions/): ``runs`` runs × ``per_run``
checkpoints in mixed states (run 0 all complete: the ``ls`` target; odd runs with their oldest
30 % pruned; every 50th step gone, every 97th corrupt), 3 metrics each, an audit action for
each (and one more for each gone or pruned one), one pin per run, run 0's evaluations, exports of
the first 3 runs, and one live daemon.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from _common import db_time, execute, is_postgres, libpq_url, query


class _Dialect:
    """The few expressions that differ between SQLite and PostgreSQL."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

    def ts(self, seconds: str) -> str:
        """A naive UTC timestamp ``seconds`` (an SQL expression) after the Unix epoch, as
        SQLAlchemy stores a DateTime."""
        if self.postgres:
            return f"(to_timestamp({seconds}) AT TIME ZONE 'UTC')"
        return f"strftime('%Y-%m-%d %H:%M:%f000', {seconds}, 'unixepoch')"

    def name(self, expr: str, width: int) -> str:
        if self.postgres:
            return f"lpad(({expr})::text, {width}, '0')"
        return f"printf('%0{width}d', {expr})"

    def json(self, text: str) -> str:
        return f"({text})::json" if self.postgres else text

    def least(self, a: str, b: str) -> str:
        return f"least({a}, {b})" if self.postgres else f"min({a}, {b})"


def _series(name: str, n: int) -> str:
    return (
        f"{name}(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM {name} WHERE i < {n - 1})"
        if n > 0
        else ""
    )


def statements(root: Path, runs: int, per_run: int, now: float, postgres: bool) -> list[str]:
    d = _Dialect(postgres)
    t0 = now - 7 * 86400
    state = (
        f"CASE WHEN r.i > 0 AND r.i % 2 = 1 AND s.i + 1 <= {per_run * 3 // 10} THEN 'pruned' "
        "WHEN r.i > 0 AND (s.i + 1) % 50 = 0 THEN 'gone' "
        "WHEN r.i > 0 AND (s.i + 1) % 97 = 0 THEN 'corrupt' ELSE 'complete' END"
    )
    t = f"({t0} + (s.i + 1) * 60 + r.i)"
    stem = "'model.ckpt-' || (s.i + 1)"
    files = f"'[\"' || {stem} || '.data-00000-of-00001\", \"' || {stem} || '.index\", \"' || {stem} || '.meta\"]'"
    run_path = f"'{root}/run-' || {d.name('r.i', 4)}"
    checkpoints = (
        f"WITH RECURSIVE {_series('r', runs)}, {_series('s', per_run)}, c AS ("
        f"SELECT r.i AS r, s.i + 1 AS step, r.i * {per_run} + s.i + 1 AS id, {state} AS state, "
        f"{t} AS t FROM r, s) "
        "INSERT INTO checkpoints (id, run_id, prefix, step, format, state, reason, size_bytes, "
        "files, has_meta, signature, created_at, recorded_at, completed_at, gone_at, incarnation) "
        f"SELECT c.id, c.r + 1, '{root}/run-' || {d.name('c.r', 4)} || '/model.ckpt-' || c.step, "
        "c.step, 'tf1', c.state, CASE c.state WHEN 'pruned' THEN 'retention: not in "
        "keep_last/keep_best' WHEN 'gone' THEN 'deleted outside ckptd' WHEN 'corrupt' THEN "
        "'index: bad magic number' END, 105614, "
        f"{d.json(files.replace('s.i + 1', 'c.step'))}, TRUE, "
        f"{d.json(chr(39) + '[744, ' + chr(39) + ' || c.step || ' + chr(39) + ', 1, 1]' + chr(39))}, "
        f"{d.ts('c.t')}, {d.ts('c.t + 0.005')}, "
        f"CASE WHEN c.state <> 'corrupt' THEN {d.ts('c.t + 0.005')} END, "
        f"CASE WHEN c.state = 'gone' THEN {d.ts('c.t + 30')} END, 1 FROM c"
    )
    acc = d.least(
        "1.0",
        f"0.1 + 0.9 * c.step / {float(per_run)} + (((c.id % 1000) * 7919) % 1000) / 10000.0 - 0.05",
    )
    metrics = (
        "INSERT INTO metrics (checkpoint_id, name, value, step, source, recorded_at) "
        f"SELECT c.id, m.name, CASE m.name WHEN 'eval/accuracy' THEN {acc} "
        f"WHEN 'eval/loss' THEN 2.5 * (1 - {acc}) + 0.1 ELSE 2.4 * (1 - {acc}) + 0.12 END, "
        "c.step, 'tfevents', c.recorded_at FROM checkpoints c, "
        "(SELECT 'eval/accuracy' AS name UNION ALL SELECT 'eval/loss' UNION ALL "
        "SELECT 'loss') m"
    )
    detail = d.json('\'{"step": \' || c.step || \', "format": "tf1"}\'')
    actions = [
        "INSERT INTO actions (at, kind, run_id, checkpoint_id, subject, reason, detail) "
        "SELECT c.recorded_at, CASE c.state WHEN 'corrupt' THEN 'corrupt' ELSE 'recorded' END, "
        "c.run_id, c.id, c.prefix, CASE c.state WHEN 'corrupt' THEN c.reason END, "
        f"{detail} FROM checkpoints c ORDER BY c.id",
        "INSERT INTO actions (at, kind, run_id, checkpoint_id, subject, reason, detail) "
        f"SELECT {d.ts(f'{t0} + c.step * 60 + c.run_id - 1 + 3600')}, c.state, c.run_id, c.id, "
        f"c.prefix, c.reason, {d.json(chr(39) + '{}' + chr(39))} FROM checkpoints c "
        "WHERE c.state IN ('gone', 'pruned') ORDER BY c.id",
    ]
    at_now = d.ts(str(now))
    return [
        f"WITH RECURSIVE {_series('r', runs)} INSERT INTO runs (id, name, path, watch_path, "
        f"present, created_at, scanned_at) SELECT r.i + 1, 'run-' || {d.name('r.i', 4)}, "
        f"{run_path}, '{root}', TRUE, {d.ts(str(t0))}, {at_now} FROM r",
        checkpoints,
        metrics,
        *actions,
        "INSERT INTO evaluations (checkpoint_id, status, attempts, error, duration_s, "
        "started_at, finished_at, next_attempt_at) SELECT c.id, 'done', 1, NULL, 1.5, "
        f"{d.ts(f'{t0} + c.step * 60 + 1')}, {d.ts(f'{t0} + c.step * 60 + 2.5')}, NULL "
        "FROM checkpoints c WHERE c.run_id = 1",
        "INSERT INTO pins (checkpoint_id, reason, created_at) SELECT max(c.id), "
        f"'release candidate', {at_now} FROM checkpoints c GROUP BY c.run_id",
        "INSERT INTO exports (checkpoint_id, format, version, path, status, verified, error, "
        f"created_at, removed_at) SELECT max(c.id), 'saved_model', {per_run}, "
        f"'/srv/models/run-' || {d.name('c.run_id - 1', 4)} || '/{per_run}', 'published', TRUE, "
        f"NULL, {at_now}, NULL FROM checkpoints c WHERE c.run_id <= 3 GROUP BY c.run_id",
    ]


def daemon_row(root: Path, config: Path, now: float) -> tuple[Any, ...]:
    status = {
        "state": "running",
        "heartbeat_interval": 10.0,
        "watches": [{"path": str(root), "observer": "inotify", "alive": True}],
    }
    return (
        os.uname().nodename,
        os.uname().nodename,
        os.getpid(),
        "0.1.0",
        str(config),
        db_time(now - 3600),
        db_time(now),
        json.dumps(status),
    )


_DAEMON = (
    "INSERT INTO daemons (name, host, pid, version, config, started_at, heartbeat_at, "
    "stopped_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)"
)
TABLES = ("runs", "checkpoints", "metrics", "actions", "evaluations", "pins", "exports")


def populate(db: Path | str, root: Path, config: Path, runs: int, per_run: int) -> dict[str, Any]:
    """Fill a migrated, empty database; the row counts and the seconds it took."""
    now = time.time()
    t = time.perf_counter()
    body = statements(root, runs, per_run, now, is_postgres(db))
    execute(db, [(_DAEMON, daemon_row(root, config, now)), *((s, ()) for s in body)])
    if is_postgres(db):  # what autovacuum would have done by the time a database is this big
        import psycopg

        with psycopg.connect(libpq_url(str(db)), autocommit=True) as pg:
            pg.execute("VACUUM ANALYZE")

    counts = {table: query(db, f"select count(*) from {table}")[0][0] for table in TABLES}
    return {**counts, "seconds": time.perf_counter() - t}


def touch_heartbeat(db: Path | str) -> None:
    """What a live daemon does every heartbeat_interval, so `status` keeps seeing it alive."""
    execute(db, [("update daemons set heartbeat_at = ?", (db_time(time.time()),))])
