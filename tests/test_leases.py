"""Run leases on one database: claim, renew, take over, fence (store and recorder), names."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ckptd.api.record import Recorder
from ckptd.core.recording import RunDir
from ckptd.daemon.leases import LeaseKeeper
from ckptd.store import daemons, leases, migrate, recording
from ckptd.store.handle import Store
from ckptd.store.leases import Fenced, Hold
from tests.conftest import Corpus, load_golden

TTL = 1.0


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on SQLite and on PostgreSQL."""
    s = Store.open(database_url)
    migrate.ensure_store_schema(s)
    yield s
    s.close()


def sql(store: Store, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(statement), params)]


def _run_ids(store: Store, corpus: Corpus) -> list[int]:
    runs = [RunDir(k, corpus.root / k, corpus.root) for k in ("tf1", "tf2")]
    states = recording.load_states(store, runs)
    return sorted(s.run_id for s in states.values())


def test_claim_renew_take_over_after_expiry(store: Store, golden: Corpus) -> None:
    ids = _run_ids(store, golden)
    assert leases.claim(store, "a", ids, TTL) == dict.fromkeys(ids, 1)
    assert leases.claim(store, "b", ids, TTL) == {}  # live: not taken
    assert leases.renew(store, "a", dict.fromkeys(ids, 1), TTL) == dict.fromkeys(ids, 1)
    time.sleep(TTL + 0.1)
    assert leases.claim(store, "b", ids, TTL) == dict.fromkeys(ids, 2)  # a new epoch
    assert leases.renew(store, "a", dict.fromkeys(ids, 1), TTL) == {}  # a lost them
    with store.session() as s:
        held = leases.held_by_owner(s)
    assert set(held) == {"b"} and held["b"].runs == 2
    leases.release(store, "b")
    assert leases.claim(store, "a", ids, TTL) == dict.fromkeys(ids, 3)  # released: free now


def test_a_stale_holders_recording_is_fenced(store: Store, golden: Corpus) -> None:
    """The write itself checks the epoch: a holder paused past its lease writes nothing."""
    run = RunDir("tf2", golden.root / "tf2", golden.root)
    state = recording.load_state(store, run)
    assert leases.claim(store, "a", [state.run_id], TTL) == {state.run_id: 1}
    time.sleep(TTL + 0.1)
    assert leases.claim(store, "b", [state.run_id], TTL) == {state.run_id: 2}

    class Stale:  # what a daemon that has not noticed yet believes
        def __init__(self) -> None:
            self.lost_runs: list[int] = []

        def claim(self, run_ids: Collection[int]) -> None:
            pass

        def hold(self, run_id: int) -> Hold | None:
            return Hold(run_id, "a", 1)

        current = hold

        def lost(self, hold: Hold, what: str) -> None:
            self.lost_runs.append(hold.run_id)

    stale = Stale()
    outcome = Recorder(store, leases=stale).record(run)
    assert outcome.recorded == [] and stale.lost_runs == [state.run_id]
    assert sql(store, "select count(*) from checkpoints") == [(0,)]
    with pytest.raises(Fenced):
        recording.apply(store, state, _some_changes(store, run), Hold(state.run_id, "a", 1))
    # The holder records.
    outcome = Recorder(store, leases=_Fixed(Hold(state.run_id, "b", 2))).record(run)
    assert len(outcome.recorded) == 3


class _Fixed:
    def __init__(self, hold: Hold) -> None:
        self._hold = hold

    def claim(self, run_ids: Collection[int]) -> None:
        pass

    def hold(self, run_id: int) -> Hold | None:
        return self._hold

    current = hold

    def lost(self, hold: Hold, what: str) -> None:
        raise AssertionError("not fenced")


def _some_changes(store: Store, run: RunDir):  # type: ignore[no-untyped-def]
    from ckptd.core.recording import diff
    from ckptd.io.observe import Request, observe

    state = recording.load_state(store, run)
    return diff(observe(Request.for_state(run, state, 0.0)), state)


def test_keeper_stops_acting_when_renewals_are_late(store: Store, golden: Corpus) -> None:
    """By its own monotonic clock: past TTL minus a margin without a renewal, nothing is held
    (and a fenced write is logged and audited as ``fenced``)."""
    ids = _run_ids(store, golden)
    keeper = LeaseKeeper(store, "a", TTL)
    keeper.claim(ids)
    assert all(keeper.holds(r) for r in ids)
    keeper._renewed -= TTL  # as if paused (SIGSTOP) past the TTL
    assert not keeper.holds(ids[0]) and keeper.held() == {}
    keeper.lost(Hold(ids[0], "a", 1), "recording")
    fenced = sql(store, "select subject, reason from actions where kind = 'fenced'")
    assert fenced == [
        ("a", "recording refused: daemon a no longer holds the run's lease (epoch 1)")
    ]


