"""Optional Prometheus endpoint (``[daemon] metrics_address``), with prometheus-client.

Every function is a no-op until :func:`serve` has run, so the rest of the daemon calls them
unconditionally and pays nothing when metrics are off.
"""

from __future__ import annotations

import logging
from datetime import UTC
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptd.api.status import Cluster

log = logging.getLogger(__name__)

_m: dict[str, Any] = {}


def serve(address: str) -> None:
    """Start the HTTP endpoint on ``host:port`` and create the metrics."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    _m["registry"] = registry
    _m["checkpoints"] = Gauge(
        "ckptd_checkpoints", "Checkpoints by state", ["state"], registry=registry
    )
    _m["latency"] = Histogram(
        "ckptd_detection_latency_seconds",
        "From the checkpoint's last file write to its row being committed",
        buckets=(0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
        registry=registry,
    )
    _m["evaluations"] = Counter(
        "ckptd_evaluations_total", "Evaluations by outcome", ["outcome"], registry=registry
    )
    _m["evaluation_seconds"] = Histogram(
        "ckptd_evaluation_seconds", "Evaluation duration", registry=registry
    )
    _m["exports"] = Counter(
        "ckptd_exports_total", "Exports by outcome", ["outcome"], registry=registry
    )
    _m["export_seconds"] = Histogram(
        "ckptd_export_seconds", "Export + verification duration", registry=registry
    )
    _m["freed"] = Counter("ckptd_pruned_bytes_total", "Bytes freed by pruning", registry=registry)
    _m["pruned"] = Counter(
        "ckptd_pruned_checkpoints_total", "Checkpoints pruned", registry=registry
    )
    _m["job"] = Gauge(
        "ckptd_job_last_success_timestamp_seconds",
        "Last successful run of each job",
        ["job"],
        registry=registry,
    )
    _m["database_up"] = Gauge(
        "ckptd_database_up",
        "1 while the database answers this daemon, 0 while it is unreachable",
        registry=registry,
    )
    _m["database_up"].set(1)
    _m["members"] = Gauge(
        "ckptd_cluster_members",
        "Daemons and workers on the database (state: alive, stale or unresponsive)",
        ["role", "name", "host", "state"],
        registry=registry,
    )
    _m["heartbeat_age"] = Gauge(
        "ckptd_heartbeat_age_seconds",
        "Seconds since each daemon's and worker's last heartbeat",
        ["role", "name"],
        registry=registry,
    )
    _m["runs_held"] = Gauge(
        "ckptd_runs_held", "Runs whose lease each daemon holds", ["daemon"], registry=registry
    )
    _m["lease_expiry"] = Gauge(
        "ckptd_lease_expiry_timestamp_seconds",
        "When the soonest lease of each daemon expires unless renewed",
        ["daemon"],
        registry=registry,
    )
    _m["worker_jobs"] = Gauge(
        "ckptd_worker_jobs", "Jobs each worker has in flight", ["name"], registry=registry
    )
    _m["object_store_requests"] = Counter(
        "ckptd_object_store_requests",
        "Requests made to each object store watch (LIST, GET, PUT, DELETE)",
        ["watch"],
        registry=registry,
    )
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    log.info("serving Prometheus metrics on http://%s/metrics", address)


def enabled() -> bool:
    return bool(_m)


def checkpoints(counts: dict[str, int]) -> None:
    if _m:
        for state, n in counts.items():
            _m["checkpoints"].labels(state).set(n)


def detection_latency(seconds: list[float]) -> None:
    if _m:
        for s in seconds:
            _m["latency"].observe(max(s, 0.0))


def object_store_requests(watch: str, n: int) -> None:
    if _m and n > 0:
        _m["object_store_requests"].labels(watch).inc(n)


def evaluation(outcome: str, seconds: float) -> None:
    if _m:
        _m["evaluations"].labels(outcome).inc()
        _m["evaluation_seconds"].observe(seconds)


def export(outcome: str, seconds: float) -> None:
    if _m:
        _m["exports"].labels(outcome).inc()
        _m["export_seconds"].observe(seconds)


def pruned(count: int, freed: int) -> None:
    if _m:
        _m["pruned"].inc(count)
        _m["freed"].inc(freed)


def job_succeeded(name: str, when: float) -> None:
    if _m:
        _m["job"].labels(name).set(when)


def database_up(up: bool) -> None:
    if _m:
        _m["database_up"].set(1 if up else 0)


def cluster(view: Cluster) -> None:
    """Every daemon and worker on the database, as the last heartbeat read them (members gone
    since leave the metrics)."""
    if not _m:
        return
    for name in ("members", "heartbeat_age", "runs_held", "lease_expiry", "worker_jobs"):
        _m[name].clear()
    for role, items in (("daemon", view.daemons), ("worker", view.workers)):
        for m in items:
            state = "alive" if m.alive else "unresponsive" if m.unresponsive else "stale"
            _m["members"].labels(role, m.name, m.host, state).set(1)
            _m["heartbeat_age"].labels(role, m.name).set(m.heartbeat_age)
    for d in view.daemons:
        _m["runs_held"].labels(d.name).set(d.runs_held)
        if d.lease_expires_at is not None:
            _m["lease_expiry"].labels(d.name).set(
                d.lease_expires_at.replace(tzinfo=UTC).timestamp()
            )
    for w in view.workers:
        _m["worker_jobs"].labels(w.name).set(len(w.jobs))
