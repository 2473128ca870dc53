"""Optional Prometheus endpoint (``[daemon] metrics_address``), with prometheus-client.

Every function is a no-op until :func:`serve` has run, so the rest of the daemon calls them
unconditionally and pays nothing when metrics are off.
"""

from __future__ import annotations

import logging
from typing import Any

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
