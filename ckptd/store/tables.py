"""ORM rows. The schema is owned by Alembic (``migrations/``); a test checks they agree."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement

from ckptd.store import count_triggers

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Steps, sizes and offsets are 64-bit (a step or a file past 2**31 is ordinary): BIGINT on
# PostgreSQL, INTEGER on SQLite (already 64-bit; a different name would be a schema change).
Int64 = BigInteger().with_variant(Integer(), "sqlite")

# The rows that are not history: what a prefix names (see ux_checkpoints_live_prefix).
LIVE = text("state != 'replaced'")


class json_text(FunctionElement[str]):
    """A JSON column read as its text, so that many rows decode in one ``json.loads``: SQLite
    stores the text itself; PostgreSQL's driver would decode a ``json`` value row by row."""

    type = Text()
    inherit_cache = True


@compiles(json_text)
def _json_text(element: json_text, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(json_text, "postgresql")
def _json_text_pg(element: json_text, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS TEXT)"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(1024))
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    watch_path: Mapped[str] = mapped_column(String(4096))
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    scanned_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Bumped by every writer of the run's rows: writes conditional on it never apply a stale view.
    version: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # When each incarnation after the first began (POSIX seconds; NULL: one so far).
    incarnation_starts: Mapped[list[float] | None] = mapped_column(JSON)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_run_step", "run_id", "step"),
        Index("ix_checkpoints_state", "state"),
        # Covers `status`'s per-run counts by state and newest step (migration 0002).
        Index("ix_checkpoints_run_state_step", "run_id", "state", "step"),
        # A prefix names one live row; versions written before it under that name are
        # ``replaced`` (migration 0004). Queries by prefix say LIVE too, to use this index.
        Index(
            "ux_checkpoints_live_prefix",
            "prefix",
            unique=True,
            sqlite_where=LIVE,
            postgresql_where=LIVE,
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(4096))
    step: Mapped[int | None] = mapped_column(Int64)
    format: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Int64, default=0)
    files: Mapped[list[str]] = mapped_column(JSON, default=list)
    has_meta: Mapped[bool] = mapped_column(Boolean, default=False)
    signature: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime | None] = mapped_column(DateTime)
    recorded_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    gone_at: Mapped[datetime | None] = mapped_column(DateTime)
    incarnation: Mapped[int] = mapped_column(Integer, server_default=text("1"))


class CheckpointCountRow(Base):
    """How many checkpoints a run has in a state: kept by triggers on ``checkpoints``
    (store/count_triggers.py, migration 0010), so `status` and the heartbeat read a row per
    run and state instead of counting every checkpoint."""

    __tablename__ = "checkpoint_counts"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(Int64)


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint(
            "checkpoint_id", "name", "source", name="uq_metrics_checkpoint_name_source"
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(512))
    value: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Int64)
    source: Mapped[str] = mapped_column(String(32))  # tfevents | evaluator | filename
    recorded_at: Mapped[datetime] = mapped_column(DateTime)


class ScalarRow(Base):
    """Every scalar from a run's event files, so a checkpoint recorded later finds its value."""

    __tablename__ = "scalars"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    step: Mapped[int] = mapped_column(Int64, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)
    wall_time: Mapped[float] = mapped_column(Float)
    # When the event file that logged it was created: decides its incarnation (migration 0004).
    born: Mapped[float] = mapped_column(Float, primary_key=True, server_default=text("0"))


class EventFileRow(Base):
    __tablename__ = "event_files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    offset: Mapped[int] = mapped_column(Int64, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), unique=True
    )
    status: Mapped[str] = mapped_column(String(16))  # pending | running | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(255))  # while running: who
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime)  # ... and until when


class ExportRow(Base):
    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(32))
    # The serving version (its directory's name): higher than every earlier one of its export
    # root, so TF Serving serves the newest publish (migration 0005; before it, the step).
    version: Mapped[int] = mapped_column(Int64)
    path: Mapped[str] = mapped_column(String(4096))
    status: Mapped[str] = mapped_column(String(16))  # exporting | published | failed | removed
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime)
    step: Mapped[int | None] = mapped_column(Int64)  # of the checkpoint exported
    metric: Mapped[str | None] = mapped_column(String(512))  # [watch.best] metric, and its
    metric_value: Mapped[float | None] = mapped_column(Float)  # value at export time
    attempt: Mapped[int | None] = mapped_column(Integer)  # of this checkpoint's export
    # failed: when the daemon tries again (NULL: it gave up); as evaluations
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)


class RunClaimRow(Base):
    """A per-run job (prune, freeze) held by one process until ``claimed_until``."""

    __tablename__ = "run_claims"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    job: Mapped[str] = mapped_column(String(16), primary_key=True)
    claimed_by: Mapped[str] = mapped_column(String(255))
    claimed_until: Mapped[datetime] = mapped_column(DateTime)


class RunLeaseRow(Base):
    """Which daemon acts on a run: ``owner`` until ``expires_at`` (the database's clock), with
    an ``epoch`` that grows at every change of holder; writes for the run check it (fencing)."""

    __tablename__ = "run_leases"
    __table_args__ = (Index("ix_run_leases_owner", "owner"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class RequestRow(Base):
    """Work the CLI hands to a running daemon (``ckptd evaluate``/``freeze``), claimed by it."""

    __tablename__ = "requests"
    __table_args__ = (Index("ix_requests_status", "status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # evaluate | freeze
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE")
    )
    options: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)  # again, force
    status: Mapped[str] = mapped_column(String(16))  # pending | running | done | cancelled
    requested_by: Mapped[str] = mapped_column(String(255))
    requested_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime)
    result: Mapped[dict[str, object] | None] = mapped_column(JSON)  # progress, then the outcome
    error: Mapped[str | None] = mapped_column(Text)  # why the daemon could not do it
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class PinRow(Base):
    __tablename__ = "pins"
    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ActionRow(Base):
    """Audit log: what ckptd did, to what, why, when."""

    __tablename__ = "actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL")
    )
    subject: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


class DaemonRow(Base):
    __tablename__ = "daemons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    config: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    # Last, where migration 0008 adds it; NULL for a daemon started before 0008.
    name: Mapped[str | None] = mapped_column(String(255))
    # "daemon" (watches, records, acts) or "worker" (``ckptd worker``: evaluates and exports).
    role: Mapped[str] = mapped_column(String(16), server_default="daemon")


@event.listens_for(Base.metadata, "after_create")
def _install_count_triggers(_metadata: MetaData, connection: Any, **_kw: Any) -> None:
    """``create_all`` builds what the migrations build: the triggers of migration 0010 too."""
    count_triggers.install(connection)


def table_of(row: type[Base]) -> Table:
    """The Core table of an ORM row class (for bulk executemany without ORM overhead)."""
    return cast(Table, row.__table__)
