"""Prune claims and run leases together, on SQLite and on PostgreSQL: the run's lease holder
takes over the prune claim of another daemon (one cut off mid-prune by an outage cannot
release it), nobody else does, and the claims of the CLI and of workers are never taken over.
A prune whose lease lapsed during its deletions records nothing; the new holder finishes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from ckptd.api import prune as api_prune
from ckptd.api.record import Recorder
from ckptd.config import parse_config
from ckptd.core.model import utcnow
from ckptd.core.recording import RunDir
from ckptd.store import claims, leases, migrate, pruning, tables
from ckptd.store.handle import Store, process_name
from ckptd.store.leases import Hold
from tests.conftest import load_golden

TTL = 30.0  # leases that outlive each test unless it expires them


@pytest.fixture
def url(database_url: str) -> Iterator[str]:
    s = Store.open(database_url)
    migrate.ensure_store_schema(s)
    s.close()
    yield database_url


@pytest.fixture
def stores(url: str) -> Iterator[dict[str, Store]]:
    """Two daemons' handles (a, b), a ``ckptd prune`` (cli) and a ``ckptd worker``'s."""
    opened = {
        "a": Store.open(url, daemon=True),
        "b": Store.open(url, daemon=True),
        "cli": Store.open(url),
        "worker": Store.open(url),
    }
    yield opened
    for s in opened.values():
        s.close()


def _runs(store: Store, n: int) -> list[int]:
    with store.session() as s:
        return [
            s.execute(
                insert(tables.runs).values(
                    name=f"r{i}", path=f"/runs/r{i}", watch_path="/runs", created_at=utcnow()
                )
            ).inserted_primary_key[0]
            for i in range(n)
        ]


def _sql(store: Store, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    with store.engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return [tuple(r) for r in result] if result.returns_rows else []


def _expire(store: Store, run_ids: list[int]) -> None:
    _sql(
        store,
        "update run_leases set expires_at = :past where run_id in ("
        + ",".join(str(r) for r in run_ids)
        + ")",
        past=utcnow().replace(year=2000),
    )


def test_holder_names_say_which_processes_are_daemons(stores: dict[str, Store]) -> None:
    assert stores["a"].holder.endswith(":daemon") and stores["b"].holder.endswith(":daemon")
    assert stores["a"].holder != stores["b"].holder
    assert not stores["cli"].holder.endswith(":daemon")
    assert process_name().count(":") == 2 and process_name(daemon=True).count(":") == 3


def test_the_lease_holder_takes_over_another_daemons_prune_claim(
    stores: dict[str, Store],
) -> None:
    a, b = stores["a"], stores["b"]
    (run,) = _runs(a, 1)
    assert claims.claim(a, run, claims.PRUNE, lease_owner="a")  # a prunes, then loses the run
    assert leases.claim(b, "b", [run], TTL) == {run: 1}
    assert not claims.claim(b, run, claims.PRUNE)  # without its lease: a's claim is live
    assert claims.claim(b, run, claims.PRUNE, lease_owner="b")
    assert claims.holder_of(a, run, claims.PRUNE)[0] == b.holder  # type: ignore[index]
    assert not claims.renew(a, run, claims.PRUNE)  # a finds it taken
    claims.release(a, run, claims.PRUNE)  # a's release leaves b's claim alone
    assert not claims.claim(a, run, claims.PRUNE, lease_owner="a")  # a holds no lease
    assert claims.holder_of(a, run, claims.PRUNE)[0] == b.holder  # type: ignore[index]


def test_a_daemon_without_the_lease_cannot_take_over(stores: dict[str, Store]) -> None:
    a, b = stores["a"], stores["b"]
    runs = _runs(a, 3)
    assert claims.claim_many(a, runs, claims.PRUNE) == set(runs)
    leased, others, expired = runs
    assert leases.claim(b, "b", [leased, expired], TTL) == {leased: 1, expired: 1}
    assert leases.claim(b, "c", [others], TTL) == {others: 1}  # a third daemon's run
    _expire(b, [expired])  # b's lease of it lapsed: b may not act on it any more
    assert claims.claim_many(b, runs, claims.PRUNE, lease_owner="b") == {leased}
    assert not claims.claim(b, others, claims.PRUNE, lease_owner="b")
    assert not claims.claim(b, expired, claims.PRUNE, lease_owner="b")
    assert not claims.claim(a, leased, claims.PRUNE, lease_owner="a")  # nor a, without it
    held = claims.holders(a, runs, claims.PRUNE)
    assert {r: h for r, (h, _until) in held.items()} == {
        leased: b.holder,
        others: a.holder,
        expired: a.holder,
    }


@pytest.mark.parametrize("process", ["cli", "worker"])
def test_cli_and_worker_claims_are_never_taken_over(stores: dict[str, Store], process: str) -> None:
    """They hold no lease: their writes are not fenced, so nobody may act beside them."""
    holder, b = stores[process], stores["b"]
    runs = _runs(b, 2)
    assert claims.claim(holder, runs[0], claims.PRUNE)
    assert claims.claim(holder, runs[1], claims.FREEZE)
    assert leases.claim(b, "b", runs, TTL) == dict.fromkeys(runs, 1)
    assert not claims.claim(b, runs[0], claims.PRUNE, lease_owner="b")
    assert claims.claim_many(b, runs, claims.PRUNE, lease_owner="b") == {runs[1]}
    assert not claims.claim(b, runs[1], claims.FREEZE, lease_owner="b")
    assert claims.holder_of(b, runs[0], claims.PRUNE)[0] == holder.holder  # type: ignore[index]
    assert claims.holder_of(b, runs[1], claims.FREEZE)[0] == holder.holder  # type: ignore[index]


# ------------------------------------------------------------------ a prune cut off


def _one_run(store: Store, tmp_path: Path) -> tuple[Any, Any]:
    """The golden tf2 run (three checkpoints) recorded; its Run and its watch, keep_last 1."""
    golden = load_golden(tmp_path / "runs")  # a copy of its own: this prunes it
    run = RunDir("tf2", golden.root / "tf2", golden.root)
    Recorder(store).record(run)
    cfg = parse_config(
        {
            "daemon": {"database": "sqlite:////unused.db"},
            "watch": [{"path": str(golden.root), "runs": "*", "retain": {"keep_last": 1}}],
        }
    )
    (r,) = [r for r in api_prune.runs(store) if r.name == "tf2"]
    return r, cfg.watches[0]


def test_a_prune_whose_lease_lapsed_is_finished_by_the_new_holder(
    stores: dict[str, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon a deletes files; before it records them, b takes the run (a was cut off past
    its lease), and a's claim stays (its release failed, as in an outage). a's results are
    refused; b takes the claim over, finds the files gone and records them pruned, once."""
    a, b = stores["a"], stores["b"]
    run, watch = _one_run(a, tmp_path)
    assert leases.claim(a, "a", [run.id], TTL) == {run.id: 1}
    real_record = pruning.record_results

    def taken_meanwhile(*args: Any, **kwargs: Any) -> set[int]:
        _expire(a, [run.id])
        assert leases.claim(b, "b", [run.id], TTL) == {run.id: 2}
        return real_record(*args, **kwargs)

    monkeypatch.setattr(pruning, "record_results", taken_meanwhile)
    monkeypatch.setattr(claims, "release_many", lambda *args, **kwargs: None)  # cut off
    (result,) = api_prune.prune(a, [(run, watch)], holds=lambda r: Hold(r, "a", 1))
    monkeypatch.undo()
    assert result.pruned == [] and "lease lapsed" in (result.skipped or "")
    rows = _sql(
        a, "select prefix, state from checkpoints where run_id = :r order by step", r=run.id
    )
    gone = [p for p, state in rows if state == "pruning"]
    assert len(gone) == 2 and [s for _, s in rows][-1] == "complete"
    assert not any(Path(p + ".index").exists() for p in gone)  # deleted, not recorded
    fenced = _sql(a, "select run_id, reason from actions where kind = 'fenced'")
    assert fenced == [(run.id, "prune results refused: daemon a no longer holds the run's lease")]
    assert _sql(a, "select count(*) from actions where kind = 'pruned'") == [(0,)]
    assert claims.holder_of(b, run.id, claims.PRUNE)[0] == a.holder  # type: ignore[index]

    # a, back, may not finish it (no lease); b finishes it at once (not after a's claim expires).
    assert api_prune.resume(a, {run.id}, holds=lambda r: None) == 0
    assert api_prune.resume(b, {run.id}, holds=lambda r: Hold(r, "b", 2)) == 2
    states = _sql(a, "select state from checkpoints where run_id = :r order by step", r=run.id)
    assert [s for (s,) in states] == ["pruned", "pruned", "complete"]
    (detail,) = _sql(a, "select detail from actions where kind = 'pruned'")
    listed = detail[0] if isinstance(detail[0], dict) else json.loads(detail[0])
    assert sorted(c["prefix"] for c in listed["checkpoints"]) == sorted(gone)
    assert all(c["files"] == [] and c["already_missing"] for c in listed["checkpoints"])
    assert claims.holder_of(b, run.id, claims.PRUNE) is None  # released


