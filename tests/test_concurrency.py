"""Work is claimed, not assumed: processes sharing one database never do the same job twice.

The store's evaluation claims under contention and expiry; ``ckptd evaluate RUN`` touching only
RUN; and the issue's end-to-end check: a daemon and CLI commands evaluating and pruning the same
runs at the same time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from ckptd.core.model import COMPLETE, utcnow
from ckptd.store import audit_reads, claims, evaluation_reads, evaluations, migrate, tables
from ckptd.store import runs as store_runs
from ckptd.store.handle import Store
from tests.conftest import Corpus, ckptd, query, wait_for, write_config

WATCH = "/w"
LONG = timedelta(minutes=5)


@pytest.fixture
def two(database_url: str) -> Iterator[tuple[Store, Store, list[int]]]:
    """Two Stores (as two processes would have) on one database with 2 runs x 20 pending."""
    url = database_url
    a, b = Store.open(url), Store.open(url)
    migrate.ensure_schema(a.engine)
    now = utcnow()
    run_ids = []
    with a.session() as s:
        for r in range(2):
            run_id = s.execute(
                insert(tables.runs).values(
                    name=f"r{r}", path=f"{WATCH}/r{r}", watch_path=WATCH, created_at=now
                )
            ).inserted_primary_key[0]
            run_ids.append(run_id)
            for step in range(20):
                s.execute(
                    insert(tables.checkpoints).values(
                        run_id=run_id,
                        prefix=f"{WATCH}/r{r}/ckpt-{step}",
                        step=step,
                        format="tf2",
                        state=COMPLETE,
                        files=[],
                        signature=[],
                        recorded_at=now,
                    )
                )
    assert evaluations.enqueue(a, [WATCH]) == 40
    assert evaluations.enqueue(b, [WATCH]) == 0  # already queued, by whichever process
    yield a, b, run_ids
    a.close()
    b.close()


def _claim_all(store: Store, won: list[int], start: threading.Barrier) -> None:
    start.wait()
    while cands := evaluations.candidates(store, [WATCH]):
        for cand in cands:
            job = evaluations.claim(store, cand.evaluation_id, ttl=LONG)
            if job is not None:
                won.append(job.checkpoint.id)
                time.sleep(0.01)  # let the other claimer run (its busy wait too): a race needs both
                break


def test_concurrent_claims_take_each_job_exactly_once(two: tuple[Store, Store, list[int]]) -> None:
    a, b, _runs = two
    won: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)
    threads = [
        threading.Thread(target=_claim_all, args=(store, won[name], start), name=f"ckptd-t-{name}")
        for name, store in (("a", a), ("b", b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = Counter(won["a"] + won["b"])
    assert len(claimed) == 40 and set(claimed.values()) == {1}, claimed
    assert won["a"] and won["b"], "one store took every job: the test raced nothing"
    with a.session() as s:
        rows = s.execute(select(tables.evaluations.c.status, tables.evaluations.c.claimed_by)).all()
    assert {st for st, _ in rows} == {"running"}
    assert Counter(h for _, h in rows) == {a.holder: len(won["a"]), b.holder: len(won["b"])}


def test_an_expired_claim_is_claimable_and_a_live_one_is_not(
    two: tuple[Store, Store, list[int]],
) -> None:
    a, b, _runs = two
    first = evaluations.candidates(a, [WATCH])[0]
    job = evaluations.claim(a, first.evaluation_id, ttl=timedelta(milliseconds=300))
    assert job is not None and job.attempt == 1
    assert evaluations.claim(b, first.evaluation_id, ttl=LONG) is None  # live: a holds it
    assert first.evaluation_id not in {c.evaluation_id for c in evaluations.candidates(b, [WATCH])}
    assert evaluations.renew(a, job, ttl=timedelta(milliseconds=300))  # still a's
    time.sleep(0.5)  # a stops renewing (it hangs, or died): the claim expires
    assert first.evaluation_id in {c.evaluation_id for c in evaluations.candidates(b, [WATCH])}
    taken = evaluations.claim(b, first.evaluation_id, ttl=LONG)
    assert taken is not None and taken.attempt == 2
    # a wakes up: it can neither renew nor record; b's result is the one recorded.
    assert not evaluations.renew(a, job, ttl=LONG)
    assert not evaluations.finish_done(a, job, {"eval/score": 0.5}, 1.0)
    assert not evaluations.release(a, job)
    with a.session() as s:
        assert s.scalars(select(tables.metrics.c.value)).all() == []
        version = s.scalar(
            select(tables.runs.c.version).where(tables.runs.c.id == job.checkpoint.run_id)
        )
    assert evaluations.finish_done(b, taken, {"eval/score": 0.25}, 1.0)
    with a.session() as s:
        assert s.scalars(select(tables.metrics.c.value)).all() == [0.25]
        # A metric write bumps its run's version (recording then re-reads the run).
        assert (
            s.scalar(select(tables.runs.c.version).where(tables.runs.c.id == job.checkpoint.run_id))
            > version
        )
        status, claimed_by = s.execute(
            select(tables.evaluations.c.status, tables.evaluations.c.claimed_by).where(
                tables.evaluations.c.id == first.evaluation_id
            )
        ).one()
        (evaluated,) = audit_reads.actions(s, kinds=["evaluated"])
    assert (status, claimed_by) == ("done", None)
    assert evaluated.detail["metrics"] == {"eval/score": 0.25}


def test_jobs_of_an_exited_process_return_at_once_and_a_live_ones_stay(
    two: tuple[Store, Store, list[int]],
) -> None:
    a, b, _runs = two
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        dead_store = Store(a.engine, holder=f"{host}:{exited.pid}:dead")
        live_store = Store(a.engine, holder=f"{host}:{alive.pid}:live")
        c1, c2 = evaluations.candidates(a, [WATCH])[:2]
        assert evaluations.claim(dead_store, c1.evaluation_id, ttl=LONG)
        assert evaluations.claim(live_store, c2.evaluation_id, ttl=LONG)
        assert claims.claim(dead_store, 1, claims.FREEZE, ttl=LONG)
        assert claims.claim(live_store, 2, claims.FREEZE, ttl=LONG)
        assert evaluations.release_gone(b) == 1
        assert claims.release_gone(b, claims.FREEZE) == 1
        ids = {c.evaluation_id for c in evaluations.candidates(b, [WATCH])}
        assert c1.evaluation_id in ids and c2.evaluation_id not in ids
        assert claims.claim(b, 1, claims.FREEZE) and not claims.claim(b, 2, claims.FREEZE)
    finally:
        alive.kill()
        alive.wait()


def test_claims_are_narrowed_to_the_runs_asked_for(two: tuple[Store, Store, list[int]]) -> None:
    a, _b, (r0, r1) = two
    assert {c.checkpoint_id for c in evaluations.candidates(a, [WATCH], run_ids=[r1])} == set(
        range(21, 41)
    )
    assert evaluation_reads.pending_count(a, run_ids=[r0]) == 20
    assert evaluations.candidates(a, ["/elsewhere"]) == []


def test_an_export_another_process_holds_is_skipped_with_a_clear_message(
    two: tuple[Store, Store, list[int]], tmp_path: Path
) -> None:
    from ckptd.api.freeze import Freezer
    from ckptd.config import parse_config
    from ckptd.worker.client import WorkerClient

    a, b, (run_id, _) = two
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:///unused.db"},
            "watch": [
                {
                    "path": WATCH,
                    "runs": "*",
                    "best": {"metric": "eval/score"},
                    "freeze": {"export_dir": str(tmp_path / "export")},
                }
            ],
        }
    )
    with a.session() as s:
        run = next(r for r in store_runs.runs(s) if r.id == run_id)
    assert claims.claim(b, run_id, claims.FREEZE)  # b (the daemon, say) is exporting the run
    freezer = Freezer(a, WorkerClient())
    try:
        outcome = freezer.freeze_run(run, cfg.watches[0], force=True)
    finally:
        freezer.close()
    assert outcome.status == "skipped" and freezer.client.started == 0
    assert b.holder in outcome.message and "try again when it has finished" in outcome.message
    with a.session() as s:
        assert s.scalar(select(func.count()).select_from(tables.exports)) == 0
    claims.release(b, run_id, claims.FREEZE)
    assert claims.holder_of(a, run_id, claims.FREEZE) is None


def test_recovery_leaves_an_export_in_progress_in_a_live_process_alone(
    two: tuple[Store, Store, list[int]], tmp_path: Path
) -> None:
    """A daemon starting while `ckptd freeze` exports: the CLI's intent row and temp dir are
    in use, not debris of a crash."""
    from ckptd.api.freeze import TMP_PREFIX, Freezer
    from ckptd.config import parse_config
    from ckptd.worker.client import WorkerClient

    a, b, (run_id, _) = two
    export = tmp_path / "export"
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:///unused.db"},
            "watch": [
                {
                    "path": WATCH,
                    "runs": "*",
                    "best": {"metric": "eval/score"},
                    "freeze": {"export_dir": str(export)},
                }
            ],
        }
    )
    temp = export / "r0" / f"{TMP_PREFIX}19-0123abcd"
    temp.mkdir(parents=True)
    with b.session() as s:
        cid = s.scalar(
            select(tables.checkpoints.c.id).where(tables.checkpoints.c.run_id == run_id).limit(1)
        )
        s.execute(
            insert(tables.exports).values(
                checkpoint_id=cid,
                format="saved_model",
                version=19,
                path=str(export / "r0" / "19"),
                status="exporting",
                created_at=utcnow(),
            )
        )
    assert claims.claim(b, run_id, claims.FREEZE)  # b is `ckptd freeze r0`, still running
    freezer = Freezer(a, WorkerClient())
    try:
        assert freezer.recover(cfg.watches) == 0
        assert temp.is_dir()
        with a.session() as s:
            assert s.execute(select(tables.exports.c.status)).all() == [("exporting",)]
        claims.release(b, run_id, claims.FREEZE)  # b was killed before it could finish
        assert freezer.recover(cfg.watches) == 1
    finally:
        freezer.close()
    assert not temp.exists()
    with a.session() as s:
        ((status, error),) = s.execute(
            select(tables.exports.c.status, tables.exports.c.error)
        ).all()
    assert status == "failed" and "interrupted" in error


@pytest.mark.slow
def test_a_long_evaluation_renews_its_claim_so_nobody_takes_it_over(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.api import evaluate as api_evaluate
    from ckptd.config import parse_config

    ttl = timedelta(milliseconds=600)
    monkeypatch.setattr(api_evaluate, "CLAIM_TTL", ttl)
    watch = tmp_path / "runs"
    (watch / "r").mkdir(parents=True)
    prefix = watch / "r" / "ckpt-1"
    Path(f"{prefix}.index").touch()  # a command evaluator does not read it
    url = database_url
    a, b = Store.open(url), Store.open(url)
    migrate.ensure_schema(a.engine)
    with a.session() as s:
        run_id = s.execute(
            insert(tables.runs).values(
                name="r", path=str(watch / "r"), watch_path=str(watch), created_at=utcnow()
            )
        ).inserted_primary_key[0]
        s.execute(
            insert(tables.checkpoints).values(
                run_id=run_id,
                prefix=str(prefix),
                step=1,
                format="tf2",
                state=COMPLETE,
                files=[],
                signature=[],
                recorded_at=utcnow(),
            )
        )
    slow = "import json, time; time.sleep(2.5); print(json.dumps({{'eval/score': 1}}))"
    cfg = parse_config(
        {
            "daemon": {"database": url},
            "watch": [
                {
                    "path": str(watch),
                    "runs": "*",
                    "evaluate": {"evaluator": "command", "command": [sys.executable, "-c", slow]},
                }
            ],
        }
    )
    evaluator = api_evaluate.Evaluator(a, cfg)
    assert evaluator.enqueue() == 1
    outcomes: list[api_evaluate.EvalOutcome] = []
    worker = threading.Thread(
        target=lambda: outcomes.extend(evaluator.run_pending()), name="ckptd-test-evaluate"
    )
    worker.start()
    try:
        wait_for(lambda: evaluation_reads.pending_count(a) == 0, timeout=10)
        renewers = [t.name for t in threading.enumerate() if t.name.startswith("ckptd-renew")]
        assert renewers == ["ckptd-renew-evaluation"]
        taken = []
        while worker.is_alive():  # another process tries all along, well past the TTL
            with b.session() as s:
                (eid,) = s.scalars(select(tables.evaluations.c.id)).all()
            job = evaluations.claim(b, eid, ttl=LONG)
            if job is not None:
                taken.append(job)
                break
            time.sleep(0.1)
    finally:
        worker.join(timeout=30)
        evaluator.close()
        a.close()
        b.close()
    assert not taken, "the claim expired while its evaluation ran"
    assert [(o.status, o.metrics) for o in outcomes] == [("done", {"eval/score": 1.0})]


# ------------------------------------------------------------------ with real checkpoints

COUNTING_EVALUATOR = """
import fcntl, json, os, sys, time
prefix, step, log, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(log, "a") as fh:  # one line per call: the test counts evaluations per checkpoint
    fcntl.flock(fh, fcntl.LOCK_EX)
    fh.write(json.dumps({"prefix": prefix, "pid": os.getppid()}) + "\\n")