def test_daemons_of_distinct_names_share_a_database(store: Store) -> None:
    from sqlalchemy import text

    first = daemons.claim(store, name="a", version="1", config="c", status={})
    with store.session() as s:  # on another host: alive as long as its heartbeat is fresh
        s.execute(text("update daemons set host = 'elsewhere'"))
    second = daemons.claim(store, name="b", version="1", config="c", status={})
    assert first != second
    with pytest.raises(daemons.AlreadyRunning, match="another \\[daemon\\] name"):
        daemons.claim(store, name="a", version="1", config="c", status={})
    with store.session() as s:
        newest = daemons.latest(s)
        assert newest is not None and newest.name == "b"
        assert [d.name for d in daemons.others(s, newest)] == ["a"]


def test_name_and_lease_ttl_are_config_keys(tmp_path: Path) -> None:
    import socket

    from ckptd.config import parse_config

    base = {"database": f"sqlite:///{tmp_path}/d.db"}
    default = parse_config({"daemon": base}).daemon
    assert default.name == socket.gethostname() and default.lease_ttl.total_seconds() == 30
    cfg = parse_config({"daemon": {**base, "name": "gpu-1", "lease_ttl": "3s"}}).daemon
    assert cfg.name == "gpu-1" and cfg.lease_ttl.total_seconds() == 3
    with pytest.raises(Exception, match="name"):
        parse_config({"daemon": {**base, "name": ""}})
    with pytest.raises(Exception, match="lease_ttl"):
        parse_config({"daemon": {**base, "lease_ttl": "1s"}})


def test_a_stale_holders_prune_intent_is_fenced(store: Store, tmp_path: Path) -> None:
    """The prune's intent checks the lease in its transaction: nothing is marked or deleted."""
    from ckptd.api import prune as api_prune
    from ckptd.config import parse_config

    golden = load_golden(tmp_path / "runs")  # a copy of its own: this prunes it
    run = RunDir("tf2", golden.root / "tf2", golden.root)
    state = recording.load_state(store, run)
    Recorder(store).record(run)
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:////unused.db"},
            "watch": [{"path": str(golden.root), "runs": "*", "retain": {"keep_last": 1}}],
        }
    )
    assert leases.claim(store, "a", [state.run_id], TTL) == {state.run_id: 1}
    time.sleep(TTL + 0.1)
    assert leases.claim(store, "b", [state.run_id], TTL) == {state.run_id: 2}
    (r,) = [r for r in api_prune.runs(store) if r.name == "tf2"]
    stale = Hold(state.run_id, "a", 1)
    (result,) = api_prune.prune(store, [(r, cfg.watches[0])], holds=lambda _: stale)
    assert result.pruned == [] and "fenced" in (result.skipped or "")
    states = sql(store, "select state from checkpoints where run_id = :r", r=r.id)
    assert sorted(s for (s,) in states) == ["complete"] * 3
    assert all(Path(c["prefix"] + ".index").exists() for c in golden.saves["tf2"])
    holder = Hold(state.run_id, "b", 2)
    (result,) = api_prune.prune(store, [(r, cfg.watches[0])], holds=lambda _: holder)
    assert len(result.pruned) == 2


