"""Prune: ckptd applying ``keep_last = 1`` to 10,000 checkpoints vs ``rm`` of the same files.

Corpus: ONE real, tiny TF2 checkpoint (``python -m ckptd.worker.train tf2``: ``ckpt-10.index`` +
``ckpt-10.data-00000-of-00001``) hard-linked into ``ckpt-1`` … ``ckpt-100`` in each of 100 run
directories (10,000 checkpoints, 20,000 files), each run with a TF2-style ``checkpoint`` state file
listing all 100 with their timestamps (as tests/test_prune.py's ``_many_checkpoints``). Identical
trees are built for each side; each ckptd tree is recorded in its own fresh database by ``ckptd
run --once`` with no ``[watch.retain]`` (so nothing is deleted while recording).

ckptd, with ``[watch.retain] keep_last = 1, min_age = "0s"``:
  * ``python -m ckptd --config X prune`` (all runs), spawn → exit: Python start, imports, plans,
    the two-phase commits (``pruning`` intent, unlink, ``pruned`` and one audit row per run that
    lists its deletions), 100 atomic state-file rewrites (fsync'd), and its printed table of
    every run's plan;
  * in this process, ``api.prune.prune`` over every run, as the CLI calls it (engine, plans,
    commits, unlinks, state files), excluding interpreter start and imports.
Afterwards each tree is checked: exactly 9,900 checkpoints ``pruned``, 100 ``complete`` (step 100),
their files gone, every state file listing only ``ckpt-100``.

Anchors (same run, same 19,800 files on identical trees): ``xargs -0 rm -f`` fed the file list
(spawn → exit), the whole-process floor; and ``os.unlink`` in a loop in this process, the
in-process floor. Neither writes a database nor fixes the state files.

Usage: .venv/bin/python bench/prune.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import (
    ENV,
    RESULTS,
    RUN_CWD,
    check,
    ckptd_cmd,
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
from _inproc import open_store, prepare_process, runs, watch_for

from ckptd.api import prune
from ckptd.io import statefile
from ckptd.store import audit_reads
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store

PER_RUN = 100
TARGET_VS_RM = 3.0  # ckptd wall / rm wall

RETAIN = textwrap.dedent(
    """
    [watch.retain]
    keep_last = 1
    min_age = "0s"
    """
)


def source_checkpoint(work: Path) -> list[Path]:
    src = work / "source"
    train("tf2", src, "--steps", "10", "--save-every", "10", "--no-npz")
    files = sorted(f for f in src.iterdir() if f.name.startswith("ckpt-10."))
    if {f.suffix for f in files} != {".index", ".data-00000-of-00001"}:
        raise RuntimeError(f"unexpected TF2 checkpoint files: {[f.name for f in files]}")
    return files


def build_tree(root: Path, files: list[Path], n_runs: int) -> list[str]:
    """``n_runs`` runs × PER_RUN hard-linked checkpoints; returns the paths a prune deletes."""
    doomed = []
    base = time.time() - 3600
    for r in range(n_runs):
        run = root / f"run-{r:03d}"
        run.mkdir(parents=True)
        for step in range(1, PER_RUN + 1):
            for f in files:
                dst = run / f.name.replace("ckpt-10.", f"ckpt-{step}.")
                os.link(f, dst)
                if step < PER_RUN:
                    doomed.append(str(dst))
        state = statefile.CheckpointState(
            f"ckpt-{PER_RUN}",
            [f"ckpt-{s}" for s in range(1, PER_RUN + 1)],
            [base + s for s in range(1, PER_RUN + 1)],
        )
        statefile.write_atomic(run, state)
    return doomed


# The hard-linked copies all hold ckpt-10's step: read the step from a variable no checkpoint
# has, so each is recorded at the step its file name says.
BY_NAME = 'step_variable = "none"'


def record(work: Path, name: str, root: Path) -> tuple[Path, Path, float]:
    """A fresh database with every checkpoint of ``root`` recorded; the prune config."""
    db = work / f"{name}.db"
    wall, proc = timed_run(
        ckptd_cmd(
            write_config(work / f"{name}-record.toml", root, db=db, watch_extra=BY_NAME),
            "run",
            "--once",
        )
    )
    check(proc, f"ckptd run --once ({name})")
    config = write_config(work / f"{name}.toml", root, db=db, watch_extra=BY_NAME)
    with config.open("a") as fh:
        fh.write(RETAIN)
    return db, config, wall


def verify(root: Path, db: Path, n_runs: int, files: list[Path]) -> dict[str, Any]:
    states = dict(query(db, "select state, count(*) from checkpoints group by state"))
    kept_steps = {s for (s,) in query(db, "select step from checkpoints where state = 'complete'")}
    # Through the read path `ckptd events` uses: one event per deleted checkpoint.
    engine = make_engine(f"sqlite:///{db}", readonly=True)
    try:
        with session_scope(engine) as s:
            events = audit_reads.actions(s, limit=n_runs * PER_RUN * 2, kinds=["pruned"])
    finally:
        engine.dispose()
    actions = len({e.subject for e in events})
    if actions != len(events):
        actions = -len(events)  # a checkpoint listed twice
    keep_names = {f.name.replace("ckpt-10.", f"ckpt-{PER_RUN}.") for f in files} | {"checkpoint"}
    wrong_dirs, wrong_states = 0, 0
    for r in range(n_runs):
        run = root / f"run-{r:03d}"
        if {p.name for p in run.iterdir()} != keep_names:
            wrong_dirs += 1
        st = statefile.read(run)
        if (
            st is None
            or st.all_model_checkpoint_paths != [f"ckpt-{PER_RUN}"]
            or st.model_checkpoint_path != f"ckpt-{PER_RUN}"
            or len(st.all_model_checkpoint_timestamps) != 1
        ):
            wrong_states += 1
    expected = n_runs * (PER_RUN - 1)
    ok = (
        states.get("pruned") == expected
        and states.get("complete") == n_runs
        and kept_steps == {PER_RUN}
        and actions == expected
        and not wrong_dirs
        and not wrong_states
    )
    return {
        "states": states,
        "kept_steps": sorted(kept_steps),
        "pruned_actions": actions,
        "dirs_not_just_newest": wrong_dirs,
        "state_files_wrong": wrong_states,
        "ok": ok,
    }


def prune_in_process(config: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    cfg, engine = open_store(config)
    store = Store(engine)
    pruned = failed = 0
    # As `ckptd prune` does: every run in one call, each phase batched across the runs.
    for result in prune.prune(store, [(run, watch_for(cfg, run)) for run in runs(engine)]):
        pruned += len(result.pruned)
        failed += len(result.failed)
    wall = time.perf_counter() - t0
    engine.dispose()
    return wall, pruned, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 runs (1,000 checkpoints)")
    ap.add_argument("--runs", type=int, default=None, help="number of runs (default 100)")
    ap.add_argument("--profile", action="store_true", help="also cProfile an in-process prune")
    args = ap.parse_args()
    prepare_process()
    n_runs = args.runs or (10 if args.quick else 100)
    n = n_runs * PER_RUN
    doomed_n = n_runs * (PER_RUN - 1)

    with tempfile.TemporaryDirectory(prefix="ckptd-bench-prune-") as tmp:
        work = Path(tmp)
        print(f"building 5 identical trees: {n_runs} runs × {PER_RUN} checkpoints …", flush=True)
        files = source_checkpoint(work)
        t0 = time.perf_counter()
        trees = {name: work / name for name in ("cli", "json", "inproc", "rm", "unlink")}
        doomed = {name: build_tree(root, files, n_runs) for name, root in trees.items()}
        t_build = time.perf_counter() - t0
        db_cli, conf_cli, rec_cli = record(work, "cli", trees["cli"])
        db_json, conf_json, _ = record(work, "json", trees["json"])
        db_in, conf_in, rec_in = record(work, "inproc", trees["inproc"])
        print(
            f"  built in {t_build:.1f} s; recorded by run --once in {rec_cli:.2f} s and "
            f"{rec_in:.2f} s",
            flush=True,
        )

        print("anchor: xargs -0 rm -f over the file list …", flush=True)
        listing = "\0".join(doomed["rm"]).encode()
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["xargs", "-0", "rm", "-f", "--"], input=listing, env=ENV, cwd=RUN_CWD, check=False
        )
        rm_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"xargs rm exited {proc.returncode}")
        rm_left = sum(1 for p in doomed["rm"] if os.path.lexists(p))

        print("ckptd prune (whole process) …", flush=True)
        cli_wall, cproc = timed_run(ckptd_cmd(conf_cli, "prune"), timeout=1800)
        check(cproc, "ckptd prune")
        cli_check = verify(trees["cli"], db_cli, n_runs, files)
        # The same command again, with nothing left to delete: start-up + reading + planning.
        again_wall, aproc = timed_run(ckptd_cmd(conf_cli, "prune"), timeout=1800)
        check(aproc, "second ckptd prune")

        print("ckptd prune --json (whole process, no table rendering) …", flush=True)
        json_wall, jproc = timed_run(ckptd_cmd(conf_json, "prune", "--json"), timeout=1800)
        check(jproc, "ckptd prune --json")
        json_check = verify(trees["json"], db_json, n_runs, files)

        print("anchor: os.unlink loop in this process …", flush=True)
        paths = doomed["unlink"]
        t0 = time.perf_counter()
        for p in paths:
            os.unlink(p)
        unlink_wall = time.perf_counter() - t0

        print("ckptd api.prune.prune over all runs, in this process …", flush=True)
        in_wall, in_pruned, in_failed = prune_in_process(conf_in)
        in_check = verify(trees["inproc"], db_in, n_runs, files)

        prof_path = None
        if args.profile:
            root = work / "profile"
            build_tree(root, files, n_runs)
            _db, conf, _ = record(work, "profile", root)
            prof_path = RESULTS / "prune.prof"
            RESULTS.mkdir(parents=True, exist_ok=True)
            profiler = cProfile.Profile()
            profiler.runcall(prune_in_process, conf)
            profiler.dump_stats(prof_path)
            for key in ("tottime", "cumulative"):
                print(f"\ncProfile of the in-process prune, top 25 by {key}:")
                pstats.Stats(str(prof_path)).sort_stats(key).print_stats(25)

    n_files = len(doomed["rm"])
    r_cli = ratio(cli_wall, rm_wall)
    r_in = ratio(in_wall, unlink_wall)
    print()
    print(
        f"Pruning {n:,} checkpoints in {n_runs} runs to keep_last = 1: {doomed_n:,} checkpoints "
        f"({n_files:,} files) deleted"
    )
    print()
    print_table(
        ["", "ckptd", "anchor", "ckptd/anchor"],
        [
            [
                "whole process: ckptd prune vs xargs rm (s)",
                fmt(cli_wall, 3),
                fmt(rm_wall, 3),
                fmt_ratio(r_cli),
            ],
            [
                "  same, --json output instead of tables (s)",
                fmt(json_wall, 3),
                "",
                fmt_ratio(ratio(json_wall, rm_wall)),
            ],
            [
                "  same command again, nothing to delete (s)",
                fmt(again_wall, 3),
                "",
                "",
            ],
            [
                "  checkpoints deleted/s",
                fmt(doomed_n / cli_wall, 0),
                fmt(doomed_n / rm_wall, 0),
                "",
            ],
            ["  files deleted/s", fmt(n_files / cli_wall, 0), fmt(n_files / rm_wall, 0), ""],
            [
                "in-process: api.prune.prune vs os.unlink loop (s)",
                fmt(in_wall, 3),
                fmt(unlink_wall, 3),
                fmt_ratio(r_in),
            ],
            [
                "  checkpoints deleted/s",
                fmt(doomed_n / in_wall, 0),
                fmt(doomed_n / unlink_wall, 0),
                "",
            ],
            ["  files deleted/s", fmt(n_files / in_wall, 0), fmt(n_files / unlink_wall, 0), ""],
            ["records each deletion, fixes state files", "yes", "no", ""],
        ],
    )
    print()
    checked = (("ckptd prune", cli_check), ("ckptd prune --json", json_check))
    for label, chk in (*checked, ("Pruner in-process", in_check)):
        print(
            f"check {label}: states {chk['states']}; kept steps {chk['kept_steps']}; "
            f"'pruned' events {chk['pruned_actions']:,}; run dirs with more than ckpt-100 + "
            f"state file: {chk['dirs_not_just_newest']}; wrong state files: "
            f"{chk['state_files_wrong']} → {'OK' if chk['ok'] else 'FAILED'}"
        )
    print(
        f"in-process Pruner reported {in_pruned:,} pruned, {in_failed} failed; rm left "
        f"{rm_left} of its files; `ckptd prune` printed {len(cproc.stdout):,} bytes."
    )
    checks_ok = (
        cli_check["ok"]
        and json_check["ok"]
        and in_check["ok"]
        and in_pruned == doomed_n
        and not rm_left
    )
    met_cli = r_cli is not None and r_cli <= TARGET_VS_RM and checks_ok
    met_in = r_in is not None and r_in <= TARGET_VS_RM and checks_ok
    print()
    print(
        f"Target: within {TARGET_VS_RM:.0f}× of the rm floor: whole process {fmt(met_cli)} "
        f"({fmt_ratio(r_cli)}), in-process {fmt(met_in)} ({fmt_ratio(r_in)})."
    )
    print(
        "Notes: every tree is identical (hard links of one checkpoint, all in the page cache). "
        f"ckptd's whole-process time includes Python start-up and imports, reading {n:,} rows, "
        "committing intent and result per checkpoint and an audit row per run, fsync'd rewrites of the "
        f"{n_runs} state files, and printing every run's plan; rm only unlinks."
    )
    summary = [
        summary_row(
            f"prune {doomed_n:,} of {n:,}: ckptd prune vs xargs rm",
            cli_wall,
            rm_wall,
            unit="s",
            target=f"<= {TARGET_VS_RM:.0f}x rm",
            ok=met_cli,
            ratio_value=r_cli,
            ratio_label="ckptd/anchor",
        ),
        summary_row(
            f"prune {doomed_n:,} of {n:,}: Pruner in-process vs os.unlink",
            in_wall,
            unlink_wall,
            unit="s",
            target=f"<= {TARGET_VS_RM:.0f}x unlink",
            ok=met_in,
            ratio_value=r_in,
            ratio_label="ckptd/anchor",
        ),
    ]
    save_result(
        "prune",
        {
            "quick": args.quick,
            "runs": n_runs,
            "checkpoints": n,
            "deleted_checkpoints": doomed_n,
            "deleted_files": n_files,
            "build_s": t_build,
            "record_s": [rec_cli, rec_in],
            "ckptd_cli": {"wall_s": cli_wall, "stdout_bytes": len(cproc.stdout), **cli_check},
            "ckptd_cli_again_s": again_wall,
            "ckptd_cli_json": {"wall_s": json_wall, **json_check},
            "ckptd_inproc": {
                "wall_s": in_wall,
                "pruned": in_pruned,
                "failed": in_failed,
                **in_check,
            },
            "anchor_rm": {"wall_s": rm_wall, "command": "xargs -0 rm -f --", "left": rm_left},
            "anchor_unlink": {"wall_s": unlink_wall, "how": "os.unlink loop"},
            "ratio_cli": r_cli,
            "ratio_inproc": r_in,
            "targets_met": {"cli": met_cli, "inproc": met_in},
            "profile": str(prof_path) if prof_path else None,
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
