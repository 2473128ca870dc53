"""PostgreSQL for the benchmarks: the test suite's throwaway cluster (tests/pg.py, loaded from
its file so that there is one copy of it), started once per benchmark and stopped at its end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _common import REPO


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("ckptd_tests_pg", REPO / "tests" / "pg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pg = _load()


def unavailable() -> str | None:
    """Why no cluster can be started here (printed, and the PostgreSQL part skipped), or None."""
    return pg.unavailable()  # type: ignore[no-any-return]


@contextmanager
def cluster(*options: str) -> Iterator[Any]:
    """A started cluster (tests/pg.py's ``Cluster``: ``new_database()`` gives a fresh database's
    URL); ``options``: more ``-c name=value`` server settings."""
    c = pg.start(extra_options=" ".join(options))
    try:
        yield c
    finally:
        c.stop()


def server_cpu(c: Any) -> float:
    """CPU seconds (user + system) the cluster ``c``'s server has used so far: the postmaster,
    its live processes, and those that have exited (a client's backend ends with its session)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        if str(c.root) in " ".join(proc.info["cmdline"] or []):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    ct = child.cpu_times()
                    total += ct.user + ct.system
    return total