def test_concurrent_claims_of_the_same_runs_never_collide(
    store: Store, golden: Corpus, database_url: str
) -> None:
    """Four daemons claim the same free (then expired) runs at once, each with a run of its
    own too, in threads of their own connections: no error, each run held by exactly one of
    them at one epoch, and none loses its own run to the others' race for the shared ones."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    shared = _run_ids(store, golden)
    names = ["a", "b", "c", "d"]
    own = [RunDir(n, golden.root / f"own-{n}", golden.root) for n in names]
    states = recording.load_states(store, own)
    private = {r.name: states[str(r.path)].run_id for r in own}
    stores = [Store.open(database_url) for _ in names]
    try:
        for epoch in (1, 2, 3):
            start = Barrier(len(names))

            def race(i: int, start: Barrier = start) -> dict[int, int]:
                start.wait()
                return leases.claim(stores[i], names[i], [*shared, private[names[i]]], TTL)

            with ThreadPoolExecutor(len(names)) as pool:
                got = list(pool.map(race, range(len(names))))
            for i, name in enumerate(names):
                assert got[i].get(private[name]) == epoch, (epoch, name, got)
            for run in shared:
                holders = [names[i] for i, g in enumerate(got) if run in g]
                assert len(holders) == 1, (epoch, run, got)
                assert got[names.index(holders[0])][run] == epoch
            owners = sql(store, "select run_id, epoch from run_leases order by run_id")
            assert owners == [(r, epoch) for r in sorted([*shared, *private.values()])]
            time.sleep(TTL + 0.1)  # all expire: the next round is a takeover race
    finally:
        for s in stores:
            s.close()


def test_an_expired_claim_fences_the_result_and_frees_the_checkpoint(
    store: Store, golden: Corpus
) -> None:
    """A holder that lost its evaluation claim by expiry (nobody took the job over) writes no
    result (a `fenced` event instead); meanwhile the job counts as pending, not running, and
    neither it nor an export whose FREEZE claim is gone keeps the checkpoint `in use`."""
    from datetime import timedelta

    from ckptd.store import claims, evaluation_reads, evaluations, exports, pruning, reads

    run = RunDir("tf2", golden.root / "tf2", golden.root)
    Recorder(store).record(run)
    assert evaluations.enqueue(store, [str(golden.root)]) == 3
    (first, *_) = evaluations.candidates(store, [str(golden.root)])
    job = evaluations.claim(store, first.evaluation_id, ttl=timedelta(milliseconds=300))
    assert job is not None
    c = job.checkpoint
    with store.session() as s:
        (checkpoint,) = reads.checkpoints(s, ids=[c.id])
    exports.begin(
        store, checkpoint, root="/e", on_disk=0, formats="saved_model", metric=None,
        metric_value=None,
    )  # fmt: skip
    assert claims.claim(store, c.run_id, claims.FREEZE, ttl=timedelta(milliseconds=300))

    def planned() -> tuple[str | None, bool]:
        (r,) = pruning.runs(store, watch_path=str(golden.root))
        (history,) = pruning.histories(store, [pruning.Wanted(r, False, ())]).values()
        (mine,) = [h for h in history if h.id == c.id]
        return mine.evaluation, mine.exporting

    assert planned() == ("running", True)
    with store.session() as s:
        assert evaluation_reads.status_counts(s) == {"pending": 2, "running": 1}
    time.sleep(0.5)  # the holder stops renewing (paused, or dead): both claims expire
    assert planned() == ("pending", False)
    with store.session() as s:
        assert evaluation_reads.status_counts(s) == {"pending": 3}
    assert not evaluations.finish_done(store, job, {"eval/score": 1.0}, 1.0)
    assert sql(store, "select count(*) from metrics where source = 'evaluator'") == [(0,)]
    (fenced,) = sql(store, "select checkpoint_id, reason from actions where kind = 'fenced'")
    assert fenced[0] == c.id and "no longer holds its claim" in fenced[1]


def test_a_daemon_claims_only_the_requests_of_runs_it_holds(store: Store, golden: Corpus) -> None:
    from datetime import timedelta

    from ckptd.store import requests

    first, second = _run_ids(store, golden)
    older = requests.submit(store, requests.EVALUATE, first, None, {})
    newer = requests.submit(store, requests.EVALUATE, second, None, {})
    ttl = timedelta(seconds=30)
    assert requests.claim_next(store, ttl=ttl, run_ids=[]) is None
    claimed = requests.claim_next(store, ttl=ttl, run_ids=[second])
    assert claimed is not None and (claimed.id, claimed.run.id) == (newer, second)
    assert requests.claim_next(store, ttl=ttl, run_ids=[second]) is None
    claimed = requests.claim_next(store, ttl=ttl)  # no filter: the oldest
    assert claimed is not None and claimed.id == older


class _TakenOverMidExport:
    """A worker client whose export is written and verified while another daemon takes the
    run's lease over (``take``), as if this daemon had been paused past its TTL meanwhile."""

    def __init__(self, take: Callable[[], None] | None) -> None:
        self.take = take

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if request["op"] == "export":
            out = Path(request["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "saved_model.pb").write_bytes(b"model")
            return {}
        if self.take is not None:
            self.take()
        return {"verified": True, "max_abs_diff": 0.0}

    def close(self) -> None:
        pass


def test_a_stale_holders_export_is_not_published(
    store: Store, golden: Corpus, tmp_path: Path
) -> None:
    """The lease is checked in the transaction of the export row and of its publish (the rename
    into place happens inside it): a daemon that lost the run meanwhile publishes nothing."""
    from ckptd.api.freeze import NOT_HELD, Freezer
    from ckptd.config import parse_config
    from ckptd.store import exports, reads

    run = RunDir("tf2", golden.root / "tf2", golden.root)
    Recorder(store).record(run)
    export_dir = tmp_path / "export"
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:////unused.db"},
            "watch": [
                {
                    "path": str(golden.root),
                    "runs": "*",
                    "best": {"metric": "eval/accuracy"},
                    "freeze": {
                        "export_dir": str(export_dir),
                        "format": ["saved_model"],
                        "inputs": {"x": "x:0"},
                        "outputs": {"y": "y:0"},
                    },
                }
            ],
        }
    )
    (r,) = [r for r in api_runs(store) if r.name == "tf2"]
    with store.session() as s:
        newest = max(reads.checkpoints(s, run_id=r.id), key=lambda c: c.step or 0)
    keeper = LeaseKeeper(store, "a", 30.0)
    keeper.claim([r.id])

    def take() -> None:  # b takes the run over (a's lease expired while it was paused)
        sql_write(store, "update run_leases set owner = 'b', epoch = epoch + 1")

    freezer = Freezer(store, _TakenOverMidExport(take), keeper)  # type: ignore[arg-type]
    outcome = freezer.freeze_run(r, cfg.watches[0], newest)
    assert (outcome.status, outcome.message) == ("skipped", NOT_HELD)
    assert not any(p.name.isdigit() for p in (export_dir / "tf2").iterdir())  # not renamed
    # Not a's to record: the row stays 'exporting' for the run's new holder to settle.
    assert len(exports.listed(store, exports.EXPORTING)) == 1
    assert exports.listed(store, exports.FAILED) == exports.listed(store, exports.PUBLISHED) == []
    assert not keeper.holds(r.id)
    (fenced,) = sql(store, "select reason from actions where kind = 'fenced'")
    assert fenced[0].startswith("export refused")
    # b, the holder, settles it (as it takes the run over: on_taken) and publishes.
    b = LeaseKeeper(store, "b", 30.0)
    b.claim([r.id])
    freezer = Freezer(store, _TakenOverMidExport(None), b)  # type: ignore[arg-type]
    assert freezer.recover(cfg.watches, {r.id}) == 1
    assert exports.listed(store, exports.EXPORTING) == []
    outcome = freezer.freeze_run(r, cfg.watches[0], newest)
    assert outcome.status == "published" and Path(outcome.path or "").is_dir()


