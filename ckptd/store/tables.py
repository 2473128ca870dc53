"""The tables, as SQLAlchemy Core ``Table`` objects (no ORM: importing it is slow, and rows are
only ever read and written with Core statements). The schema is owned by Alembic
(``migrations/``); a test checks they agree."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
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


metadata = MetaData(naming_convention=NAMING)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(1024), nullable=False),
    Column("path", String(4096), unique=True, nullable=False),
    Column("watch_path", String(4096), nullable=False),
    Column("present", Boolean, default=True, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("scanned_at", DateTime),
    # Bumped by every writer of the run's rows: writes conditional on it never apply a stale view.
    Column("version", Integer, server_default=text("0"), nullable=False),
    # When each incarnation after the first began (POSIX seconds; NULL: one so far).
    Column("incarnation_starts", JSON),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("prefix", String(4096), nullable=False),
    Column("step", Int64),
    Column("format", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("size_bytes", Int64, default=0, nullable=False),
    Column("files", JSON, default=list, nullable=False),
    Column("has_meta", Boolean, default=False, nullable=False),
    Column("signature", JSON, default=list, nullable=False),
    Column("created_at", DateTime),
    Column("recorded_at", DateTime, nullable=False),
    Column("completed_at", DateTime),
    Column("gone_at", DateTime),
    Column("incarnation", Integer, server_default=text("1"), nullable=False),
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

# How many checkpoints a run has in a state: kept by triggers on ``checkpoints``
# (store/count_triggers.py, migration 0010), so `status` and the heartbeat read a row per run
# and state instead of counting every checkpoint.
checkpoint_counts = Table(
    "checkpoint_counts",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("state", String(16), primary_key=True),
    Column("n", Int64, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "checkpoint_id", Integer, ForeignKey("checkpoints.id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", String(512), nullable=False),
    Column("value", Float),
    Column("step", Int64),
    Column("source", String(32), nullable=False),  # tfevents | evaluator | filename
    Column("recorded_at", DateTime, nullable=False),
    UniqueConstraint("checkpoint_id", "name", "source", name="uq_metrics_checkpoint_name_source"),
)

# Every scalar from a run's event files, so a checkpoint recorded later finds its value.
scalars = Table(
    "scalars",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(512), primary_key=True),
    Column("step", Int64, primary_key=True),
    Column("value", Float),
    Column("wall_time", Float, nullable=False),
    # When the event file that logged it was created: decides its incarnation (migration 0004).
    Column("born", Float, primary_key=True, server_default=text("0")),
)

event_files = Table(
    "event_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("path", String(4096), unique=True, nullable=False),
    Column("offset", Int64, default=0, nullable=False),
    Column("error", Text),
    Column("updated_at", DateTime, nullable=False),
)

evaluations = Table(
    "evaluations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "checkpoint_id",
        Integer,
        ForeignKey("checkpoints.id", ondelete="CASCADE"),
        unique=True,
        nullable=False,
    ),
    Column("status", String(16), nullable=False),  # pending | running | done | failed
    Column("attempts", Integer, default=0, nullable=False),
    Column("error", Text),
    Column("duration_s", Float),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("next_attempt_at", DateTime),
    Column("claimed_by", String(255)),  # while running: who
    Column("claimed_until", DateTime),  # ... and until when
)

exports = Table(
    "exports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "checkpoint_id", Integer, ForeignKey("checkpoints.id", ondelete="CASCADE"), nullable=False
    ),
    Column("format", String(32), nullable=False),
    # The serving version (its directory's name): higher than every earlier one of its export
    # root, so TF Serving serves the newest publish (migration 0005; before it, the step).
    Column("version", Int64, nullable=False),
    Column("path", String(4096), nullable=False),
    Column("status", String(16), nullable=False),  # exporting | published | failed | removed
    Column("verified", Boolean, default=False, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime, nullable=False),
    Column("removed_at", DateTime),
    Column("step", Int64),  # of the checkpoint exported
    Column("metric", String(512)),  # [watch.best] metric, and its
    Column("metric_value", Float),  # value at export time
    Column("attempt", Integer),  # of this checkpoint's export
    # failed: when the daemon tries again (NULL: it gave up); as evaluations
    Column("next_attempt_at", DateTime),
)

# A per-run job (prune, freeze) held by one process until ``claimed_until``.
run_claims = Table(
    "run_claims",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("job", String(16), primary_key=True),
    Column("claimed_by", String(255), nullable=False),
    Column("claimed_until", DateTime, nullable=False),
)

# Which daemon acts on a run: ``owner`` until ``expires_at`` (the database's clock), with an
# ``epoch`` that grows at every change of holder; writes for the run check it (fencing).
run_leases = Table(
    "run_leases",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Index("ix_run_leases_owner", "owner"),
)

# Work the CLI hands to a running daemon (``ckptd evaluate``/``freeze``), claimed by it.
requests = Table(
    "requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # evaluate | freeze
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("checkpoint_id", Integer, ForeignKey("checkpoints.id", ondelete="CASCADE")),
    Column("options", JSON, default=dict, nullable=False),  # again, force
    Column("status", String(16), nullable=False),  # pending | running | done | cancelled
    Column("requested_by", String(255), nullable=False),
    Column("requested_at", DateTime, nullable=False),
    Column("claimed_by", String(255)),
    Column("claimed_until", DateTime),
    Column("result", JSON),  # progress, then the outcome
    Column("error", Text),  # why the daemon could not do it
    Column("finished_at", DateTime),
    Index("ix_requests_status", "status"),
)

pins = Table(
    "pins",
    metadata,
    Column(
        "checkpoint_id", Integer, ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("reason", Text),
    Column("created_at", DateTime, nullable=False),
)

# Audit log: what ckptd did, to what, why, when.
actions = Table(
    "actions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime, index=True, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="SET NULL")),
    Column("checkpoint_id", Integer, ForeignKey("checkpoints.id", ondelete="SET NULL")),
    Column("subject", Text),
    Column("reason", Text),
    Column("detail", JSON, default=dict, nullable=False),
)

daemons = Table(
    "daemons",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(32), nullable=False),
    Column("config", Text, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("stopped_at", DateTime),
    Column("status", JSON, default=dict, nullable=False),
    # Last, where migration 0008 adds it; NULL for a daemon started before 0008.
    Column("name", String(255)),
    # "daemon" (watches, records, acts) or "worker" (``ckptd worker``: evaluates and exports).
    Column("role", String(16), server_default="daemon", nullable=False),
)


@event.listens_for(metadata, "after_create")
def _install_count_triggers(_metadata: MetaData, connection: Any, **_kw: Any) -> None:
    """``create_all`` builds what the migrations build: the triggers of migration 0010 too."""
    count_triggers.install(connection)
