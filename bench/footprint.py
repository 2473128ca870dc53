"""Footprint: the idle daemon's memory and CPU, and how fast the read CLI answers on a big DB.

(a) A real ``ckptd run`` watches R runs (1,000; each one real TF1 checkpoint, hard-linked, plus
    its ``checkpoint`` state file). After the start-up backfill settles, its RSS (VmRSS) and CPU
    (utime+stime from /proc/PID/stat) are sampled over a window (150 s). ``rescan_interval`` is
    a tenth of the window (15 s; the default is 60 s), so the window holds a whole cycle of
    periodic rescans — 9 quick ones (runs whose directory fingerprint holds are skipped) and the
    deep one (every run re-listed and re-stat'ed) — at 4x the default rate: an upper bound for
    the default settings. Anchor, in the same window: ONE
    process doing what ``tf.train.checkpoints_iterator`` does, for every run — import TensorFlow,
    then once a second ``tf.train.latest_checkpoint(run)`` for each of the R runs (on an identical
    hard-linked copy of the tree, so its reads cause no inotify events in the daemon).

(b) A database created by ``ckptd db upgrade`` and filled directly by SQL (bench/_bigdb.py):
    100 runs × 1,000 checkpoints (mixed states; ``--checkpoints N``: N / 1,000 runs), 3 metrics
    each, an audit action for each, a few pins, evaluations and exports; SQLite, or PostgreSQL
    (``--database postgresql|both``: a throwaway local cluster). Timed (wall, spawn → exit, median of N): ``ckptd status``, ``ckptd status
    --json``, ``ckptd ls RUN --json`` (1,000 checkpoints). Anchors: a fresh Python that imports
    TensorFlow and reads every run's ``checkpoint`` state file with ``tf.train.
    get_checkpoint_state`` (count + newest per run: the TF way to get a "status"), and the same for
    one run, printing its 1,000 paths as JSON (the TF way to get an "ls").

Usage: .venv/bin/python bench/footprint.py [--quick] [--only idle|status] [--repeat N]
    [--checkpoints N] [--database sqlite|postgresql|both]
(``--only status`` runs part (b) alone; ``--skip-cli`` is ``--only idle``.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import _pg
from _bigdb import populate, touch_heartbeat
from _common import (
    ENV,
    PY,
    RUN_CWD,
    Daemon,
    check,
    ckptd_cmd,
    cpu_seconds,
    fmt,
    fmt_ratio,
    inotify_watches,
    kill_group,
    median,
    num_threads,
    print_table,
    query,
    ratio,
    rss_kib,
    save_result,
    summary_row,
    timed_run,
    train,
    wait_for,
    write_config,
)

TARGET_RSS_MB = 120.0
TARGET_IDLE_CPU_PCT = 1.0
DEEP_RESCAN_EVERY = 10  # ckptd.daemon.main.DEEP_RESCAN_EVERY (the bench does not import ckptd)
TARGET_STATUS_S = 0.5

# The anchor for (a): checkpoints_iterator's poll (latest_checkpoint once a second) for every run.
POLL_ANCHOR = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    root = sys.argv[1]
    runs = [os.path.join(root, d) for d in sorted(os.listdir(root))]
    seen = {}
    print(json.dumps({"event": "ready", "runs": len(runs)}), flush=True)
    while True:
        t0 = time.monotonic()
        for run in runs:
            latest = tf.train.latest_checkpoint(run)
            if latest and seen.get(run) != latest:
                seen[run] = latest
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    """
)

STATUS_ANCHOR = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    root = sys.argv[1]
    out = []
    for name in sorted(os.listdir(root)):
        st = tf.train.get_checkpoint_state(os.path.join(root, name))
        out.append({"run": name, "checkpoints": len(st.all_model_checkpoint_paths),
                    "newest": st.model_checkpoint_path})
    print(json.dumps(out))
    """
)

LS_ANCHOR = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    st = tf.train.get_checkpoint_state(sys.argv[1])
    print(json.dumps(list(st.all_model_checkpoint_paths)))
    """
)


# ------------------------------------------------------------------ (a) idle daemon


