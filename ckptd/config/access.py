"""Whether the object stores a config names can be used: each bucket exists, the credentials
work, the server answers. Checked by ``ckptd config check`` and at ``ckptd run``/reload (not by
every command that reads the config: that would cost each of them a request per watch)."""

from __future__ import annotations

from ckptd.config.schema import Config, ConfigError, Problem

# A start-up (or SIGHUP) check: a server that is down fails in about a second, one that
# accepts and never answers within half a minute, inside systemd's WatchdogSec=60.
CHECK_ATTEMPTS = 2
CHECK_TIMEOUTS = (5.0, 10.0)  # seconds to connect, to wait for a read


def object_store_problems(config: Config) -> list[Problem]:
    """One problem per object store location (watch path, export_dir) that cannot be used."""
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
                problems.append(Problem(config.source, key, f"{err.kind}: {err.message}"))
    return problems


def check_object_stores(config: Config) -> None:
    """Raise a ConfigError (exit 78) naming every object store location that cannot be used."""
    problems = object_store_problems(config)
    if problems:
        first, *more = problems
        raise ConfigError(first.source, first.key, first.message, more=more)
