"""Recording as a pure diff: properties of ``core.recording.diff`` (hypothesis), the store's
apply agreeing with the pure ``apply_to``, and writers in other processes seen without restart."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from ckptd.api.record import Recorder
from ckptd.core.incarnations import identity
from ckptd.core.model import COMPLETE, CORRUPT, GONE, PRUNED, PRUNING
from ckptd.core.recording import (
    INCOMPLETE,
    EventFile,
    EventRead,
    EventTail,
    Found,
    Known,
    Observation,
    RunDir,
    RunState,
    apply_to,
    diff,
    storable_step,
)
from ckptd.store import migrate
from ckptd.store import recording as store_recording
from ckptd.store.handle import Store
from tests.conftest import Corpus

RUN = "/r"
HUGE = 1 << 64  # a step the database cannot hold
# A step comes from the prefix's name: one with none, one too big for the database.
STEPS: dict[str, int | None] = {f"{RUN}/ckpt-{i}": i for i in range(4)}
STEPS.update({f"{RUN}/model": None, f"{RUN}/ckpt-{HUGE}": HUGE})
PREFIXES = list(STEPS)
EVENT_FILES = [f"{RUN}/events.out.tfevents.{i}" for i in range(3)]

signatures = st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple)
scalars = st.tuples(
    st.sampled_from(["loss", "eval/acc"]), st.integers(0, 5), st.floats(), st.floats(0, 1e9)
)


@st.composite
def founds(draw: Any, prefix: str) -> Found:
    state = draw(st.sampled_from([COMPLETE, CORRUPT, INCOMPLETE]))
    reason = None
    if state == CORRUPT:
        reason = draw(st.sampled_from(["no .index file; data unchanged for 200 s", "bad shard"]))
    return Found(
        prefix,
        draw(st.sampled_from(["tf1", "tf2", "keras"])),
        STEPS[prefix],
        state,
        reason,
        ("a.index",),
        draw(st.integers(0, 100)),
        draw(st.booleans()),
        draw(st.sampled_from([0.0, 1.5, 1e9])),
        draw(signatures),
        draw(st.dictionaries(st.sampled_from(["val_loss"]), st.floats(), max_size=1)),
    )


@st.composite
def tails(draw: Any) -> EventTail:
    start = draw(st.integers(0, 50))
    if draw(st.booleans()):
        return EventTail(start, start, None)
    read = EventRead(
        draw(st.integers(start, 100)),
        tuple(draw(st.lists(scalars, max_size=3))),
        draw(st.sampled_from([None, "corrupt record"])),
        draw(st.sampled_from([None, "Permission denied"])),
    )
    return EventTail(read.offset, start, read)


@st.composite
def observations(draw: Any) -> Observation:
    present = draw(st.booleans())
    if present and draw(st.integers(0, 9)) == 0:
        return Observation(RUN, True, unreadable=f"{RUN}: cannot read the run directory: EIO")
    prefixes = draw(st.lists(st.sampled_from(PREFIXES), unique=True)) if present else []
    paths = draw(st.lists(st.sampled_from(EVENT_FILES), unique=True)) if present else []
    return Observation(
        RUN,
        present,
        tuple(draw(founds(p)) for p in prefixes),
        tuple(draw(st.lists(st.sampled_from(["x\\xff", "y\\xfe"]), max_size=2))),
        {p: draw(tails()) for p in paths},
    )


@st.composite
def states(draw: Any) -> RunState:
    prefixes = draw(st.lists(st.sampled_from(PREFIXES), unique=True))
    paths = draw(st.lists(st.sampled_from(EVENT_FILES), unique=True))
    all_states = [COMPLETE, CORRUPT, GONE, PRUNING, PRUNED]
    starts = sorted(set(draw(st.lists(st.integers(0, 3).map(lambda n: n / 1e9), max_size=2))))
    return RunState(
        1,
        draw(st.integers(0, 3)),
        draw(st.booleans()),
        draw(st.booleans()),
        {
            p: Known(
                i + 1,
                draw(st.sampled_from(all_states)),
                _stored(p),
                draw(signatures),
                draw(st.sampled_from(["tf2", "keras"])),
                draw(st.integers(1, len(starts) + 1)),
            )
            for i, p in enumerate(prefixes)
        },
        {
            p: EventFile(draw(st.integers(0, 100)), draw(st.sampled_from([None, "corrupt"])))
            for p in paths
        },
        frozenset(draw(st.lists(st.sampled_from(["x\\xff"]), max_size=1))),
        tuple(starts),
    )


def _stored(prefix: str) -> int | None:
    step = STEPS[prefix]
    return step if step is None or step < 1 << 63 else None


def _view(obs: Observation, old: RunState, new: RunState) -> None:
    """``new`` holds what ``obs`` shows; what the pruner owns or ``obs`` cannot tell stays."""
    if obs.unreadable is not None:
        assert new == old  # nothing seen, nothing concluded
        return
    assert new.present == obs.present
    assert new.scanned
    found = {f.prefix: storable_step(f) for f in obs.found}
    for prefix in set(found) | set(old.checkpoints):
        f, was, now = found.get(prefix), old.checkpoints.get(prefix), new.checkpoints.get(prefix)
        if was is not None and was.state == PRUNING:
            assert now == was, "the pruner owns it"
        elif f is None or f.state == INCOMPLETE:
            if was is None:
                assert now is None, "a save in progress is not recorded"
            elif f is None and was.state in (COMPLETE, CORRUPT):
                assert now == replace(was, state=GONE)
            else:
                assert now == was
        elif (
            was is not None
            and was.state in (COMPLETE, GONE)
            and f.reason
            and (f.reason.startswith("no .index"))
        ):
            assert now == replace(was, state=GONE), "an index deleted first: being deleted"
        else:
            assert now is not None and (now.state, now.signature, now.step) == (
                f.state,
                f.signature,
                f.step,
            )
    for path in set(obs.events) | set(old.event_files):
        tail, was_file = obs.events.get(path), old.event_files.get(path)
        if tail is None or (was_file is not None and was_file.error):
            assert new.event_files.get(path) == was_file
        elif tail.read is None:
            assert new.event_files[path] == EventFile(tail.start)
        else:
            assert new.event_files[path] == EventFile(tail.read.offset, tail.read.error)
    assert new.unsupported == old.unsupported | set(obs.unsupported)
    _versions_and_incarnations(old, new)


def _versions_and_incarnations(old: RunState, new: RunState) -> None:
    """A row is replaced only by a new row of the same prefix; incarnations only ever begin,
    later than those before, and never among checkpoints a run's first scan finds."""
    for prefix, was in old.checkpoints.items():
        now = new.checkpoints.get(prefix)
        if now is not None and now.id != was.id:
            assert identity(was.signature) and identity(now.signature) != identity(was.signature)
    starts = new.incarnation_starts
    assert starts[: len(old.incarnation_starts)] == old.incarnation_starts
    assert len(starts) <= len(old.incarnation_starts) + 1, "at most one begins per scan"
    assert list(starts) == sorted(set(starts))
    if not old.checkpoints:
        assert starts == old.incarnation_starts
    for k in new.checkpoints.values():
        assert 1 <= k.incarnation <= len(starts) + 1


