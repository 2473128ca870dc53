"""Run leases: which daemon acts on a run (DESIGN v2, "Many daemons on one PostgreSQL").

A lease row ``(run_id, owner, epoch, expires_at)`` is claimed, renewed and released with the
database's clock, never a host's: a lease whose ``expires_at`` has passed may be taken over by
anyone, with ``epoch + 1``. Every write for a run checks the holder's epoch in its own
transaction (:func:`fence`), so a daemon that was paused past its lease writes nothing.
Statements are batched: one upsert per scan of runs not held, one UPDATE per renewal round.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, and_, case, func, literal, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from ckptd.store import tables
from ckptd.store.handle import Store
from ckptd.store.upsert import _dialect_insert

_leases = tables.run_leases
_runs = tables.runs
_CHUNK = 500  # run ids per IN (...)


class db_now(FunctionElement[datetime]):
    """The database's UTC time plus ``seconds`` (naive, as every DateTime column here)."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds)))


@compiles(db_now, "sqlite")
def _sqlite_now(element: db_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    # Microseconds, as SQLAlchemy stores datetimes: compared as text against stored values.
    return (
        "strftime('%Y-%m-%d %H:%M:%f000', 'now', "
        f"({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(db_now)
def _default_now(element: db_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    return (
        "(CURRENT_TIMESTAMP AT TIME ZONE 'UTC' + "
        f"CAST({compiler.process(seconds, **kw)} AS DOUBLE PRECISION) * INTERVAL '1 second')"
    )


@dataclass(frozen=True)
class Hold:
    """A lease this daemon holds: writes for ``run_id`` carry ``owner`` and ``epoch``."""

    run_id: int
    owner: str
    epoch: int


@dataclass(frozen=True)
class Held:
    """What ``status`` shows of one daemon's leases: how many runs, the soonest expiry."""

    runs: int
    expires_at: datetime


def _chunks(ids: Collection[int]) -> Iterator[list[int]]:
    ordered = sorted(ids)
    for i in range(0, len(ordered), _CHUNK):
        yield ordered[i : i + _CHUNK]


def claim(store: Store, owner: str, run_ids: Collection[int], ttl: float) -> dict[int, int]:
    """Take the leases of ``run_ids`` that nobody holds (absent or expired); returns the epochs
    of those ``owner`` now holds (including any it held already, extended). One INSERT … ON
    CONFLICT DO UPDATE per chunk: two daemons claiming one run at once never collide, the
    second sees the first's row and leaves it (the WHERE of the update is false)."""
    expired = _leases.c.expires_at <= db_now()
    held: dict[int, int] = {}
    for chunk in _chunks(run_ids):
        with store.session() as s:
            if store.dialect == "postgresql":
                chunk = _not_locked(s, chunk)
            held.update(_claim_chunk(s, store.dialect, owner, chunk, ttl, expired))
    return held


def _not_locked(conn: Any, chunk: list[int]) -> list[int]:
    """The runs of ``chunk`` whose lease row no other transaction has locked (locked now for
    this one, in run id order), or that have none yet. A lease row is locked by its holder's
    write in flight (:func:`fence`): waiting for it would stall this daemon's claims behind one
    paused process; that run is claimed at a later scan instead."""
    in_chunk = _leases.c.run_id.in_(chunk)
    lockable = select(_leases.c.run_id).where(in_chunk).order_by(_leases.c.run_id)
    free = set(conn.scalars(lockable.with_for_update(skip_locked=True)))
    present = set(conn.scalars(select(_leases.c.run_id).where(in_chunk)))
    return [r for r in chunk if r in free or r not in present]


def _claim_chunk(
    conn: Any, dialect: str, owner: str, chunk: list[int], ttl: float, expired: Any
) -> dict[int, int]:
    if not chunk:
        return {}
    rows = select(_runs.c.id, literal(owner), literal(1), db_now(ttl)).where(_runs.c.id.in_(chunk))
    stmt = _dialect_insert(dialect)(_leases).from_select(
        ["run_id", "owner", "epoch", "expires_at"], rows
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id"],
        set_={
            "owner": stmt.excluded.owner,
            "epoch": case((expired, _leases.c.epoch + 1), else_=_leases.c.epoch),
            "expires_at": stmt.excluded.expires_at,
        },
        where=or_(expired, _leases.c.owner == owner),
    ).returning(_leases.c.run_id, _leases.c.epoch)
    return {r.run_id: r.epoch for r in conn.execute(stmt)}


def adopt(store: Store, owner: str, ttl: float) -> dict[int, int]:
    """At start: the leases a previous daemon of the same name left (it is dead: names are
    exclusive among live daemons), taken over at once with a new epoch."""
    with store.session() as s:
        rows = s.execute(
            update(_leases)
            .where(_leases.c.owner == owner)
            .values(epoch=_leases.c.epoch + 1, expires_at=db_now(ttl))
            .returning(_leases.c.run_id, _leases.c.epoch)
        )
        return {r.run_id: r.epoch for r in rows}


def renew(store: Store, owner: str, held: Mapping[int, int], ttl: float) -> dict[int, int]:
    """Extend every live lease of ``owner`` (one UPDATE); returns those of ``held`` still held
    at the same epoch. A lease that expired meanwhile is not renewed: it is claimed again."""
    live = and_(_leases.c.owner == owner, _leases.c.expires_at > db_now())
    with store.session() as s:
        if store.dialect == "postgresql":
            # Lock the rows in run id order first, as a prune's fences do (pruning.mark_pruning):
            # an UPDATE locks them in whatever order it scans, and two orders deadlock.
            s.execute(
                select(_leases.c.run_id).where(live).order_by(_leases.c.run_id).with_for_update()
            )
        rows = s.execute(
            update(_leases)
            .where(live)
            .values(expires_at=db_now(ttl))
            .returning(_leases.c.run_id, _leases.c.epoch)
        )
        now = {r.run_id: r.epoch for r in rows}
    return {run: epoch for run, epoch in held.items() if now.get(run) == epoch}


def release(store: Store, owner: str) -> None:
    """Give up every lease of ``owner`` (a clean stop): the others may take them over now."""
    with store.session() as s:
        s.execute(
            update(_leases)
            .where(_leases.c.owner == owner, _leases.c.expires_at > db_now())
            .values(expires_at=db_now())
        )


class Fenced(Exception):
    """A write for a run whose lease this daemon no longer holds (rolled back)."""


def fence(conn: Any, hold: Hold) -> None:
    """Inside a write's transaction: raise :class:`Fenced` unless ``hold`` is still the run's
    live lease, so the write rolls back (another daemon holds the run now). The no-op UPDATE
    also locks the lease row until the write commits, so no takeover can slip in between."""
    if not still_held(conn, hold):
        raise Fenced(f"run {hold.run_id}: lease epoch {hold.epoch} of {hold.owner} is gone")


def still_held(conn: Any, hold: Hold) -> bool:
    """:func:`fence` without the exception: whether ``hold`` is still the run's live lease (its
    row then locked until the transaction ends), for a write that goes on for its other runs."""
    result = conn.execute(
        update(_leases)
        .where(
            and_(
                _leases.c.run_id == hold.run_id,
                _leases.c.owner == hold.owner,
                _leases.c.epoch == hold.epoch,
                _leases.c.expires_at > db_now(),
            )
        )
        .values(epoch=_leases.c.epoch)
    )
    return bool(result.rowcount == 1)


def held_by_owner(conn: Any) -> dict[str, Held]:
    """The live leases of each daemon, by name (one grouped SELECT, in the caller's
    transaction)."""
    rows = conn.execute(
        select(_leases.c.owner, func.count(), func.min(_leases.c.expires_at))
        .where(_leases.c.expires_at > db_now())
        .group_by(_leases.c.owner)
    )
    return {owner: Held(int(n), soonest) for owner, n, soonest in rows}
