"""Failover: how long after a ``kill -9`` of the daemon holding a run's lease the other daemon
records that run's next checkpoint.

Two real ``ckptd run`` daemons (names ``a`` and ``b``) on one PostgreSQL database (a throwaway
local cluster, tests/pg.py) watch the same path, as two hosts watching one NFS share do, with a
short ``lease_ttl`` and ``rescan_interval``. A writer in this process adds a checkpoint to every
run four times a second (hard links of one real TF1 checkpoint, stepped by file name). Each
round: SIGKILL the process group of the daemon holding most leases (its host died), then wait
for the first checkpoint recorded in one of its runs after the kill (the survivor took a run
over and recorded it), and for one in every run it held (all taken over); then start the killed
daemon again under its name (it stands by: its leases are held by the other now), and the next
round kills whichever holds the runs. The target is ``lease_ttl`` + 2 s: a lease expires at most
``lease_ttl`` after its last renewal, and the survivor claims expired leases at its next scan.

Usage: .venv/bin/python bench/failover.py [--quick] [--kills N] [--runs R] [--ttl S]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _pg
from _common import (
    Daemon,
    check,
    ckptd_cmd,
    db_epoch,
    fmt,
    kill_group,
    median,
    print_table,
    query,
    save_result,
    summary_row,
    timed_run,
    train,
    wait_for,
    write_config,
)

SLACK_S = 2.0  # the target: lease_ttl + this
BY_NAME = 'step_variable = "none"'  # the hard-linked copies all hold one step: take the name's


class Writer(threading.Thread):
    """Adds ``model.ckpt-K`` to every run every ``interval`` s (data first, index last, as TF)."""

    def __init__(self, files: list[Path], runs: list[Path], interval: float) -> None:
        super().__init__(daemon=True)
        self.files, self.runs, self.interval = files, runs, interval
        self.stop_event = threading.Event()
        self.step = 0

    def run(self) -> None:
        order = sorted(self.files, key=lambda p: p.suffix == ".index")
        while not self.stop_event.wait(self.interval):
            self.step += 1
            for run in self.runs:
                for f in order:
                    suffix = f.name.split(".", 2)[2]  # data-00000-of-00001, index, meta
                    os.link(f, run / f"model.ckpt-{self.step}.{suffix}")


def holders(url: str) -> dict[str, list[int]]:
    """Live leases: owner -> run ids."""
    out: dict[str, list[int]] = {}
    for owner, run in query(url, "select owner, run_id from run_leases where expires_at > now()"):
        out.setdefault(owner, []).append(run)
    return out


def first_after(url: str, runs: list[int], t: float) -> dict[int, float]:
    """Per run, the first checkpoint recorded after ``t`` (epoch seconds), as epoch seconds."""
    rows = query(
        url,
        "select run_id, min(recorded_at) from checkpoints where run_id = any(?) and "
        "recorded_at > to_timestamp(?) at time zone 'UTC' group by run_id",
        runs,
        t,
    )
    return {run: db_epoch(at) for run, at in rows}  # type: ignore[misc]


def _count(url: str) -> int:
    return int(query(url, "select count(*) from checkpoints")[0][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 kills")
    ap.add_argument("--kills", type=int, default=None, help="rounds (default 10)")
    ap.add_argument("--runs", type=int, default=4, help="runs both daemons watch (default 4)")
    ap.add_argument("--ttl", type=float, default=5.0, help="[daemon] lease_ttl in s (default 5)")
    ap.add_argument("--rescan", type=float, default=1.0, help="rescan_interval in s (default 1)")
    args = ap.parse_args()
    kills = args.kills or (3 if args.quick else 10)
    why = _pg.unavailable()
    if why:
        print(f"failover needs PostgreSQL: {why}")
        return 1
    target = args.ttl + SLACK_S

    with tempfile.TemporaryDirectory(prefix="ckptd-bench-failover-") as tmp, _pg.cluster() as pg:
        work = Path(tmp)
        src = work / "source"
        train("tf1", src, "--steps", "1", "--save-every", "1", "--no-npz")
        files = sorted(p for p in src.iterdir() if p.name.startswith("model.ckpt-1."))
        root = work / "runs"
        runs = [root / f"run-{r:02d}" for r in range(args.runs)]
        for run in runs:
            run.mkdir(parents=True)
        url = pg.new_database()
        settings = f'lease_ttl = "{args.ttl:g}s"\nrescan_interval = "{args.rescan:g}s"'
        daemons: dict[str, Daemon] = {}
        for name in ("a", "b"):
            config = write_config(
                work / f"{name}.toml",
                root,
                db=url,
                daemon=f'name = "{name}"\n{settings}',
                watch_extra=BY_NAME,
            )
            if not daemons:
                _, proc = timed_run(ckptd_cmd(config, "db", "upgrade"))
                check(proc, "ckptd db upgrade")
            daemons[name] = Daemon(config, work / f"{name}.log").start()
        writer = Writer(files, runs, 0.25)
        writer.start()
        rounds: list[dict[str, Any]] = []
        try:
            wait_for(
                lambda: sum(len(v) for v in holders(url).values()) == args.runs,
                timeout=60,
                what="every run's lease to be held",
            )
            for k in range(kills):
                held = holders(url)
                victim = max(held, key=lambda owner: len(held[owner]))
                its_runs = held[victim]
                time.sleep(1.0)  # checkpoints keep coming; the victim is mid-work
                t_kill = time.time()
                proc = daemons[victim].proc
                assert proc is not None
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                firsts = wait_for(
                    lambda runs_=its_runs, t=t_kill: (
                        f if len(f := first_after(url, runs_, t)) == len(runs_) else None
                    ),
                    timeout=args.ttl * 6 + 30,
                    what="the survivor to record every run of the killed daemon",
                )
                new_owner = {o for o, rs in holders(url).items() if set(rs) & set(its_runs)}
                r = {
                    "killed": victim,
                    "runs": len(its_runs),
                    "first_s": min(firsts.values()) - t_kill,
                    "all_s": max(firsts.values()) - t_kill,
                    "new_owner": sorted(new_owner),
                }
                rounds.append(r)
                print(
                    f"kill {k + 1}/{kills}: daemon {victim} ({len(its_runs)} runs) → first "
                    f"checkpoint by {', '.join(r['new_owner'])} after {r['first_s']:.2f} s, all "
                    f"its runs after {r['all_s']:.2f} s",
                    flush=True,
                )
                daemons[victim].stop()  # reaped already; closes its log
                daemons[victim] = Daemon(daemons[victim].config, work / f"{victim}.log").start()
                time.sleep(2.0)  # it starts, sees every lease held, stands by
        finally:
            writer.stop_event.set()
            writer.join()
            expected = writer.step * args.runs
            try:  # the last ones written are recorded within a moment
                wait_for(lambda: _count(url) >= expected, timeout=10, what="the last checkpoints")
            except TimeoutError:
                pass
            recorded, distinct = query(
                url, "select count(*), count(distinct prefix) from checkpoints"
            )[0]
            for d in daemons.values():
                if d.proc is not None:
                    kill_group(d.proc)

    firsts = [r["first_s"] for r in rounds]
    alls = [r["all_s"] for r in rounds]
    p50, worst = median(firsts), max(firsts)
    complete = recorded == distinct == expected
    met = worst <= target and complete
    print()
    print(
        f"Failover over {kills} kill -9s: 2 daemons on one PostgreSQL, {args.runs} runs, "
        f"lease_ttl {args.ttl:g} s, rescan_interval {args.rescan:g} s, 4 checkpoints/s a run"
    )
    print()
    print_table(
        ["kill -9 → first checkpoint recorded by the new owner", "p50 (s)", "max (s)", "target"],
        [
            ["first of its runs", fmt(p50, 2), fmt(worst, 2), f"≤ {target:g} s"],
            ["every one of its runs", fmt(median(alls), 2), fmt(max(alls), 2), ""],
        ],
    )
    print()
    print(
        f"Target: max ≤ lease_ttl + {SLACK_S:g} s = {target:g} s: {fmt(met)}. "
        f"Every checkpoint written recorded once: {fmt(complete)} ({expected:,} written, "
        f"{recorded:,} rows, {distinct:,} distinct)."
    )
    summary = [
        summary_row(
            f"failover after kill -9 (ttl {args.ttl:g} s), p50",
            p50,
            None,
            unit="s",
            target=f"<= {target:g} s",
            ok=p50 is not None and p50 <= target,
        ),
        summary_row(
            f"failover after kill -9 (ttl {args.ttl:g} s), max of {kills}",
            worst,
            None,
            unit="s",
            target=f"<= {target:g} s",
            ok=met,
        ),
    ]
    save_result(
        "failover",
        {
            "quick": args.quick,
            "kills": kills,
            "runs": args.runs,
            "lease_ttl_s": args.ttl,
            "rescan_interval_s": args.rescan,
            "target_s": target,
            "rounds": rounds,
            "written_per_run": writer.step,
            "recorded": recorded,
            "recorded_distinct": distinct,
            "complete": complete,
            "targets_met": {"max": met},
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
