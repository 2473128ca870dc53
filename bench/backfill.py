"""Backfill: how fast ckptd records an existing tree of checkpoints (with their metrics).

Corpus: ONE real TF1 run (``python -m ckptd.worker.train tf1``, 100 saves, ``--save-every 1``)
replicated into R run directories by hard-linking its ``.index``/``.data``/``.meta`` files (100
checkpoints per run) and copying its real event files (``loss`` at every step at the run root,
``eval/accuracy`` and ``eval/loss`` at every save step in ``eval/``). Each run's ``checkpoint``
state file lists all 100 checkpoints, as ``Saver(max_to_keep=None)`` users rely on.

ckptd: ``python -m ckptd --config X run --once`` on a fresh database, timed from spawn to exit
(interpreter start, imports, schema migration, scan, event files, commit). The database is then
checked: every checkpoint complete and carrying its event-file metrics.

Anchor (same run, same files): a fresh Python that imports TensorFlow, then for every run calls
``tf.train.get_checkpoint_state`` and ``tf.train.list_variables`` on every checkpoint it lists —
the cheapest TensorFlow way to enumerate and open every checkpoint. It reads no event files.

The same ``run --once`` into PostgreSQL (a throwaway local cluster, tests/pg.py) runs side by
side, on a fresh database of its own.

Usage: .venv/bin/python bench/backfill.py [--quick] [--database sqlite|postgresql|both] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import _pg
from _common import (
    ENV,
    PY,
    RESULTS,
    RUN_CWD,
    check,
    children_cpu,
    ckptd_cmd,
    db_epoch,
    fmt,
    fmt_ratio,
    print_table,
    query,
    ratio,
    save_result,
    summary_row,
    timed_run,
    train,
    write_config,
)

STEPS = 100  # checkpoints per run
TARGET_RATE = 10_000.0  # checkpoints/s, including metrics
TARGET_VS_ANCHOR = 2.0
PREVIOUS_ANCHOR = "~480 checkpoints/s over 1,000"
STORES = ("sqlite", "postgresql")
LABEL = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}

ANCHOR = textwrap.dedent(
    """
    import json, os, sys, time
    t0 = time.perf_counter()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    t1 = time.perf_counter()
    root = sys.argv[1]
    n = variables = 0
    for name in sorted(os.listdir(root)):
        state = tf.train.get_checkpoint_state(os.path.join(root, name))
        for path in state.all_model_checkpoint_paths:
            variables += len(tf.train.list_variables(path))
            n += 1
    t2 = time.perf_counter()
    print(json.dumps({"checkpoints": n, "variables": variables, "import_s": t1 - t0,
                      "work_s": t2 - t1}))
    """
)


def build_corpus(work: Path, runs: int) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """Train one real run, then replicate it into ``runs`` run directories."""
    src = work / "source"
    t0 = time.perf_counter()
    saves = train("tf1", src, "--steps", str(STEPS), "--save-every", "1", "--no-npz")
    t_train = time.perf_counter() - t0
    if len(saves) != STEPS:
        raise RuntimeError(f"expected {STEPS} saves, got {len(saves)}")
    ckpt_files = sorted(p.name for p in src.iterdir() if p.name.startswith("model.ckpt-"))
    root_events = sorted(src.glob("events.out.tfevents.*"))
    eval_events = sorted((src / "eval").glob("events.out.tfevents.*"))
    if not root_events or not eval_events:
        raise RuntimeError("the trainer wrote no event files")
    t0 = time.perf_counter()
    root = work / "runs"
    for r in range(runs):
        d = root / f"run-{r:03d}"
        (d / "eval").mkdir(parents=True)
        for name in ckpt_files:
            os.link(src / name, d / name)
        for ev in root_events:
            shutil.copyfile(ev, d / ev.name)
        for ev in eval_events:
            shutil.copyfile(ev, d / "eval" / ev.name)
        # The state file a Saver(max_to_keep=None)-aware tool would need: every checkpoint.
        prefixes = [str(d / f"model.ckpt-{s['step']}") for s in saves]
        lines = [f'model_checkpoint_path: "{prefixes[-1]}"']
        lines += [f'all_model_checkpoint_paths: "{p}"' for p in prefixes]
        (d / "checkpoint").write_text("\n".join(lines) + "\n")
    t_copy = time.perf_counter() - t0
    sizes = {name: (src / name).stat().st_size for name in ckpt_files[:3]}
    info = {
        "train_s": t_train,
        "replicate_s": t_copy,
        "files_per_checkpoint": len(ckpt_files) // STEPS,
        "checkpoint_bytes": sum(sizes.values()),
        "root_event_bytes": sum(p.stat().st_size for p in root_events),
        "eval_event_bytes": sum(p.stat().st_size for p in eval_events),
    }
    return root, saves, info


def run_ckptd(
    work: Path,
    root: Path,
    saves: list[dict[str, Any]],
    n: int,
    db: Path | str,
    name: str,
    server_cpu: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """``run --once`` into a fresh database ``db`` (a SQLite file or a PostgreSQL URL), with
    the CPU seconds it used and those the database server (``server_cpu``) used meanwhile."""
    config = write_config(work / f"{name}.toml", root, db=db, runs="*", observer="auto")
    t_start = time.time()
    server_cpu = server_cpu or (lambda: 0.0)
    cpu0, server0 = children_cpu(), server_cpu()
    wall, proc = timed_run(ckptd_cmd(config, "run", "--once"))
    time.sleep(0.2)  # the server reaps the session's backend
    cpu, server = children_cpu() - cpu0, server_cpu() - server0
    check(proc, "ckptd run --once")
    m = re.search(r"recorded (\d+) new checkpoint\(s\) in ([\d.]+) s", proc.stderr)
    complete = query(db, "select count(*) from checkpoints where state = 'complete'")[0][0]
    per_ckpt = dict(
        query(
            db,
            "select k, count(*) from (select checkpoint_id, count(*) k from metrics "
            "where source = 'tfevents' group by checkpoint_id) per group by k",
        )
    )
    with_acc = query(
        db,
        "select count(distinct checkpoint_id) from metrics "
        "where name = 'eval/accuracy' and source = 'tfevents' and value is not null",
    )[0][0]
    metric_rows = query(db, "select count(*) from metrics")[0][0]
    first, last = query(db, "select min(recorded_at), max(recorded_at) from checkpoints")[0]
    # Metric values must be the trainer's own numbers for that step (spot-check run-000).
    expected = {s["step"]: s["metrics"]["eval/accuracy"] for s in saves}
    got = dict(
        query(
            db,
            "select c.step, m.value from checkpoints c join metrics m on m.checkpoint_id = c.id "
            "join runs r on r.id = c.run_id where r.name = 'run-000' and m.name = 'eval/accuracy'",
        )
    )
    mismatches = sum(1 for step, v in expected.items() if got.get(step) != v)
    # A second --once on the same tree: a restart with nothing new (fresh process, warm DB).
    wall2, proc2 = timed_run(ckptd_cmd(config, "run", "--once"))
    check(proc2, "second ckptd run --once")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "server_cpu_s": server,
        "reconcile_s_logged": float(m.group(2)) if m else None,
        "recorded_logged": int(m.group(1)) if m else None,
        "complete": complete,
        "expected": n,
        "all_complete": complete == n,
        "with_eval_accuracy": with_acc,
        "metrics_per_checkpoint_histogram": {str(k): v for k, v in per_ckpt.items()},
        "metric_rows": metric_rows,
        "accuracy_mismatches_run000": mismatches,
        "first_commit_after_start_s": db_epoch(first) - t_start,  # type: ignore[operator]
        "last_commit_after_start_s": db_epoch(last) - t_start,  # type: ignore[operator]
        "rate_wall": n / wall,
        "rate_last_commit": n / (db_epoch(last) - t_start),  # type: ignore[operator]
        "second_once_wall_s": wall2,
        "config": str(config),
        "db": str(db),
    }


def step_read_cost(work: Path, root: Path, pairs: int = 2) -> dict[str, Any]:
    """What reading each checkpoint's step from its data file costs: ``run --once`` on fresh
    databases, alternately with the step read (default) and without it (``step_variable``
    naming a tensor no checkpoint holds: the index is still searched, no data is read, the
    step is the file name's). Best wall and logged scan+record time of ``pairs`` runs each."""
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for i in range(pairs):
        for mode, extra in (("off", 'step_variable = "no/such/tensor"'), ("on", "")):
            db = work / f"steps-{mode}-{i}.db"
            config = write_config(
                work / f"steps-{mode}-{i}.toml", root, db=db, runs="*", watch_extra=extra
            )
            wall, proc = timed_run(ckptd_cmd(config, "run", "--once"))
            check(proc, f"ckptd run --once (step read {mode})")
            m = re.search(r"recorded (\d+) new checkpoint\(s\) in ([\d.]+) s", proc.stderr)
            times[mode].append((wall, float(m.group(2)) if m else float("nan")))
    best = {mode: (min(w for w, _ in t), min(r for _, r in t)) for mode, t in times.items()}
    return {
        "pairs": pairs,
        "wall_on_s": best["on"][0],
        "wall_off_s": best["off"][0],
        "record_on_s": best["on"][1],
        "record_off_s": best["off"][1],
        "cost_wall_s": best["on"][0] - best["off"][0],
        "cost_share_of_wall": (best["on"][0] - best["off"][0]) / best["on"][0],
    }


def run_anchor(root: Path, n: int) -> dict[str, Any]:
    cpu0 = children_cpu()
    wall, proc = timed_run([PY, "-c", ANCHOR, str(root)], timeout=1800)
    cpu = children_cpu() - cpu0
    check(proc, "anchor")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["checkpoints"] != n:
        raise RuntimeError(f"anchor opened {out['checkpoints']} checkpoints, expected {n}")
    return {
        **out,
        "wall_s": wall,
        "cpu_s": cpu,
        "rate_wall": n / wall,
        "rate_excl_import": n / out["work_s"],
    }


def profile(work: Path, root: Path, db: Path | str, store: str) -> Path:
    """cProfile of one more ``run --once`` on a fresh database (not part of the timings)."""
    config = write_config(work / f"profile-{store}.toml", root, db=db, runs="*")
    prof = RESULTS / ("backfill.prof" if store == "sqlite" else f"backfill-{store}.prof")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "cProfile", "-o", str(prof), "-m", "ckptd", "--config", str(config)]
    proc = subprocess.run(
        [*cmd, "run", "--once"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=RUN_CWD,
    )
    check(proc, "profiled ckptd run --once")
    import pstats

    for key in ("tottime", "cumulative"):
        print(f"\ncProfile of `ckptd run --once` ({LABEL[store]}), top 25 by {key}:")
        pstats.Stats(str(prof)).sort_stats(key).print_stats(25)
    return prof


def report(
    n: int, runs: int, corpus: dict[str, Any], cs: dict[str, dict[str, Any]], a: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """The side-by-side table (a ckptd column per store), the targets, the summary rows."""
    print(
        f"Backfill of {n:,} checkpoints in {runs} runs (each: .index + .data + .meta, "
        f"{corpus['checkpoint_bytes']:,} bytes; event files {corpus['root_event_bytes']:,} + "
        f"{corpus['eval_event_bytes']:,} bytes per run)"
    )
    print()

    def row(label: str, key: Any, anchor: Any = "", digits: int = 3, vs: Any = None) -> list[Any]:
        values = [key(c) for c in cs.values()]
        ratios = [fmt_ratio(ratio(v, vs)) if vs is not None else "" for v in values]
        return [label, *(fmt(v, digits) for v in values), anchor, *ratios]

    def excl(c: dict[str, Any]) -> float | None:
        return n / c["reconcile_s_logged"] if c["reconcile_s_logged"] else None

    stores = [LABEL[k] for k in cs]
    print_table(
        ["", *(f"ckptd {s}" for s in stores), "anchor (TF)", *(f"ratio {s}" for s in stores)],
        [
            row("wall time, spawn → exit (s)", lambda c: c["wall_s"], fmt(a["wall_s"], 3)),
            row(
                "checkpoints/s (wall)",
                lambda c: c["rate_wall"],
                fmt(a["rate_wall"], 0),
                0,
                a["rate_wall"],
            ),
            row("last row committed after spawn (s)", lambda c: c["last_commit_after_start_s"]),
            row(
                "checkpoints/s (to last commit)",
                lambda c: c["rate_last_commit"],
                "",
                0,
                a["rate_wall"],
            ),
            row(
                "startup before first commit / import tensorflow (s)",
                lambda c: c["first_commit_after_start_s"],
                fmt(a["import_s"], 3),
            ),
            row(
                "scan+record time logged / work after import (s)",
                lambda c: c["reconcile_s_logged"],
                fmt(a["work_s"], 3),
            ),
            row(
                "checkpoints/s excluding start-up",
                excl,
                fmt(a["rate_excl_import"], 0),
                0,
                a["rate_excl_import"],
            ),
            row("second run --once, nothing new (s)", lambda c: c["second_once_wall_s"]),
        ],
    )
    print()
    summary, met = [], {}
    for store, c in cs.items():
        print(
            f"ckptd DB check ({LABEL[store]}): {c['complete']:,}/{n:,} complete; "
            f"{c['with_eval_accuracy']:,} with eval/accuracy; tfevents metrics per checkpoint "
            f"(count: checkpoints) {c['metrics_per_checkpoint_histogram']}; "
            f"{c['metric_rows']:,} metric rows; run-000 eval/accuracy ≠ trainer's value: "
            f"{c['accuracy_mismatches_run000']}"
        )
        r_wall = ratio(c["rate_wall"], a["rate_wall"])
        complete_ok = c["all_complete"] and c["with_eval_accuracy"] == n
        met_rate = c["rate_wall"] >= TARGET_RATE and complete_ok
        met_ratio = r_wall is not None and r_wall >= TARGET_VS_ANCHOR
        met[store] = met_rate and met_ratio
        print(
            f"Targets ({LABEL[store]}): ckptd ≥ {TARGET_RATE:,.0f} checkpoints/s incl. metrics "
            f"({n:,} in ≤ {n / TARGET_RATE:.2f} s): {fmt(met_rate)} ({c['wall_s']:.2f} s); ≥ "
            f"{TARGET_VS_ANCHOR:.0f}× anchor: {fmt(met_ratio)} ({fmt_ratio(r_wall)})."
        )
        into = "" if store == "sqlite" else f" into {LABEL[store]}"
        summary += [
            summary_row(
                f"backfill {n:,}{into}: checkpoints/s (wall)",
                c["rate_wall"],
                a["rate_wall"],
                unit="ckpt/s",
                target=f">= {TARGET_RATE:,.0f}/s and >= 2x anchor",
                ok=met_rate and met_ratio,
                ratio_value=r_wall,
                ratio_label="ckptd/anchor",
            ),
            summary_row(
                f"backfill {n:,}{into}: wall time",
                c["wall_s"],
                a["wall_s"],
                unit="s",
                target=f"<= {n / TARGET_RATE:.2f} s",
                ok=met_rate,
                ratio_value=ratio(a["wall_s"], c["wall_s"]),
                ratio_label="anchor/ckptd",
            ),
        ]
    print(f"Anchor measured before: {PREVIOUS_ANCHOR}.")
    return summary, met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 runs (1,000 checkpoints)")
    ap.add_argument("--runs", type=int, default=None, help="number of runs (default 100)")
    ap.add_argument(
        "--database",
        choices=[*STORES, "both"],
        default="both",
        help="the store(s) to backfill into (default both, side by side; PostgreSQL is skipped "
        "with the reason when it is not installed)",
    )
    ap.add_argument("--profile", action="store_true", help="also cProfile one run --once each")
    args = ap.parse_args()
    runs = args.runs or (10 if args.quick else 100)
    n = runs * STEPS
    stores = list(STORES) if args.database == "both" else [args.database]
    why = _pg.unavailable() if "postgresql" in stores else None
    if why:
        print(f"PostgreSQL skipped: {why}")
        if args.database == "postgresql":
            return 1
        stores.remove("postgresql")

    with tempfile.TemporaryDirectory(prefix="ckptd-bench-backfill-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        cluster = stack.enter_context(_pg.cluster()) if "postgresql" in stores else None

        def fresh(store: str, name: str) -> Path | str:
            return work / f"{name}.db" if store == "sqlite" else cluster.new_database()

        print(f"building the corpus: 1 real TF1 run × {runs} runs = {n:,} checkpoints …")
        root, saves, corpus = build_corpus(work, runs)
        print(
            f"  trained in {corpus['train_s']:.1f} s, replicated in {corpus['replicate_s']:.1f} s"
        )
        cs = {}
        for store in stores:
            print(f"ckptd run --once into {LABEL[store]} …", flush=True)
            server = (lambda: _pg.server_cpu(cluster)) if store == "postgresql" else None
            cs[store] = run_ckptd(work, root, saves, n, fresh(store, "ckptd"), store, server)
        print("anchor (import tensorflow; get_checkpoint_state + list_variables) …", flush=True)
        a = run_anchor(root, n)
        steps = None
        if "sqlite" in stores:
            print("step read cost: run --once with and without it, alternately …", flush=True)
            steps = step_read_cost(work, root)
        profs = (
            [str(profile(work, root, fresh(s, f"profile-{s}"), s)) for s in stores]
            if args.profile
            else []
        )

    print()
    summary, met = report(n, runs, corpus, cs, a)
    if steps is not None:
        print(
            f"step read from the data file (SQLite, best of {steps['pairs']} each, fresh "
            f"databases): wall {steps['wall_on_s']:.3f} s with it, {steps['wall_off_s']:.3f} s "
            f"without; scan+record logged {steps['record_on_s']:.3f} vs "
            f"{steps['record_off_s']:.3f} s; cost {steps['cost_wall_s']:+.3f} s = "
            f"{steps['cost_share_of_wall']:+.1%} of backfill wall time (target ≤ 10%)"
        )
    cpus = os.cpu_count() or 1
    used = ", ".join(
        f"ckptd {LABEL[s]} {c['cpu_s']:.2f} s"
        + (f" + PostgreSQL server {c['server_cpu_s']:.2f} s" if s == "postgresql" else "")
        + f" (= {(c['cpu_s'] + c['server_cpu_s']) / (cpus * c['wall_s']):.0%} of {cpus} CPUs)"
        for s, c in cs.items()
    )
    print(
        f"CPU time, user + system: {used}; anchor {a['cpu_s']:.2f} s. ckptd's includes its "
        "observer processes."
    )
    print(
        "Notes: both read the same files, already in the page cache (just written). ckptd's "
        "wall time includes Python start-up, imports, creating the schema (create_all + stamp) "
        "on a fresh database and starting its observer processes; the anchor's includes "
        "`import tensorflow`. PostgreSQL is a local throwaway cluster on a Unix socket with "
        "fsync off (tests/pg.py). All vary from run to run on a shared machine: compare the "
        "ratios of one run, not times across runs."
    )
    save_result(
        "backfill",
        {
            "quick": args.quick,
            "runs": runs,
            "checkpoints": n,
            "corpus": corpus,
            "ckptd": cs.get("sqlite"),
            "ckptd_postgresql": cs.get("postgresql"),
            "step_read": steps,
            "anchor": a,
            "ratio_rate_wall": {s: ratio(c["rate_wall"], a["rate_wall"]) for s, c in cs.items()},
            "targets_met": met,
            "profile": profs,
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