def _ids(changes: Any, start: int = 100) -> dict[str, int]:
    return {f.prefix: start + i for i, f in enumerate(changes.new)}


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(observations(), states())
def test_applying_the_diff_makes_the_state_what_the_observation_shows(
    obs: Observation, state: RunState
) -> None:
    changes = diff(obs, state)
    after = apply_to(state, changes, _ids(changes))
    _view(obs, state, after)
    assert after.version == state.version + (not changes.empty)
    again = diff(obs, after)
    assert again.empty, again  # idempotent: the same observation changes nothing twice
    assert apply_to(after, again, {}) == after


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(observations(), states())
def test_the_diff_never_touches_what_the_pruner_owns(obs: Observation, state: RunState) -> None:
    changes = diff(obs, state)
    owned = {k.id for k in state.checkpoints.values() if k.state == PRUNING}
    assert not owned & {u.id for u in changes.updated}
    assert not owned & {g.id for g in changes.gone}
    gone = {k.id for k in state.checkpoints.values() if k.state in (GONE, PRUNED)}
    assert not gone & {g.id for g in changes.gone}, "only complete or corrupt ones turn gone"


def test_many_new_checkpoints_get_one_audit_entry_corrupt_ones_each() -> None:
    def found(i: int, state: str) -> Found:
        return Found(f"{RUN}/ckpt-{i}", "tf2", i, state, None, (), 1, False, 1.0, (1,))

    new = [found(i, COMPLETE) for i in range(25)] + [found(99, CORRUPT)]
    changes = diff(Observation(RUN, True, tuple(new)), RunState(1, 0))
    kinds = [(a.kind, a.subject) for a in changes.audit]
    assert kinds == [("corrupt", f"{RUN}/ckpt-99"), ("recorded", RUN)]
    assert changes.audit[-1].detail == {"count": 25, "steps": [0, 24]}