def idle(work: Path, runs: int, window: float, rescan: float) -> dict[str, Any]:
    src = work / "source"
    train("tf1", src, "--steps", "1", "--save-every", "1", "--no-npz")
    files = sorted(p.name for p in src.iterdir() if p.name.startswith("model.ckpt-1."))
    # The anchor polls its own identical tree: its reads (opening state files, listing
    # directories) would otherwise show up as inotify events in the daemon it is compared with.
    root, anchor_root = work / "runs", work / "runs-anchor"
    for base in (root, anchor_root):
        for r in range(runs):
            d = base / f"run-{r:04d}"
            d.mkdir(parents=True)
            for name in files:
                os.link(src / name, d / name)
            prefix = d / "model.ckpt-1"
            (d / "checkpoint").write_text(
                f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n'
            )
    db = work / "idle.db"
    config = write_config(
        work / "idle.toml", root, db=db, runs="*", daemon=f'rescan_interval = "{rescan:g}s"'
    )
    daemon = Daemon(config, work / "idle-daemon.log").start()
    anchor_out = (work / "poll-anchor.jsonl").open("wb")
    anchor = subprocess.Popen(
        [PY, "-c", POLL_ANCHOR, str(anchor_root)],
        stdout=anchor_out,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,
        cwd=RUN_CWD,
    )
    try:
        daemon.wait_running(db, timeout=120)
        t_ready = time.time() - daemon.started_at
        wait_for(
            lambda: (
                query(db, "select count(*) from checkpoints where state = 'complete'")[0][0] >= runs
            ),
            timeout=120,
            what="the backfill",
        )
        wait_for(
            lambda: b'"ready"' in (work / "poll-anchor.jsonl").read_bytes(),
            timeout=120,
            what="the anchor to import TensorFlow",
        )
        time.sleep(5.0)  # let start-up work (first heartbeat, GC) settle
        pids = {"ckptd": daemon.pid, "anchor": anchor.pid}
        samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in pids}
        t_end = time.monotonic() + window
        while True:
            now = time.monotonic()
            for k, pid in pids.items():
                samples[k].append((now, cpu_seconds(pid), rss_kib(pid)[0]))
            if now >= t_end:
                break
            time.sleep(min(1.0, max(0.0, t_end - now)))
        out: dict[str, Any] = {
            "runs": runs,
            "window_s": window,
            "rescan_interval_s": rescan,
            "ready_after_s": t_ready,
        }
        for k, pid in pids.items():
            s = samples[k]
            wall = s[-1][0] - s[0][0]
            cpu = s[-1][1] - s[0][1]
            per_sec = [100 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(s)]
            rss = [x[2] for x in s]
            out[k] = {
                "pid": pid,
                "cpu_pct": 100 * cpu / wall,
                "cpu_s": cpu,
                "max_1s_cpu_pct": max(per_sec) if per_sec else None,
                "median_1s_cpu_pct": median(per_sec),
                "per_second_cpu_pct": [round(x, 2) for x in per_sec],
                "rss_mb_end": rss[-1] / 1024,
                "rss_mb_max": max(rss) / 1024,
                "hwm_mb": rss_kib(pid)[1] / 1024,
                "threads": num_threads(pid),
                "inotify_watches": inotify_watches(pid),
            }
        rows = query(db, "select status from daemons order by id desc limit 1")
        out["observer"] = json.loads(rows[0][0])["watches"][0]["observer"]
        return out
    finally:
        kill_group(anchor)
        anchor_out.close()
        daemon.stop()


# ------------------------------------------------------------------ (b) status / ls on a big DB


def timed_median(
    cmd: list[str], repeat: int, what: str, before: Any = None
) -> tuple[float, list[float], str]:
    times = []
    out = ""
    for _ in range(repeat):
        if before is not None:
            before()
        wall, proc = timed_run(cmd)
        check(proc, what)
        times.append(wall)
        out = proc.stdout
    return median(times), times, out  # type: ignore[return-value]