def test_resume_under_leases_acts_only_on_the_runs_held(
    stores: dict[str, Store], tmp_path: Path
) -> None:
    """A daemon finishes no interrupted prune of a run it does not hold (``catch_up`` did)."""
    a = stores["a"]
    run, _watch = _one_run(a, tmp_path)
    _sql(a, "update checkpoints set state = 'pruning' where run_id = :r and step < 30", r=run.id)
    assert api_prune.resume(a, {run.id}, holds=lambda r: None) == 0
    with pytest.raises(ValueError, match="name them"):
        api_prune.resume(a, None, holds=lambda r: None)
    left = _sql(a, "select count(*) from checkpoints where state = 'pruning'")
    assert left != [(0,)]
    assert leases.claim(a, "a", [run.id], TTL) == {run.id: 1}
    assert api_prune.resume(a, {run.id}, holds=lambda r: Hold(r, "a", 1)) == left[0][0]
    assert _sql(a, "select count(*) from checkpoints where state = 'pruning'") == [(0,)]


# ------------------------------------------------------------------ an export cut off


class _Worker:
    """A worker client that writes an export; ``during`` runs while it verifies it."""

    def __init__(self, during: Any = None) -> None:
        self.during = during

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if request["op"] == "export":
            out = Path(request["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "saved_model.pb").write_bytes(b"model")
            return {}
        if self.during is not None:
            self.during()
        return {"verified": True, "max_abs_diff": 0.0}

    def close(self) -> None:
        pass


def _freeze_config(root: Path, export_dir: Path, keep: int = 3) -> Any:
    return parse_config(
        {
            "daemon": {"database": "sqlite:////unused.db"},
            "watch": [
                {
                    "path": str(root),
                    "runs": "*",
                    "best": {"metric": "eval/accuracy"},
                    "freeze": {
                        "export_dir": str(export_dir),
                        "format": ["saved_model"],
                        "inputs": {"x": "x:0"},
                        "outputs": {"y": "y:0"},
                        "keep": keep,
                    },
                }
            ],
        }
    ).watches[0]


def test_an_export_cut_off_is_settled_by_the_new_holder_at_once(
    stores: dict[str, Store], golden: Any, tmp_path: Path
) -> None:
    """Daemon a loses the run mid-export, its export claim still live: b, taking the run over,
    takes that claim over too and settles a's export (failed, to be redone; its temp dir
    removed) at once; a's publish is refused and writes nothing; b then publishes."""
    from ckptd.api.freeze import NOT_HELD, Freezer
    from ckptd.daemon.leases import LeaseKeeper
    from ckptd.store import reads

    a, b = stores["a"], stores["b"]
    Recorder(a).record(RunDir("tf2", golden.root / "tf2", golden.root))
    (run,) = [r for r in api_prune.runs(a) if r.name == "tf2"]
    with a.session() as s:
        newest = max(reads.checkpoints(s, run_id=run.id), key=lambda c: c.step or 0)
    watch = _freeze_config(golden.root, tmp_path / "export")
    keeper_a, keeper_b = LeaseKeeper(a, "a", TTL), LeaseKeeper(b, "b", TTL)
    keeper_a.claim([run.id])
    settled: list[int] = []

    def taken_over() -> None:  # a was away past its lease: b takes the run, and recovers
        _expire(a, [run.id])
        keeper_b.on_taken = lambda ids: settled.append(
            Freezer(b, _Worker(), keeper_b).recover((watch,), ids)  # type: ignore[arg-type]
        )
        keeper_b.claim([run.id])

    outcome = Freezer(a, _Worker(taken_over), keeper_a).freeze_run(run, watch, newest)  # type: ignore[arg-type]
    assert (outcome.status, outcome.message) == ("skipped", NOT_HELD)
    assert settled == [1]  # not skipped as "a live process is exporting it"
    assert [p.name for p in (tmp_path / "export" / "tf2").iterdir()] == []
    (row,) = _sql(a, "select status, error from exports")
    assert row[0] == "failed" and "interrupted" in row[1]
    assert claims.holder_of(a, run.id, claims.FREEZE) is None
    outcome = Freezer(b, _Worker(), keeper_b).freeze_run(run, watch, newest)  # type: ignore[arg-type]
    assert outcome.status == "published" and Path(outcome.path or "").is_dir()


def test_old_exports_are_removed_only_under_the_lease(
    stores: dict[str, Store], golden: Any, tmp_path: Path
) -> None:
    """Retiring exports beyond ``keep``: a daemon that lost the run removes none of them."""
    from ckptd.api import export_retire
    from ckptd.store import exports, reads

    a = stores["a"]
    Recorder(a).record(RunDir("tf2", golden.root / "tf2", golden.root))
    (run,) = [r for r in api_prune.runs(a) if r.name == "tf2"]
    watch = _freeze_config(golden.root, tmp_path / "export", keep=1)
    with a.session() as s:
        history = reads.checkpoints(s, run_id=run.id)
    root = tmp_path / "export" / "tf2"
    for c in sorted(history, key=lambda c: c.step or 0):  # three versions, published
        export_id, version, _ = exports.begin(
            a, c, root=str(root), on_disk=0, formats="saved_model", metric=None, metric_value=None
        )
        (root / str(version)).mkdir(parents=True)
        exports.published(a, export_id, c, verified=True, reason="test", detail={})
    assert leases.claim(a, "a", [run.id], TTL) == {run.id: 1}
    _expire(a, [run.id])
    export_retire.retire(a, run, watch, history, Hold(run.id, "a", 1))
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3"]
    assert len(exports.listed(a, exports.PUBLISHED)) == 3
    assert leases.claim(a, "a", [run.id], TTL) == {run.id: 2}
    export_retire.retire(a, run, watch, history, Hold(run.id, "a", 2))
    assert len(list(root.iterdir())) == 1
    assert len(exports.listed(a, exports.REMOVED)) == 2


def test_a_daemon_whose_lease_lapsed_after_the_intent_deletes_nothing(
    stores: dict[str, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its lease lapsed by its own clock between the intent and the deletions (it was paused):
    it deletes nothing and leaves the run's 'pruning' rows to the new holder, who deletes and
    records them."""
    a, b = stores["a"], stores["b"]
    run, watch = _one_run(a, tmp_path)
    assert leases.claim(a, "a", [run.id], TTL) == {run.id: 1}
    lapsed: list[bool] = []
    real_mark = pruning.mark_pruning

    def then_paused(*args: Any, **kwargs: Any) -> set[int]:
        marked = real_mark(*args, **kwargs)
        lapsed.append(True)
        return marked

    monkeypatch.setattr(pruning, "mark_pruning", then_paused)
    (result,) = api_prune.prune(
        a, [(run, watch)], holds=lambda r: None if lapsed else Hold(r, "a", 1)
    )
    monkeypatch.undo()
    assert result.pruned == [] and "lapsed before the deletions" in (result.skipped or "")
    rows = _sql(
        a, "select prefix, state from checkpoints where run_id = :r order by step", r=run.id
    )
    marked = [p for p, state in rows if state == "pruning"]
    assert len(marked) == 2 and all(Path(p + ".index").exists() for p in marked)
    _expire(a, [run.id])
    assert leases.claim(b, "b", [run.id], TTL) == {run.id: 2}
    assert api_prune.resume(b, {run.id}, holds=lambda r: Hold(r, "b", 2)) == 2
    assert not any(Path(p + ".index").exists() for p in marked)
    states = _sql(a, "select state from checkpoints where run_id = :r order by step", r=run.id)
    assert [s for (s,) in states] == ["pruned", "pruned", "complete"]


def test_a_run_taken_is_acted_on_only_once_its_recovery_is_done(
    stores: dict[str, Store],
) -> None:
    """While ``on_taken`` finishes the previous holder's work, the scheduled jobs must not pick
    the run (this process's own claims would not keep them from racing the recovery)."""
    from ckptd.daemon.leases import LeaseKeeper

    (run,) = _runs(stores["b"], 1)
    keeper = LeaseKeeper(stores["b"], "b", TTL)
    during: list[tuple[bool, dict[int, int], Hold | None]] = []
    keeper.on_taken = lambda ids: during.append(
        (keeper.holds(run), keeper.held(), keeper.current(run))
    )
    keeper.claim([run])
    assert during == [(False, {}, Hold(run, "b", 1))]
    assert keeper.holds(run) and keeper.held() == {run: 1}
