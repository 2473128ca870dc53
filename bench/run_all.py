"""Run every ckptd benchmark (each prints its own report), then one combined summary table.

Usage: .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]
The summary is read back from bench/results/<name>.json, written by each benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import BENCH, ENV, PY, RESULTS, RUN_CWD, fmt, fmt_ratio, print_table, save_result

# name: (script, its arguments, the result file it writes)
BENCHMARKS: dict[str, tuple[str, list[str], str]] = {
    "detection_latency": ("detection_latency", [], "detection_latency"),
    "backfill": ("backfill", [], "backfill"),  # SQLite and PostgreSQL side by side
    "footprint": ("footprint", [], "footprint"),
    "status_1m": (
        "footprint",
        ["--only", "status", "--checkpoints", "1000000", "--database", "both"],
        "footprint-status-1000k",
    ),
    "failover": ("failover", [], "failover"),
    "lease_overhead": ("lease_overhead", [], "lease_overhead"),
    "eval_throughput": ("eval_throughput", [], "eval_throughput"),
    "freeze": ("freeze", [], "freeze"),
    "prune": ("prune", [], "prune"),
    "objstore_detect": ("objstore_detect", [], "objstore_detect"),  # SeaweedFS S3
    "objstore_idle": ("objstore_idle", [], "objstore_idle"),
    "objstore_backfill": ("objstore_backfill", [], "objstore_backfill"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="forwarded: smaller runs")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)

    status: dict[str, dict[str, object]] = {}
    for name in names:
        script, extra, _ = BENCHMARKS[name]
        cmd = [PY, str(BENCH / f"{script}.py"), *extra] + (["--quick"] if args.quick else [])
        print(f"\n{'=' * 30} {name}{' --quick' if args.quick else ''} {'=' * 30}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env=ENV, cwd=RUN_CWD)
        status[name] = {"exit": code, "seconds": time.perf_counter() - t0}

    rows = []
    summary = []
    for name in names:
        path = RESULTS / f"{BENCHMARKS[name][2]}.json"
        if status[name]["exit"] != 0 or not path.exists():
            rows.append([name, "FAILED", "", "", "", "", "", f"exit {status[name]['exit']}"])
            continue
        result = json.loads(path.read_text())
        for row in result.get("summary", []):
            summary.append({"benchmark": name, **row})
            unit = row["unit"]
            rows.append(
                [
                    row["metric"],
                    unit,
                    fmt(row["ckptd"], 3 if unit == "s" else 1),
                    fmt(row["anchor"], 3 if unit == "s" else 1),
                    fmt_ratio(row["ratio"]),
                    row["ratio_label"],
                    row["target"],
                    "-" if row["met"] is None else ("met" if row["met"] else "MISSED"),
                ]
            )
    print(f"\n{'=' * 30} summary{' (quick)' if args.quick else ''} {'=' * 30}")
    print_table(
        ["metric", "unit", "ckptd", "anchor", "ratio", "ratio is", "target", "target met"], rows
    )
    print()
    for name in names:
        s = status[name]
        print(f"{name}: exit {s['exit']}, {s['seconds']:.0f} s")
    save_result("run_all", {"quick": args.quick, "status": status, "summary": summary})
    return 0 if all(s["exit"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