deadline = time.monotonic() + 120
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.05)  # held until the test opens the gate
time.sleep(0.2)
print(json.dumps({"eval/score": step / 100}))
"""


def _evaluate_section(tmp_path: Path, gate: Path, *, every: str = "1h") -> tuple[str, Path]:
    """A command evaluator that logs each call, then waits for ``gate`` to exist."""
    script = tmp_path / "count_eval.py"
    script.write_text(textwrap.dedent(COUNTING_EVALUATOR))
    log = tmp_path / "evaluations.log"
    argv = [sys.executable, str(script), "{checkpoint}", "{step}", str(log), str(gate)]
    section = (
        '\n[watch.evaluate]\nevaluator = "command"\n'
        f"every = {json.dumps(every)}\ncommand = {json.dumps(argv)}\n"
    )
    return section, log


def _calls(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(json.loads(line)["prefix"] for line in log.read_text().splitlines())


@pytest.mark.tf
def test_evaluate_run_leaves_other_runs_pending(tmp_path: Path, corpus: Corpus) -> None:
    root = tmp_path / "runs"
    for name in ("a", "b"):
        corpus.copy("tf2", root / name)
    db = tmp_path / "ckptd.db"
    record = write_config(tmp_path / "record.toml", root, db=db)
    assert ckptd("run", "--once", config=record).returncode == 0
    gate = tmp_path / "gate"
    gate.touch()
    section, log = _evaluate_section(tmp_path, gate)
    conf = write_config(tmp_path / "c.toml", root, db=db, extra=section)
    # b's checkpoints are queued (as the daemon queues them) before `ckptd evaluate a`.
    from ckptd.api.evaluate import Evaluator
    from ckptd.config import load_config

    store = Store.open(f"sqlite:///{db}")
    try:
        with store.session() as s:
            b_id = store_runs.resolve_run(s, "b").id
        assert Evaluator(store, load_config(conf)).enqueue(run_ids=[b_id]) == 3
    finally:
        store.close()
    result = ckptd("evaluate", "a", "--json", config=conf, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(o["checkpoint"] for o in json.loads(result.stdout)) == ["a@10", "a@20", "a@30"]
    assert {p.rsplit("/", 2)[-2] for p in _calls(log)} == {"a"}
    by_run = query(
        db,
        "select r.name, e.status, e.attempts, e.claimed_by from evaluations e"
        " join checkpoints c on c.id = e.checkpoint_id join runs r on r.id = c.run_id",
    )
    assert sorted(by_run) == [("a", "done", 1, None)] * 3 + [("b", "pending", 0, None)] * 3


# The metric comes only from evaluation (the corpus's event files have eval/accuracy).
RETAIN = """
[watch.best]
metric = "eval/score"

