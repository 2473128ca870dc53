"""Cold start: the backfill's first looks at runs, begun before the daemon loads its database layer.

On a database that has recorded no run yet, observing a run needs nothing from the database (every
request is a first look), so ``ckptd run`` starts those observations in worker processes first
thing, and they proceed while this process imports SQLAlchemy and the daemon. The
backfill takes them over only if it asks for exactly these runs and the database, once read,
holds nothing for any of them (``api.record.Recorder.observe_all``); otherwise they are dropped
and the runs observed as usual. Standard library only here: importing SQLAlchemy is what this
overlaps.
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote

from ckptd.config import Config
from ckptd.daemon import runs as runs_mod
from ckptd.io import observe
from ckptd.store.urls import sqlite_path  # standard library only, like this module


def knows_no_run(url: str) -> bool:
    """Whether ``url`` is a SQLite database with no run recorded, or none yet. Any other
    database, or any doubt: False (then nothing is started early)."""
    path = sqlite_path(url)
    if path is None:
        return False
    if not os.path.exists(path):
        return True
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return False
    try:
        return conn.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is None
    except sqlite3.OperationalError as exc:
        return "no such table" in str(exc)  # created but never migrated
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def start(config: Config, workers: int) -> observe.ObservePool | None:
    """Observations of every run the config names, in worker processes, when the database knows
    no run yet and there are enough runs to be worth it; else None."""
    if workers <= 1 or not knows_no_run(config.daemon.database):
        return None
    specs = [
        s
        for i, w in enumerate(runs_mod.local_only(config, quiet=True).watches)
        for s in runs_mod.discover(i, w)
    ]
    if len(specs) < observe.PARALLEL_MIN_RUNS:
        return None
    requests = [
        observe.Request.first_look(
            s.path,
            s.watch.keras_template,
            observe.STALE_AFTER,
            s.watch.local_path,
            s.watch.step_variable,
        )
        for s in specs
    ]
    return observe.ObservePool(requests, workers)
