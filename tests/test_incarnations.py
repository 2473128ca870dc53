"""Incarnations, replaced versions and Keras epochs in the pure recording diff (no TF; the
real-output tests are in test_recording_real.py)."""

from __future__ import annotations

from ckptd.core import incarnations as inc
from ckptd.core.model import COMPLETE, GONE, PRUNED
from ckptd.core.recording import (
    EventRead,
    EventTail,
    Found,
    Known,
    Observation,
    RunState,
    apply_to,
    diff,
)

RUN = "/r"
S = 1_000_000_000  # ns


def found(name: str, step: int | None, saved: int, fmt: str = "tf2") -> Found:
    """A complete checkpoint saved at ``saved`` seconds (its signature's mtime)."""
    return Found(f"{RUN}/{name}", fmt, step, COMPLETE, None, (), 10, False, saved, (10, saved * S))


def known(i: int, f: Found, state: str = COMPLETE, incarnation: int = 1) -> Known:
    return Known(i, state, f.step, f.signature, f.format, incarnation)


def events(path: str, *scalars: tuple[str, int, float]) -> dict[str, EventTail]:
    read = EventRead(100, tuple((n, s, v, 0.0) for n, s, v in scalars))
    return {path: EventTail(100, 0, read)}


OLD = [found(f"ckpt-{s}", s, 100 + s) for s in (1, 11, 21, 31, 41)]
STATE = RunState(1, 5, checkpoints={f.prefix: known(i, f) for i, f in enumerate(OLD, 1)})


def test_a_lower_step_saved_later_starts_an_incarnation_and_replaces_the_old_row() -> None:
    again = found("ckpt-1", 1, 300)
    changes = diff(Observation(RUN, True, (again, *OLD[1:])), STATE)
    assert [r.id for r in changes.replaced] == [1]
    assert changes.new == (again,)
    assert changes.incarnations == {again.prefix: 2}
    assert changes.incarnation_starts == (141.0,)  # after ckpt-41's save
    kinds = {a.kind: a for a in changes.audit}
    assert kinds["new_incarnation"].detail == {"incarnation": 2, "step": 1, "after": 41}
    assert kinds["replaced"].checkpoint_id == 1
    after = apply_to(STATE, changes, {again.prefix: 9})
    assert after.checkpoints[again.prefix] == Known(9, COMPLETE, 1, again.signature, "tf2", 2)
    # The next save of the new trainer is in the same incarnation, no new one.
    nxt = found("ckpt-11", 11, 310)
    later = diff(Observation(RUN, True, (again, nxt, *OLD[2:])), after)
    assert later.incarnations == {nxt.prefix: 2} and later.incarnation_starts is None


def test_a_file_rewritten_in_place_with_the_same_identity_is_the_same_version() -> None:
    f = OLD[0]
    with_meta = Found(f.prefix, "tf1", 1, COMPLETE, None, (), 20, True, 101, (10, 101 * S, 1, 1))
    changes = diff(Observation(RUN, True, (with_meta, *OLD[1:])), STATE)
    assert not changes.replaced and [u.id for u in changes.updated] == [1]


def test_gone_and_pruned_rows_written_anew_are_replaced_too() -> None:
    state = RunState(
        1,
        0,
        checkpoints={
            OLD[0].prefix: known(1, OLD[0], GONE),
            OLD[1].prefix: known(2, OLD[1], PRUNED),
        },
    )
    a, b = found("ckpt-1", 1, 500), found("ckpt-11", 11, 501)
    changes = diff(Observation(RUN, True, (a, b)), state)
    assert sorted(r.id for r in changes.replaced) == [1, 2]
    # back again unchanged (moved away and back): the same row, complete again
    same = diff(Observation(RUN, True, (OLD[0],)), state)
    assert not same.replaced and same.updated[0].completed


def test_event_values_go_to_the_incarnation_their_file_was_created_in() -> None:
    state = RunState(
        1,
        0,
        checkpoints={
            OLD[2].prefix: known(3, OLD[2]),  # ckpt-21 of the first trainer, saved at 121
            "/r/new-21": Known(7, COMPLETE, 21, (10, 400 * S), "tf2", 2),
        },
        incarnation_starts=(141.0,),
    )
    old_file, new_file = "/r/events.out.tfevents.90.host", "/r/events.out.tfevents.200.host"
    obs = Observation(
        RUN,
        True,
        (OLD[2], found("new-21", 21, 400)),
        events=events(old_file, ("acc", 21, 0.1)) | events(new_file, ("acc", 21, 0.2)),
    )
    got = {(m.prefix, m.value) for m in diff(obs, state).metrics}
    assert got == {(OLD[2].prefix, 0.1), ("/r/new-21", 0.2)}


def test_keras_epochs_take_epoch_series_at_step_minus_one_and_nothing_else() -> None:
    ckpt = found("model.02-0.30.keras", 2, 100, "keras")
    tf_ckpt = found("ckpt-2", 2, 100)
    state = RunState(
        1, 0, checkpoints={ckpt.prefix: known(1, ckpt), tf_ckpt.prefix: known(2, tf_ckpt)}
    )
    obs = Observation(
        RUN,
        True,
        (ckpt, tf_ckpt),
        events=events(
            "/r/validation/events.out.tfevents.1.h.v2",
            ("validation/epoch_loss", 1, 0.3),  # epoch 2
            ("validation/epoch_loss", 2, 0.2),  # epoch 3
            ("validation/evaluation_loss_vs_iterations", 2, 0.25),
        ),
    )
    got = {(m.prefix.rpartition("/")[2], m.name, m.value) for m in diff(obs, state).metrics}
    assert got == {
        ("model.02-0.30.keras", "validation/epoch_loss", 0.3),
        ("ckpt-2", "validation/epoch_loss", 0.2),  # TF checkpoints: every series at its step
        ("ckpt-2", "validation/evaluation_loss_vs_iterations", 0.25),
    }


def test_event_file_creation_times_come_from_their_names() -> None:
    assert inc.born_of("/r/eval/events.out.tfevents.1796208913.vm.3726.0.v2") == 1796208913.0
    assert inc.born_of("/r/events.out.tfevents.1796208913.vm") == 1796208913.0
    assert inc.born_of("/r/events.out.tfevents.garbage", [5.0, 3.0]) == 3.0
    assert inc.born_of("/r/events.out.tfevents.x") == inc.NO_TIME
    assert inc.incarnation_of((10.0, 20.0), 5) == 1
    assert inc.incarnation_of((10.0, 20.0), 15) == 2
    assert inc.incarnation_of((10.0, 20.0), 25) == 3
    assert inc.span((10.0, 20.0), 2) == (10.0, 20.0)


def test_replaced_versions_are_never_planned_for_deletion() -> None:
    from datetime import datetime

    from ckptd.core.model import REPLACED, Checkpoint
    from ckptd.core.retention import KeepLast, plan

    def ckpt(i: int, step: int, state: str) -> Checkpoint:
        saved = datetime(2026, 1, 1, 0, i)
        return Checkpoint(
            i, "r", 1, f"/r/ckpt-{step}", step, "tf2", state, None, 1, (), False, saved, saved
        )

    history = [ckpt(1, 1, REPLACED), ckpt(2, 11, COMPLETE), ckpt(3, 1, COMPLETE)]
    decided = plan(history, [KeepLast(1)], datetime(2026, 1, 2))
    assert 1 not in decided.keep and 1 not in {c.id for c in decided.delete}