[watch.retain]
keep_last = 1
keep_best = 1
min_age = "0s"
every = "{every}"
"""


@pytest.mark.tf
def test_daemon_and_cli_evaluate_and_prune_the_same_runs_at_once(
    tmp_path: Path, corpus: Corpus, daemon_factory
) -> None:
    """The issue's test: a running daemon, `ckptd evaluate RUN` and `ckptd prune RUN` on the same
    runs at the same time. Every checkpoint is evaluated exactly once, nothing is pruned twice,
    and the daemon's view is right afterwards without a restart."""
    root = tmp_path / "runs"
    names = ["a", "b", "c", "d"]
    for name, kind in zip(names, ["tf2", "tf1", "tf2", "tf1"], strict=True):
        corpus.copy(kind, root / name)
    db = tmp_path / "ckptd.db"
    # The retention keeps an unevaluated checkpoint (keep_best: its metric comes from
    # evaluation); evaluations wait at a gate until the daemon and every CLI evaluate hold one.
    gate = tmp_path / "gate"
    section, log = _evaluate_section(tmp_path, gate, every="1s")
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=db,
        extra=RETAIN.format(every="1s") + section,
        rescan="1s",
        best=False,
    )
    d = daemon_factory(conf)
    total = 3 * len(names)
    wait_for(lambda: query(db, "select count(*) from evaluations")[0][0] == total, timeout=60)

    def start(cmd: str, run: str) -> subprocess.Popen[str]:
        # --no-daemon: each `ckptd evaluate` works in a worker of its own, racing the daemon's
        # (by default it would hand the work to the daemon).
        here = ["--no-daemon"] if cmd == "evaluate" else []
        return subprocess.Popen(
            [sys.executable, "-m", "ckptd", "--config", str(conf), cmd, run, *here, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    cli = [("evaluate", n) for n in names[:3]]
    procs = [start(*args) for args in cli]
    running = "select count(*) from evaluations where status = 'running'"
    wait_for(lambda: query(db, running)[0][0] == 1 + len(procs), timeout=120)
    cli += [("prune", n) for n in names] * 2
    procs += [start(*args) for args in cli[len(procs) :]]
    gate.touch()
    results = [(args, p.communicate(timeout=180)) for args, p in zip(cli, procs, strict=True)]
    for (cmd, run), (_out, err) in results:
        assert "Traceback" not in err, (cmd, run, err)
    for ((cmd, run), (out, err)), p in zip(results, procs, strict=True):
        if cmd == "evaluate":
            assert p.returncode == 0, (run, err)
            assert all(o["status"] == "done" for o in json.loads(out)), out

    # Everything evaluated, and the daemon's prune caught up: each run keeps newest and best.
    wait_for(
        lambda: query(db, "select count(*) from evaluations where status = 'done'")[0][0] == total,
        timeout=120,
    )
    time.sleep(3)  # a few more rescans and prunes by the daemon, which must change nothing
    calls = _calls(log)
    assert len(calls) == total and set(calls.values()) == {1}, calls
    evaluators = {json.loads(line)["pid"] for line in log.read_text().splitlines()}
    assert d.proc is not None and d.proc.pid in evaluators and len(evaluators) > 1, (
        "the daemon and the CLI did not both evaluate: the test raced nothing"
    )
    evaluated = query(db, "select checkpoint_id from actions where kind = 'evaluated'")
    assert len(evaluated) == total and len(set(evaluated)) == total
    assert query(db, "select distinct attempts from evaluations") == [(1,)]
    store = Store.open(f"sqlite:///{db}", readonly=True)
    try:
        with store.session() as s:
            pruned = [a.subject for a in audit_reads.actions(s, kinds=["pruned"], limit=10_000)]
    finally:
        store.close()
    assert len(pruned) == len(set(pruned)), Counter(pruned)
    assert len(pruned) == total - len(names)  # all but the newest (= best) of each run
    assert d.proc is not None and d.proc.poll() is None, d.log()

    # The daemon's view, without a restart: exactly the pruned are pruned, nothing is "gone".
    listing = json.loads(ckptd("ls", "--all", "--json", config=conf).stdout)
    states = Counter(c["state"] for c in listing)
    assert states == {"complete": len(names), "pruned": total - len(names)}, listing
    for c in listing:
        assert Path(c["path"] + ".index").exists() == (c["state"] == "complete"), c
    status = json.loads(ckptd("status", "--json", config=conf).stdout)
    assert status["counts"] == dict(states), status
    assert status["evaluations"] == {"done": total}, status
    assert "Traceback" not in d.log()
    assert d.stop() == 0