# ------------------------------------------------------------------ through a real SQLite store


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    """One database per module and kind, cleared by each test (hypothesis runs many examples)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('diffdb')}/ckptd.db"
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
    s = Store.open(url)
    migrate.upgrade(s.engine)
    yield s
    s.close()


def _clear(store: Store) -> None:
    with store.engine.begin() as conn:
        for table in ("metrics", "actions", "scalars", "event_files", "checkpoints", "runs"):
            conn.exec_driver_sql(f"DELETE FROM {table}")


prunes = st.tuples(st.sampled_from(PREFIXES), st.sampled_from([PRUNING, PRUNED]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(observations(), prunes), min_size=1, max_size=5))
def test_the_store_applies_exactly_what_apply_to_says(store: Store, steps_: list[Any]) -> None:
    """Observations applied through SQLite (with prunes by "another process" in between) leave
    what the pure ``apply_to`` predicts; the same observation then diffs to nothing."""
    _clear(store)
    run = RunDir("r", Path(RUN), Path("/"))
    reported: frozenset[str] = frozenset()
    for step in steps_:
        state = replace(store_recording.load_state(store, run), unsupported=reported)
        if isinstance(step, tuple):  # another writer: a prune, with its version bump
            prefix, to = step
            if prefix in state.checkpoints:
                with store.engine.begin() as conn:
                    conn.execute(
                        text(
                            "UPDATE checkpoints SET state = :to "
                            "WHERE prefix = :prefix AND state != 'replaced'"
                        ),
                        {"to": to, "prefix": prefix},
                    )
                    conn.exec_driver_sql("UPDATE runs SET version = version + 1")
            continue
        changes = diff(step, state)
        ids = {} if changes.empty else store_recording.apply(store, state, changes)
        assert ids is not None
        expected = apply_to(state, changes, ids)
        reported = expected.unsupported
        loaded = replace(store_recording.load_state(store, run), unsupported=reported)
        assert loaded == expected
        assert diff(step, loaded).empty


def test_apply_writes_nothing_when_the_version_moved(store: Store) -> None:
    _clear(store)
    run = RunDir("r", Path(RUN), Path("/"))
    state = store_recording.load_state(store, run)
    f = Found(PREFIXES[0], "tf2", 1, COMPLETE, None, (), 1, False, 1.0, (1,))
    changes = diff(Observation(RUN, True, (f,)), state)
    with store.engine.begin() as conn:  # another writer got there first
        conn.exec_driver_sql("UPDATE runs SET version = version + 1")
    assert store_recording.apply(store, state, changes) is None
    assert store_recording.load_state(store, run).checkpoints == {}
    fresh = store_recording.load_state(store, run)
    ids = store_recording.apply(store, fresh, diff(Observation(RUN, True, (f,)), fresh))
    assert ids is not None and list(ids) == [PREFIXES[0]]


# ------------------------------------------------------------------ other processes, real files


def _recorder(url: str, tmp_path: Path, corpus: Corpus) -> tuple[Recorder, RunDir, Path]:
    store = Store.open(url)
    migrate.upgrade(store.engine)
    run = corpus.copy("tf1", tmp_path / "runs" / "a")
    return Recorder(store), RunDir("a", run, tmp_path / "runs"), run


def _another_process(url: str, *statements: str) -> list[Any]:
    """Run ``statements`` in one transaction on a handle of its own; the last one's rows."""
    other = Store.open(url)
    try:
        with other.engine.begin() as conn:
            for sql in statements:
                result = conn.execute(text(sql))
            return list(result.all()) if result.returns_rows else []
    finally:
        other.close()


def _states(url: str) -> dict[int, str]:
    return dict(_another_process(url, "SELECT step, state FROM checkpoints"))


def _age(run: Path) -> None:
    past = time.time() - 60
    for d in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
        os.utime(d, (past, past))


