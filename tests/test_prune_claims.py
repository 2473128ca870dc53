"""Two processes pruning the same runs at once: each run's prune is claimed, never done twice."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ckptd.api import prune
from ckptd.core.model import utcnow
from ckptd.io import fsops
from ckptd.store import claims
from ckptd.store.handle import Store
from tests.conftest import Corpus, ckptd, query
from tests.test_prune import _recorded_runs, _runs_and_watches


def _pruned_once(db: Path) -> list[str]:
    """Every pruned checkpoint's prefix, from the audit rows: each must appear once."""
    subjects = []
    for (detail,) in query(db, "select detail from actions where kind = 'pruned'"):
        subjects += [c["prefix"] for c in json.loads(detail)["checkpoints"]]
    return subjects


@pytest.mark.slow
def test_a_second_prune_of_a_claimed_run_is_skipped_and_says_by_whom(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=2, per_run=5, keep_last=1)
    first, second = Store(engine), Store.open(cfg.daemon.database)  # two handles, one file
    items = _runs_and_watches(engine, cfg)
    versions = dict(query(db, "select id, version from runs"))
    real = fsops.remove_groups
    seen: dict[str, Any] = {}
    once = threading.Lock()  # run directories are cleaned in parallel threads

    def meanwhile(root_: Any, directory: Any, groups: Any) -> Any:
        """While the first prune holds its claims (between its intent and its deletions):
        another process's prune, in this process and from the command line."""
        with once:
            if not seen:
                seen["api"] = prune.prune(second, items)
                seen["dry"] = prune.prune(second, items, dry_run=True)
                conf = tmp_path / "c.toml"
                seen["cli"] = ckptd("prune", "run-0", config=conf, real=True)
                seen["json"] = ckptd("prune", "--json", config=conf, real=True)
        return real(root_, directory, groups)

    monkeypatch.setattr(fsops, "remove_groups", meanwhile)
    done = prune.prune(first, items)
    assert [len(r.pruned) for r in done] == [4, 4] and not any(r.skipped for r in done)
    for r in seen["api"]:
        assert not r.pruned and not r.plan.delete
        assert r.skipped and first.holder in r.skipped, r.skipped
    # A dry run takes no claim: it plans (the rows it reads are already "pruning": nothing to do).
    assert not any(r.skipped for r in seen["dry"])
    cli = seen["cli"]
    assert cli.returncode == 0, cli.stderr
    assert f"run-0: skipped: another prune of it is running ({first.holder}" in cli.stderr
    as_json = json.loads(seen["json"].stdout)
    assert seen["json"].returncode == 0
    assert [first.holder in (r["skipped"] or "") for r in as_json] == [True, True]
    assert all(not r["pruned"] for r in as_json)
    deleted = _pruned_once(db)
    assert sorted(deleted) == sorted(
        f"{root}/run-{r}/ckpt-{s}" for r in range(2) for s in range(1, 5)
    )
    assert not query(db, "select * from run_claims")  # released when done
    # The prune bumped both runs' versions (its intent and its results).
    assert all(v > versions[rid] for rid, v in query(db, "select id, version from runs"))
    second.close()
    engine.dispose()


def test_an_expired_or_dead_holders_claim_lets_the_next_prune_proceed(
    tmp_path: Path, corpus: Corpus
) -> None:
    root, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=3, per_run=4, keep_last=1)
    store = Store(engine)
    items = _runs_and_watches(engine, cfg)
    ids = {r.name: r.id for r, _ in items}
    dead = subprocess.Popen(["true"])  # a process of this host that has exited
    dead.wait()
    now = utcnow()
    holders = {
        "run-0": ("elsewhere:1234:cafe", now - timedelta(seconds=1)),  # expired
        "run-1": (f"{socket.gethostname()}:{dead.pid}:beef", now + timedelta(hours=1)),  # died
        "run-2": ("elsewhere:1234:cafe", now + timedelta(hours=1)),  # alive elsewhere
    }
    doomed = f"{root}/run-1/ckpt-1"
    con = sqlite3.connect(db)
    with con:
        for name, (holder, until) in holders.items():
            con.execute(
                "insert into run_claims (run_id, job, claimed_by, claimed_until) values (?,?,?,?)",
                (ids[name], claims.PRUNE, holder, until.strftime("%Y-%m-%d %H:%M:%S.%f")),
            )
        # The dead holder had committed its intent for run-1's first checkpoint, then died.
        con.execute(
            "update checkpoints set state = 'pruning', reason = 'by the dead' where prefix = ?",
            (doomed,),
        )
    con.close()
    results = {r.run: r for r in prune.prune(store, items)}
    assert len(results["run-0"].pruned) == 3 and not results["run-0"].skipped
    # run-1: its interrupted deletion is finished, then its plan carried out.
    assert len(results["run-1"].pruned) == 3 and not results["run-1"].skipped
    assert results["run-2"].skipped and "elsewhere:1234:cafe" in results["run-2"].skipped
    assert not results["run-2"].pruned and len(list((root / "run-2").glob("ckpt-*.index"))) == 4
    states = dict(query(db, "select prefix, state from checkpoints"))
    assert states[doomed] == "pruned" and not list((root / "run-1").glob("ckpt-1.*"))
    reason = query(db, "select reason from checkpoints where prefix = ?", doomed)[0][0]
    assert reason == "by the dead (resumed after restart)"
    assert sorted(_pruned_once(db)) == sorted(
        f"{root}/run-{r}/ckpt-{s}" for r in range(2) for s in range(1, 4)
    )
    # Only run-2's foreign claim is left.
    assert query(db, "select run_id, claimed_by from run_claims") == [
        (ids["run-2"], "elsewhere:1234:cafe")
    ]
    engine.dispose()


def test_resume_at_start_leaves_alone_a_prune_that_finished_meanwhile(
    tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen with several daemons on one database: a daemon starting (``prune.resume``) read the
    rows of another daemon's prune in flight as interrupted, claimed the run once that prune had
    finished and released it, and pruned the same checkpoints again (two ``pruned`` events)."""
    _, db, cfg, engine = _recorded_runs(tmp_path, corpus, n_runs=1, per_run=4, keep_last=1)
    live, starting = Store(engine), Store.open(cfg.daemon.database)
    items = _runs_and_watches(engine, cfg)
    real_claim, real_remove = claims.claim_many, fsops.remove_groups
    claiming, finished = threading.Event(), threading.Event()
    resumed: list[int] = []

    def claim_after_the_live_prune(store: Any, run_ids: Any, job: str, **kw: Any) -> Any:
        if store is starting:
            claiming.set()
            finished.wait(30)
        return real_claim(store, run_ids, job, **kw)

    def meanwhile(root_: Any, directory: Any, groups: Any) -> Any:
        """The live prune has marked its checkpoints `pruning`: a daemon starts now."""
        if not claiming.is_set():
            thread = threading.Thread(target=lambda: resumed.append(prune.resume(starting)))
            thread.start()
            claiming.wait(30)
            seen["thread"] = thread
        return real_remove(root_, directory, groups)

    seen: dict[str, threading.Thread] = {}
    monkeypatch.setattr(claims, "claim_many", claim_after_the_live_prune)
    monkeypatch.setattr(fsops, "remove_groups", meanwhile)
    assert [len(r.pruned) for r in prune.prune(live, items)] == [3]
    finished.set()
    seen["thread"].join(timeout=30)
    assert resumed == [0]
    pruned = _pruned_once(db)
    assert len(pruned) == len(set(pruned)) == 3, pruned
    starting.close()
    engine.dispose()
