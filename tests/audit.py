"""The fault suites' audit: where the database, the disk, the state files and the exports
disagree, on SQLite (a database file's path) or PostgreSQL (a SQLAlchemy URL).

"Accounted for" is checked the same way everywhere (:func:`audit`): every save a trainer printed
has a row that is ``complete`` (all its files on disk) or ``pruned`` (with a reason, nothing of it
left on disk); every checkpoint on disk has a row; every run's ``checkpoint`` state file names only
checkpoints that exist; every numeric export directory is a complete SavedModel with a
``published`` row, and every ``published`` row has its directory and a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from ckptd.io import statefile

TMP_PREFIX = ".ckptd-tmp-"  # ckptd.api.freeze.TMP_PREFIX, spelled out: the tests are the spec
SAVED_MODEL_FILES = (
    "saved_model.pb",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
    "frozen.pb",
)

Database = Path | str  # a SQLite file, or a database server's SQLAlchemy URL
DATABASE_ERRORS = (sqlite3.Error, SQLAlchemyError)


def fetch(db: Database, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one read-only query (``:name`` parameters), on a connection of its own (a
    server's may have restarted since the last one)."""
    if isinstance(db, Path):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    engine = create_engine(db, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _json_list(value: Any) -> list[str]:
    """A JSON column as SQLite returns it (text) or PostgreSQL's driver does (parsed)."""
    if isinstance(value, list):
        return value
    return list(json.loads(value or "[]"))


def rows(db: Database) -> dict[str, tuple[str, str | None, list[str], str]]:
    """prefix -> (state, reason, recorded files, run directory)."""
    sql = (
        "select c.prefix, c.state, c.reason, c.files, r.path from checkpoints c "
        "join runs r on r.id = c.run_id"
    )
    return {p: (st, why, _json_list(files), run) for p, st, why, files, run in fetch(db, sql)}


def _index_exists(prefix: Path) -> bool:
    return prefix.with_name(prefix.name + ".index").exists()


def audit(
    db: Database,
    runs: list[Path],
    saves: list[dict[str, Any]],
    export_dir: Path | None = None,
    *,
    live: bool,
    relisted: bool | None = None,
    must_be_gone: Collection[Path] = (),
    corrupt: Collection[str] = (),
) -> list[str]:
    """Where the DB, the disk, the state files and the exports disagree (empty: they agree).

    ``live``: trainers may still be writing, so a checkpoint saved in the last seconds may not
    be recorded yet, a live TF2 CheckpointManager re-lists checkpoints ckptd pruned in the state
    file it rewrites at every save (it keeps its own list), and an export may be mid-flight.
    ``relisted`` (default: ``live``): tolerate state-file entries of checkpoints ckptd pruned,
    which a TF2 trainer wrote back (ckptd drops them at its next deletion or restart).
    ``corrupt``: prefixes that must be recorded corrupt, their files kept as evidence.
    """
    try:
        return _disagreements(
            db,
            runs,
            saves,
            export_dir,
            live=live,
            relisted=live if relisted is None else relisted,
            must_be_gone=must_be_gone,
            corrupt=corrupt,
        )
    except DATABASE_ERRORS as exc:
        return [f"cannot read the database: {exc}"]
    except OSError as exc:  # a file vanished between listing and looking (a prune, a retire)
        return [f"the disk changed during the audit: {exc}"]


def _disagreements(
    db: Database,
    runs: list[Path],
    saves: list[dict[str, Any]],
    export_dir: Path | None,
    *,
    live: bool,
    relisted: bool,
    must_be_gone: Collection[Path],
    corrupt: Collection[str],
) -> list[str]:
    # The database is read before and after the disk is looked at. A disagreement about a
    # checkpoint whose state changed in between is the daemon moving on, not an error: a prune
    # commits "pruning" before it unlinks, so a file missing from the listing under a row read as
    # complete is only a fault if the row still says complete afterwards.
    before = rows(db)
    listing = {run: set(os.listdir(run)) if run.is_dir() else set() for run in runs}
    for run in {r for _, _, _, r in before.values()}:
        if Path(run) not in listing:
            listing[Path(run)] = set(os.listdir(run)) if os.path.isdir(run) else set()
    exports = fetch(
        db,
        "select e.path, e.status, c.state from exports e join checkpoints c "
        "on c.id = e.checkpoint_id",
    )
    on_disk = export_entries(export_dir) if export_dir is not None else {}
    after = rows(db)
    exports_after = set(
        fetch(
            db,
            "select e.path, e.status, c.state from exports e join checkpoints c "
            "on c.id = e.checkpoint_id",
        )
    )
    problems = []

    def settled(prefix: str) -> bool:
        return before.get(prefix, ("",))[0] == after.get(prefix, ("",))[0]

    for s in saves:
        row = after.get(s["prefix"])
        if row is None:
            problems.append(f"saved but not recorded: {s['prefix']}")
        elif row[0] not in ("complete", "pruned"):
            problems.append(f"saved, recorded {row[0]} ({row[1]}): {s['prefix']}")
    for prefix, (state, reason, files, run) in before.items():
        if not settled(prefix):
            continue
        names = listing[Path(run)]
        present = {f for f in files if f in names}
        if prefix in corrupt:
            if state != "corrupt" or present != set(files):
                problems.append(f"{state} ({reason}), expected corrupt with its files: {prefix}")
        elif state == "complete":
            if present != set(files):
                problems.append(f"complete but {sorted(set(files) - present)} missing: {prefix}")
        elif state == "pruned":
            base = os.path.basename(prefix) + "."
            left = sorted(f for f in names if f.startswith(base))
            if not reason:
                problems.append(f"pruned without a reason: {prefix}")
            if left:
                problems.append(f"pruned but {left} remain: {prefix}")
        else:
            problems.append(f"{state} ({reason}): {prefix}")
    settle = time.time() - 10
    for run in runs:
        for name in sorted(listing[run]):
            if not name.endswith(".index"):
                continue
            prefix = str(run / name[: -len(".index")])
            try:
                prefix.encode("utf-8")
            except UnicodeEncodeError:
                continue  # a name that is not UTF-8: reported as unsupported, never recorded
            if prefix in after:
                continue
            if live and os.stat(run / name).st_mtime > settle:
                continue  # just saved; recorded within moments
            problems.append(f"on disk but not recorded: {prefix}")
        state = statefile.read(run)
        if state is None:
            continue
        if not state.model_checkpoint_path:
            # tf.train.latest_checkpoint and CheckpointManager() raise ValueError on it.
            problems.append(f"{run}/checkpoint: model_checkpoint_path is empty")
        elif not _index_exists(state.resolve(run, state.model_checkpoint_path)):
            problems.append(f"{run}/checkpoint: latest {state.model_checkpoint_path} is missing")
        for p in state.all_model_checkpoint_paths:
            resolved = state.resolve(run, p)
            if _index_exists(resolved):
                continue
            if relisted and after.get(str(resolved), ("",))[0] == "pruned":
                continue  # the trainer's CheckpointManager wrote it back
            problems.append(f"{run}/checkpoint lists a missing checkpoint {p}")
    if export_dir is None:
        return problems
    published: dict[str, list[str]] = {}
    for path, status, ckpt_state in exports:
        if status == "published":
            published.setdefault(path, []).append(ckpt_state)
    for path, states in published.items():
        if (path, "published", states[0]) not in exports_after:
            continue  # retired meanwhile
        if len(states) > 1:
            problems.append(f"{len(states)} published rows for {path}")
        if path not in on_disk:
            problems.append(f"published export {path} has no directory")
        if states[0] != "complete":
            problems.append(f"published export {path} is of a {states[0]} checkpoint")
    published_after = {path for path, status, _ in exports_after if status == "published"}
    for path, missing in on_disk.items():
        name = os.path.basename(path)
        if name.startswith(TMP_PREFIX):
            if Path(path) in must_be_gone:
                problems.append(f"temp export {path} survived a restart")
            elif not live:
                problems.append(f"temp export left behind: {path}")
        elif not name.isdigit():
            problems.append(f"unexpected entry in the export dir: {path}")
        elif path not in published_after:
            problems.append(f"export {path} has no published row")
        elif missing and path in published:
            problems.append(f"export {path} is incomplete: no {missing}")
    return problems


def export_entries(export_dir: Path) -> dict[str, list[str]]:
    """Every entry of each run's export directory -> the SavedModel files it lacks."""
    entries = {}
    for root in export_dir.iterdir() if export_dir.is_dir() else ():
        if not root.is_dir() or root.name.startswith(TMP_PREFIX):
            continue
        for entry in root.iterdir():
            entries[str(entry)] = [f for f in SAVED_MODEL_FILES if not (entry / f).is_file()]
    return entries


def converge(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """Re-check until nothing disagrees (bounded); returns what still disagrees."""
    deadline = time.monotonic() + timeout
    problems = check()
    while problems and time.monotonic() < deadline:
        time.sleep(0.5)
        problems = check()
    return problems


def show(problems: list[str], what: str) -> str:
    head = "\n  ".join(problems[:25])
    more = f"\n  … and {len(problems) - 25} more" if len(problems) > 25 else ""
    return f"{what}: {len(problems)} disagreement(s):\n  {head}{more}"


def count_lost(db: Database, saves: list[dict[str, Any]]) -> int:
    """Saves that are neither complete with all their files nor pruned with a reason."""
    recorded = rows(db)
    count = 0
    for s in saves:
        row = recorded.get(s["prefix"])
        if row is None:
            count += 1
            continue
        state, reason, files, run = row
        whole = all(os.path.exists(os.path.join(run, f)) for f in files)
        if not ((state == "complete" and whole) or (state == "pruned" and reason)):
            count += 1
    return count