def cli(work: Path, db: Path | str, runs: int, per_run: int, repeat: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    root = work / "status-runs"
    config = write_config(work / "status.toml", root, db=db, runs="*")
    wall_upgrade, proc = timed_run(ckptd_cmd(config, "db", "upgrade"))
    check(proc, "ckptd db upgrade")
    counts = populate(db, root, config, runs, per_run)
    t_populate = counts.pop("seconds")
    # State files for the TF anchors: each run's `checkpoint` lists its checkpoints.
    for r in range(runs):
        d = root / f"run-{r:04d}"
        d.mkdir(parents=True)
        prefixes = [str(d / f"model.ckpt-{s}") for s in range(1, per_run + 1)]
        lines = [f'model_checkpoint_path: "{prefixes[-1]}"']
        lines += [f'all_model_checkpoint_paths: "{p}"' for p in prefixes]
        (d / "checkpoint").write_text("\n".join(lines) + "\n")

    res: dict[str, Any] = {"db_rows": counts, "populate_s": t_populate, "upgrade_s": wall_upgrade}
    floor, _floor_all, _ = timed_median([PY, "-c", "pass"], repeat, "python -c pass")
    imp, _, _ = timed_median([PY, "-c", "import ckptd.cli"], repeat, "import ckptd.cli")
    res["python_startup_s"] = floor
    res["import_ckptd_cli_s"] = imp

    med, all_, out = timed_median(
        ckptd_cmd(config, "status"), repeat, "ckptd status", lambda: touch_heartbeat(db)
    )
    res["status"] = {"median_s": med, "runs_s": all_, "lines": len(out.splitlines())}
    med, all_, out = timed_median(
        ckptd_cmd(config, "status", "--json"), repeat, "status --json", lambda: touch_heartbeat(db)
    )
    data = json.loads(out)
    res["status_json"] = {
        "median_s": med,
        "runs_s": all_,
        "total": sum(data["counts"].values()),
        "alive": data["daemon"]["alive"],
        "runs": len(data["runs"]),
    }
    med, all_, out = timed_median(
        ckptd_cmd(config, "ls", "run-0000", "--json"), repeat, "ckptd ls --json"
    )
    items = json.loads(out)
    res["ls_json"] = {
        "median_s": med,
        "runs_s": all_,
        "items": len(items),
        "best": sum(1 for i in items if i["best"]),
        "with_metrics": sum(1 for i in items if i["metrics"]),
    }
    med, all_, out = timed_median([PY, "-c", STATUS_ANCHOR, str(root)], repeat, "status anchor")
    res["status_anchor"] = {"median_s": med, "runs_s": all_, "runs": len(json.loads(out))}
    med, all_, out = timed_median(
        [PY, "-c", LS_ANCHOR, str(root / "run-0000")], repeat, "ls anchor"
    )
    res["ls_anchor"] = {"median_s": med, "runs_s": all_, "items": len(json.loads(out))}
    return res


def report_idle(a: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    c, an = a["ckptd"], a["anchor"]
    print()
    print(
        f"(a) Idle, watching {a['runs']:,} runs (observer {a['observer']}), {a['window_s']:.0f} s "
        f"window after start-up settled (ckptd was running {a['ready_after_s']:.1f} s after spawn)"
    )
    print()
    print_table(
        ["", "ckptd run", "anchor: latest_checkpoint poll", "ratio anchor/ckptd"],
        [
            [
                "RSS at end (MB)",
                fmt(c["rss_mb_end"]),
                fmt(an["rss_mb_end"]),
                fmt_ratio(ratio(an["rss_mb_end"], c["rss_mb_end"])),
            ],
            ["RSS max in window (MB)", fmt(c["rss_mb_max"]), fmt(an["rss_mb_max"]), ""],
            ["peak RSS since start, VmHWM (MB)", fmt(c["hwm_mb"]), fmt(an["hwm_mb"]), ""],
            [
                "CPU over window (% of one core)",
                fmt(c["cpu_pct"], 2),
                fmt(an["cpu_pct"], 2),
                fmt_ratio(ratio(an["cpu_pct"], c["cpu_pct"])),
            ],
            ["CPU seconds in window", fmt(c["cpu_s"], 2), fmt(an["cpu_s"], 2), ""],
            [
                "median 1-s sample (% of one core)",
                fmt(c["median_1s_cpu_pct"], 2),
                fmt(an["median_1s_cpu_pct"], 2),
                "",
            ],
            [
                "busiest 1-s sample (% of one core)",
                fmt(c["max_1s_cpu_pct"]),
                fmt(an["max_1s_cpu_pct"]),
                "",
            ],
            ["threads", c["threads"], an["threads"], ""],
            ["inotify watches", c["inotify_watches"], an["inotify_watches"], ""],
        ],
    )
    met_rss = c["rss_mb_max"] <= TARGET_RSS_MB
    met_cpu = c["cpu_pct"] <= TARGET_IDLE_CPU_PCT
    print(
        f"Targets: RSS ≤ {TARGET_RSS_MB:.0f} MB: {fmt(met_rss)}; idle CPU ≤ "
        f"{TARGET_IDLE_CPU_PCT:.0f}%: {fmt(met_cpu)} (rescan_interval = "
        f"{a['rescan_interval_s']:g}s, window {a['window_s']:g}s: the window includes "
        f"{int(a['window_s'] // a['rescan_interval_s'])} periodic rescans of every run, every "
        f"{DEEP_RESCAN_EVERY}th of them deep (re-lists and re-stats every run; the others skip "
        "runs whose directory mtimes and event-file sizes are unchanged); the default interval "
        "is 60s"
        + (
            "; the busiest second is the deep rescan)."
            if a["window_s"] >= DEEP_RESCAN_EVERY * a["rescan_interval_s"]
            else ")"
        )
    )

    summary = [
        summary_row(
            f"idle RSS ({a['runs']:,} runs)",
            c["rss_mb_max"],
            an["rss_mb_max"],
            unit="MB",
            target=f"<= {TARGET_RSS_MB:.0f} MB",
            ok=met_rss,
            ratio_value=ratio(an["rss_mb_max"], c["rss_mb_max"]),
            ratio_label="anchor/ckptd",
        ),
        summary_row(
            f"idle CPU ({a['runs']:,} runs)",
            c["cpu_pct"],
            an["cpu_pct"],
            unit="%",
            target=f"<= {TARGET_IDLE_CPU_PCT:.0f}%",
            ok=met_cpu,
            ratio_value=ratio(an["cpu_pct"], c["cpu_pct"]),
            ratio_label="anchor/ckptd",
        ),
    ]
    return summary, {"rss": met_rss, "idle_cpu": met_cpu}


def report_cli(
    b: dict[str, Any], repeat: int, store: str
) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    print()
    rows_txt = ", ".join(f"{k} {v:,}" for k, v in b["db_rows"].items())
    label = "SQLite" if store == "sqlite" else "PostgreSQL"
    print(
        f"(b) Read CLI on a {label} database of {rows_txt} (filled in {b['populate_s']:.0f} s); "
        f"wall time spawn → exit, median of {repeat}"
    )
    print()
    s, sj, ls = b["status"], b["status_json"], b["ls_json"]
    sa, la = b["status_anchor"], b["ls_anchor"]
    print_table(
        ["command", "ckptd (s)", "anchor (s)", "anchor/ckptd", "all ckptd runs (s)"],
        [
            [
                "ckptd status",
                fmt(s["median_s"], 3),
                fmt(sa["median_s"], 3),
                fmt_ratio(ratio(sa["median_s"], s["median_s"])),
                " ".join(f"{x:.3f}" for x in s["runs_s"]),
            ],
            [
                "ckptd status --json",
                fmt(sj["median_s"], 3),
                fmt(sa["median_s"], 3),
                fmt_ratio(ratio(sa["median_s"], sj["median_s"])),
                " ".join(f"{x:.3f}" for x in sj["runs_s"]),
            ],
            [
                "ckptd ls run-0000 --json (1,000)",
                fmt(ls["median_s"], 3),
                fmt(la["median_s"], 3),
                fmt_ratio(ratio(la["median_s"], ls["median_s"])),
                " ".join(f"{x:.3f}" for x in ls["runs_s"]),
            ],
            ["python -c pass (floor)", fmt(b["python_startup_s"], 3), "", "", ""],
            ["python -c 'import ckptd.cli'", fmt(b["import_ckptd_cli_s"], 3), "", "", ""],
        ],
    )
    print(
        f"checks: status --json total {sj['total']:,} checkpoints, {sj['runs']} runs, daemon "
        f"alive {sj['alive']}; ls returned {ls['items']:,} items ({ls['with_metrics']:,} with "
        f"metrics, {ls['best']} best); anchors: status read {sa['runs']} state files, ls "
        f"listed {la['items']:,} paths"
    )
    met_status = max(s["median_s"], sj["median_s"]) <= TARGET_STATUS_S
    size = f"{b['db_rows']['checkpoints'] // 1000:,}k"
    on = "" if store == "sqlite" else ", PostgreSQL"
    print(
        f"Target: status ≤ {TARGET_STATUS_S} s: {fmt(met_status)}. Anchors: `import tensorflow` "
        "+ tf.train.get_checkpoint_state (per-run counts and newest, from the state files: no "
        "states, metrics, best or problems)."
    )
    summary = [
        summary_row(
            f"status ({size} ckpts{on}), median",
            s["median_s"],
            sa["median_s"],
            unit="s",
            target=f"<= {TARGET_STATUS_S} s",
            ok=s["median_s"] <= TARGET_STATUS_S,
            ratio_value=ratio(sa["median_s"], s["median_s"]),
            ratio_label="anchor/ckptd",
        ),
        summary_row(
            f"status --json ({size}{on}), median",
            sj["median_s"],
            sa["median_s"],
            unit="s",
            target=f"<= {TARGET_STATUS_S} s",
            ok=sj["median_s"] <= TARGET_STATUS_S,
            ratio_value=ratio(sa["median_s"], sj["median_s"]),
            ratio_label="anchor/ckptd",
        ),
        summary_row(
            f"ls RUN --json (1,000{on}), median",
            ls["median_s"],
            la["median_s"],
            unit="s",
            target="(none)",
            ok=None,
            ratio_value=ratio(la["median_s"], ls["median_s"]),
            ratio_label="anchor/ckptd",
        ),
    ]
    return summary, {"status": met_status}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 idle runs, 20 s window, 3 repeats")
    ap.add_argument("--window", type=float, default=None, help="idle window in seconds")
    ap.add_argument(
        "--rescan-interval",
        type=float,
        default=None,
        help="the daemon's rescan_interval in seconds (default: a tenth of the window, so it "
        "holds one deep rescan)",
    )
    ap.add_argument("--skip-cli", action="store_true", help="only part (a) (= --only idle)")
    ap.add_argument(
        "--only",
        choices=["idle", "status"],
        default=None,
        help="run only part (a) (idle) or only part (b) (status / ls on the big DB)",
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="runs per timed command (default 5; 3 --quick)"
    )
    ap.add_argument(
        "--checkpoints",
        type=int,
        default=100_000,
        help="checkpoints in part (b)'s database, 1,000 a run (default 100,000)",
    )
    ap.add_argument(
        "--database",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="part (b)'s store(s); PostgreSQL is a throwaway local cluster (tests/pg.py)",
    )
    args = ap.parse_args()
    only = "idle" if args.skip_cli else args.only
    idle_runs = 200 if args.quick else 1000
    window = args.window or (20.0 if args.quick else 150.0)
    repeat = args.repeat or (3 if args.quick else 5)
    per_run = 1000
    status_runs = max(1, args.checkpoints // per_run)
    stores = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    if only != "idle" and "postgresql" in stores and _pg.unavailable():
        print(f"PostgreSQL skipped: {_pg.unavailable()}")
        stores.remove("postgresql")

    with tempfile.TemporaryDirectory(prefix="ckptd-bench-footprint-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        a = None
        if only != "status":
            print(
                f"(a) idle daemon watching {idle_runs:,} runs, {window:.0f} s window …", flush=True
            )
            a = idle(work, idle_runs, window, args.rescan_interval or window / DEEP_RESCAN_EVERY)
        b: dict[str, Any] = {}
        for store in stores if only != "idle" else []:
            print(
                f"(b) status / ls on {status_runs * per_run:,} checkpoints in {store}, median of "
                f"{repeat} …",
                flush=True,
            )
            if store == "sqlite":
                db: Path | str = work / store / "status.db"
            else:
                db = stack.enter_context(_pg.cluster()).new_database()
            b[store] = cli(work / store, db, status_runs, per_run, repeat)

    summary: list[dict[str, Any]] = []
    met: dict[str, bool] = {}
    if a is not None:
        summary, met = report_idle(a)
    for store, res in b.items():
        more, met_b = report_cli(res, repeat, store)
        summary += more
        met.update({f"{k} {store}": v for k, v in met_b.items()})

    size = "" if args.checkpoints == 100_000 else f"-{args.checkpoints // 1000}k"
    save_result(
        "footprint" + (f"-{only}" if only else "") + size,
        {
            "quick": args.quick,
            "idle": a,
            "cli": b.get("sqlite"),
            "cli_postgresql": b.get("postgresql"),
            "targets_met": met,
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