def test_a_concurrent_writer_makes_the_apply_retry_and_end_right(
    tmp_path: Path, database_url: str, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the recorder's load and its apply, another process prunes step 10 (marks it,
    deletes its files, bumps the version): the apply writes nothing, the run is loaded and
    observed again, and step 10 ends pruned, not gone."""
    rec, run_dir, run = _recorder(database_url, tmp_path, corpus)
    assert len(rec.record(run_dir).recorded) == 3
    loads: list[int] = []
    real = store_recording.load_state

    def load_then_prune(store: Store, run_: RunDir) -> RunState:
        state = real(store, run_)
        loads.append(state.version)
        if len(loads) == 1:
            for f in run.glob("model.ckpt-10.*"):
                f.unlink()
            _another_process(
                database_url,
                "UPDATE checkpoints SET state = 'pruned' WHERE step = 10",
                "UPDATE runs SET version = version + 1",
            )
        return state

    monkeypatch.setattr(store_recording, "load_state", load_then_prune)
    applied: list[object] = []
    real_apply = store_recording.apply

    def spy(*a: Any) -> Any:
        applied.append(result := real_apply(*a))
        return result

    monkeypatch.setattr(store_recording, "apply", spy)
    outcome = rec.record(run_dir)
    assert loads == [loads[0], loads[0] + 1], "loaded again after the other writer"
    assert applied[:1] == [None], "the stale view was not written"
    assert outcome.gone == [] and outcome.recorded == []
    assert _states(database_url) == {10: "pruned", 20: "complete", 30: "complete"}
    gone = _another_process(database_url, "SELECT count(*) FROM actions WHERE kind = 'gone'")
    assert gone == [(0,)]


def test_a_write_by_another_process_is_seen_without_restart(
    tmp_path: Path, database_url: str, corpus: Corpus
) -> None:
    """A prune by another process (files deleted, state pruned, version bumped) is what the
    recorder's next look starts from; and a quick rescan no longer trusts a fingerprint taken
    before another process wrote the run, even though no file changed."""
    rec, run_dir, run = _recorder(database_url, tmp_path, corpus)
    rec.record(run_dir)
    _age(run)
    rec.record(run_dir)
    assert rec.unchanged([run_dir]) == [True]
    _another_process(  # another writer's stale view of step 20, version bumped
        database_url,
        "UPDATE checkpoints SET state = 'gone' WHERE step = 20",
        "UPDATE runs SET version = version + 1",
    )
    assert rec.unchanged([run_dir]) == [False], "its version moved: look again"
    assert rec.record(run_dir).recorded == ["a@20"]  # seen again on disk: recorded anew
    for f in run.glob("model.ckpt-10.*"):  # `ckptd prune` from the CLI
        f.unlink()
    _another_process(
        database_url,
        "UPDATE checkpoints SET state = 'pruned' WHERE step = 10",
        "UPDATE runs SET version = version + 1",
    )
    outcome = rec.record(run_dir)
    assert outcome.gone == [] and outcome.recorded == []
    assert _states(database_url) == {10: "pruned", 20: "complete", 30: "complete"}


def test_a_replaced_version_leaves_the_evaluation_queue(store: Store) -> None:
    """Its files are the new version's now: a pending evaluation of it would never run."""
    _clear(store)
    run = RunDir("r", Path(RUN), Path("/"))
    first = Found(PREFIXES[1], "tf2", 1, COMPLETE, None, (), 1, False, 1.0, (1, 10))
    state = store_recording.load_state(store, run)
    ids = store_recording.apply(store, state, diff(Observation(RUN, True, (first,)), state))
    assert ids is not None
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO evaluations (checkpoint_id, status, attempts) "
                "VALUES (:id, 'pending', 0)"
            ),
            {"id": ids[first.prefix]},
        )
    again = replace(first, signature=(1, 20))
    state = store_recording.load_state(store, run)
    changes = diff(Observation(RUN, True, (again,)), state)
    assert [r.id for r in changes.replaced] == [ids[first.prefix]]
    assert store_recording.apply(store, state, changes) is not None
    with store.engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM evaluations").scalar() == 0
        rows = conn.exec_driver_sql("SELECT state FROM checkpoints ORDER BY id").all()
    assert [r[0] for r in rows] == ["replaced", "complete"]


def test_steps_sizes_and_offsets_past_32_bits_are_stored(store: Store) -> None:
    """PostgreSQL's INTEGER is 32-bit: these columns are BIGINT there (migration 0007)."""
    _clear(store)
    run = RunDir("r", Path(RUN), Path("/"))
    big = Found(
        f"{RUN}/ckpt-{2**40}", "tf2", 2**40, COMPLETE, None, (), 5 * 2**30, False, 1.0, (1,)
    )
    state = store_recording.load_state(store, run)
    assert store_recording.apply(store, state, diff(Observation(RUN, True, (big,)), state))
    with store.engine.begin() as conn:
        assert conn.execute(text("SELECT step, size_bytes FROM checkpoints")).one() == (
            2**40,
            5 * 2**30,
        )
        conn.execute(text('UPDATE event_files SET "offset" = :o'), {"o": 2**33})