def api_runs(store: Store):  # type: ignore[no-untyped-def]
    from ckptd.api import prune as api_prune

    return api_prune.runs(store)


def sql_write(store: Store, statement: str, **params: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(statement), params)


def test_a_run_taken_over_has_its_interrupted_deletions_finished_and_only_it(
    store: Store, tmp_path: Path
) -> None:
    """A holder died between a prune's intent and its deletions: the daemon that takes its run
    over finishes them as it takes it (``on_taken``), and leaves another daemon's run alone."""
    from ckptd.api import prune as api_prune

    corpus = load_golden(tmp_path / "runs")  # a copy of its own: this deletes from it
    ids = _run_ids(store, corpus)
    for kind in ("tf1", "tf2"):
        Recorder(store).record(RunDir(kind, corpus.root / kind, corpus.root))
    first = {
        run: cid
        for run, cid in sql(store, "select run_id, min(id) from checkpoints group by run_id")
    }
    for cid in first.values():
        sql_write(store, "update checkpoints set state = 'pruning' where id = :c", c=cid)
    mine, theirs = ids
    assert leases.claim(store, "b", [theirs], 30.0) == {theirs: 1}
    keeper = LeaseKeeper(store, "a", 30.0)

    def finish(run_ids: set[int]) -> None:
        api_prune.resume(store, run_ids)

    keeper.on_taken = finish
    keeper.claim(ids)
    assert keeper.held() == {mine: 1}
    states = dict(sql(store, "select id, state from checkpoints where state like 'prun%'"))
    assert states == {first[mine]: "pruned", first[theirs]: "pruning"}
