"""Whether the object stores a config names can be used: each bucket exists, the credentials
work, the server answers. Checked by ``ckptd config check`` and at ``ckptd run``/reload (not by
every command that reads the config: that would cost each of them a request per watch)."""

from __future__ import annotations

import logging

from ckptd.config.schema import Config, ConfigError, Problem

log = logging.getLogger(__name__)

# A start-up (or SIGHUP) check: a server that is down fails in about a second, one that
# accepts and never answers within half a minute, inside systemd's WatchdogSec=60.
CHECK_ATTEMPTS = 2
CHECK_TIMEOUTS = (5.0, 10.0)  # seconds to connect, to wait for a read


# Failures that say nothing about the config: the server is down, slow or overloaded now.
TRANSIENT = ("unreachable", "throttled", "server error", "truncated")


def object_store_problems(config: Config, *, transient: bool = True) -> list[Problem]:
    """One problem per object store location (watch path, export_dir) that cannot be used;
    with ``transient=False``, a failure of the moment (``TRANSIENT``) is logged, not returned."""
    # Imported here: the commands that only read the config do not pay for it.
    from ckptd.io.objstore import Retry, StoreError, open_store

    retry = Retry(attempts=CHECK_ATTEMPTS, base=0.5, cap=1.0)
    problems: list[Problem] = []
    for i, w in enumerate(config.watches):
        places = [(f"watch[{i}].path", w.path)]
        if w.freeze is not None:
            places.append((f"watch[{i}].freeze.export_dir", w.freeze.export_dir))
        for key, place in places:
            if not isinstance(place, str):
                continue  # a local path
            try:
                store = open_store(
                    place, endpoint_url=w.endpoint_url, retry=retry, timeouts=CHECK_TIMEOUTS
                )
                store.check_access()
            except StoreError as err:
                if not transient and err.kind in TRANSIENT:
                    log.warning("%s: %s: %s (polling goes on with backoff)", key, err.kind, err)
                    continue
                problems.append(Problem(config.source, key, f"{err.kind}: {err.message}"))
    return problems


def check_object_stores(config: Config, *, transient: bool = True) -> None:
    """Raise a ConfigError (exit 78) naming every object store location that cannot be used.

    ``ckptd run`` and a reload pass ``transient=False``: a server down or throttled at start is
    not a config error (systemd does not restart a unit that exits 78), so the daemon starts,
    says so, and its poller backs off until the store answers; wrong credentials or a missing
    bucket still stop it."""
    problems = object_store_problems(config, transient=transient)
    if problems:
        first, *more = problems
        raise ConfigError(first.source, first.key, first.message, more=more)
