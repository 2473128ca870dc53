"""Lease overhead: what idle daemons sharing one PostgreSQL cost it and themselves.

Three real ``ckptd run`` daemons (names ``d0``..``d2``) on one PostgreSQL database (a throwaway
local cluster, tests/pg.py, with pg_stat_statements loaded), each watching 1,000 runs of its
own (one real TF1 checkpoint each, hard-linked: one daemon per training host) — or, with
``--shared``, all three watching the same 1,000 runs (an NFS share: one holds each run, the
others stand by). Default ``lease_ttl`` (30 s: every lease renewed every 10 s) and
``rescan_interval`` a tenth of the window (every scan claims what is free or expired). After the
backfill settles, over the window: database statements per second (pg_stat_statements calls,
and transactions from pg_stat_database), each daemon's CPU (utime+stime from /proc/PID/stat)
and the server backends' CPU. Anchor, in the same window: one daemon on SQLite watching 1,000
runs of its own (the single-host shape, no leases to share).

Usage: .venv/bin/python bench/lease_overhead.py [--quick] [--window S] [--runs R] [--shared]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _pg
from _common import (
    Daemon,
    check,
    ckptd_cmd,
    cpu_seconds,
    execute,
    fmt,
    fmt_ratio,
    print_table,
    query,
    ratio,
    save_result,
    summary_row,
    timed_run,
    train,
    wait_for,
    write_config,
)

DAEMONS = 3
TARGET_CPU_PCT = 1.0


def tree(root: Path, files: list[Path], runs: int) -> Path:
    for r in range(runs):
        d = root / f"run-{r:04d}"
        d.mkdir(parents=True)
        for f in files:
            os.link(f, d / f.name)
        prefix = d / "model.ckpt-1"
        (d / "checkpoint").write_text(
            f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n'
        )
    return root


def backends_cpu(url: str) -> dict[int, float]:
    """CPU seconds of the server processes serving ``url``'s database, by pid."""
    out = {}
    for (pid,) in query(url, "select pid from pg_stat_activity where datname = current_database()"):
        try:
            out[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 runs each, 30 s window")
    ap.add_argument("--window", type=float, default=None, help="seconds (default 150)")
    ap.add_argument("--runs", type=int, default=None, help="runs per daemon (default 1,000)")
    ap.add_argument("--shared", action="store_true", help="the three watch the same runs")
    args = ap.parse_args()
    runs = args.runs or (200 if args.quick else 1000)
    window = args.window or (30.0 if args.quick else 150.0)
    rescan = window / 10
    why = _pg.unavailable()
    if why:
        print(f"lease_overhead needs PostgreSQL: {why}")
        return 1

    stats = ("-c shared_preload_libraries=pg_stat_statements", "-c pg_stat_statements.track=all")
    with (
        tempfile.TemporaryDirectory(prefix="ckptd-bench-leases-") as tmp,
        _pg.cluster(*stats) as pg,
    ):
        work = Path(tmp)
        src = work / "source"
        train("tf1", src, "--steps", "1", "--save-every", "1", "--no-npz")
        files = sorted(p for p in src.iterdir() if p.name.startswith("model.ckpt-1."))
        url = pg.new_database()
        roots = [tree(work / "shared", files, runs)] if args.shared else []
        daemon = f'rescan_interval = "{rescan:g}s"'
        procs: dict[str, Daemon] = {}
        for i in range(DAEMONS):
            root = roots[0] if args.shared else tree(work / f"runs-{i}", files, runs)
            config = write_config(
                work / f"d{i}.toml", root, db=url, daemon=f'name = "d{i}"\n{daemon}'
            )
            if i == 0:
                _, proc = timed_run(ckptd_cmd(config, "db", "upgrade"))
                check(proc, "ckptd db upgrade")
            procs[f"d{i}"] = Daemon(config, work / f"d{i}.log").start()
        anchor_db = work / "anchor.db"
        anchor_conf = write_config(
            work / "anchor.toml",
            tree(work / "runs-anchor", files, runs),
            db=anchor_db,
            daemon=daemon,
        )
        procs["anchor"] = Daemon(anchor_conf, work / "anchor.log").start()
        total = runs * (1 if args.shared else DAEMONS)
        try:
            wait_for(
                lambda: (
                    query(url, "select count(*) from run_leases")[0][0] == total
                    and query(url, "select count(*) from checkpoints where state = 'complete'")[0][
                        0
                    ]
                    == total
                ),
                timeout=300,
                what="every run recorded and leased",
            )
            procs["anchor"].wait_running(anchor_db, timeout=300)
            time.sleep(5.0)  # start-up settles
            execute(url, [("create extension if not exists pg_stat_statements", ())])
            query(url, "select pg_stat_statements_reset()")
            (xact0,) = query(
                url, "select xact_commit from pg_stat_database where datname = current_database()"
            )[0]
            server0 = backends_cpu(url)
            cpu0 = {k: cpu_seconds(d.pid) for k, d in procs.items()}
            t0 = time.monotonic()
            time.sleep(window)
            wall = time.monotonic() - t0
            cpu = {k: 100 * (cpu_seconds(d.pid) - cpu0[k]) / wall for k, d in procs.items()}
            server1 = backends_cpu(url)
            (xact1,) = query(
                url, "select xact_commit from pg_stat_database where datname = current_database()"
            )[0]
            top = query(
                url,
                "select calls, regexp_replace(left(query, 90), '\\s+', ' ', 'g') from "
                "pg_stat_statements where dbid = (select oid from pg_database where datname = "
                "current_database()) order by calls desc",
            )
            held = dict(query(url, "select owner, count(*) from run_leases group by owner"))
        finally:
            for d in procs.values():
                d.stop()

    server_pct = 100 * sum(server1[p] - server0[p] for p in server1 if p in server0) / wall
    calls = sum(c for c, _ in top)
    per_daemon = [cpu[f"d{i}"] for i in range(DAEMONS)]
    worst = max(per_daemon)
    met = worst <= TARGET_CPU_PCT
    shape = "the same runs (shared)" if args.shared else "runs of its own"
    print()
    print(
        f"{DAEMONS} idle daemons on one PostgreSQL, each watching {runs:,} {shape}; "
        f"lease_ttl 30 s (default), rescan_interval {rescan:g} s; {wall:.0f} s window"
    )
    print()
    rows = [
        [
            f"daemon d{i} CPU (% of one core), holds {held.get(f'd{i}', 0):,} leases",
            fmt(per_daemon[i], 2),
            fmt(cpu["anchor"], 2),
            fmt_ratio(ratio(per_daemon[i], cpu["anchor"])),
        ]
        for i in range(DAEMONS)
    ]
    rows += [
        ["database statements / s (pg_stat_statements)", fmt(calls / wall, 1), "", ""],
        ["database transactions / s (xact_commit)", fmt((xact1 - xact0) / wall, 1), "", ""],
        ["server backends CPU (% of one core)", fmt(server_pct, 2), "", ""],
    ]
    print_table(["", f"{DAEMONS} on PostgreSQL", "anchor: 1 on SQLite", "ratio"], rows)
    print()
    print("statements in the window, most frequent first:")
    for c, q in top[:8]:
        print(f"  {c / wall:8.2f}/s  {q}")
    print()
    print(f"Target: ≤ {TARGET_CPU_PCT:g}% CPU per daemon: {fmt(met)} (max {worst:.2f}%).")
    summary = [
        summary_row(
            f"lease overhead: CPU per daemon, {DAEMONS} x {runs:,} runs idle on PostgreSQL (max)",
            worst,
            cpu["anchor"],
            unit="%",
            target=f"<= {TARGET_CPU_PCT:g}%",
            ok=met,
            ratio_value=ratio(worst, cpu["anchor"]),
            ratio_label="ckptd/anchor",
        ),
        summary_row(
            f"lease overhead: database statements/s ({DAEMONS} daemons)",
            calls / wall,
            None,
            unit="1/s",
            target="(none)",
            ok=None,
        ),
    ]
    save_result(
        "lease_overhead",
        {
            "quick": args.quick,
            "runs_per_daemon": runs,
            "shared": args.shared,
            "window_s": wall,
            "rescan_interval_s": rescan,
            "cpu_pct": cpu,
            "server_backends_cpu_pct": server_pct,
            "statements_per_s": calls / wall,
            "transactions_per_s": (xact1 - xact0) / wall,
            "statements": [{"calls": c, "query": q} for c, q in top[:20]],
            "leases_held": held,
            "targets_met": {"cpu": met},
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
