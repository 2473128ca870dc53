"""Pure policies: select_best and plan_prune, property-tested, with TensorFlow as the oracle."""

from __future__ import annotations

import json
import math
import subprocess
import textwrap
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.core.model import Checkpoint
from ckptd.core.ranking import select_best
from ckptd.core.retention import BEST, EXPORTED, IN_USE, NEWEST, PINNED, TOO_YOUNG
from tests.conftest import ENV, PY
from tests.retention_rules import Rules, plan_prune

T0 = datetime(2026, 1, 1)
METRIC = "eval/accuracy"


def ckpt(
    i: int,
    step: int,
    *,
    minutes: float,
    value: float | None = None,
    state: str = "complete",
    **kw: object,
) -> Checkpoint:
    return Checkpoint(
        id=i,
        run="r",
        run_id=1,
        prefix=f"/r/ckpt-{step}",
        step=step,
        format="tf2",
        state=state,
        reason=None,
        size=1,
        files=(),
        has_meta=False,
        created_at=T0 + timedelta(minutes=minutes),
        recorded_at=T0 + timedelta(minutes=minutes),
        metrics={} if value is None else {METRIC: value},
        **kw,  # type: ignore[arg-type]
    )


def test_select_best_ties_nan_and_corrupt() -> None:
    items = [
        ckpt(1, 10, minutes=1, value=0.9),
        ckpt(2, 20, minutes=2, value=0.9),  # tie: newer step wins
        ckpt(3, 30, minutes=3, value=math.nan),
        ckpt(4, 40, minutes=4, value=0.99, state="corrupt"),
        ckpt(5, 50, minutes=5),
    ]
    assert select_best(items, METRIC, "max").id == 2  # type: ignore[union-attr]
    assert select_best(items, METRIC, "min").id == 2  # type: ignore[union-attr]
    assert select_best([items[2], items[4]], METRIC, "max") is None


values = st.one_of(st.none(), st.just(math.nan), st.floats(0, 1, allow_nan=False))


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Checkpoint], Rules, datetime]:
    n = draw(st.integers(0, 30))
    gaps = draw(st.lists(st.floats(0.1, 120), min_size=n, max_size=n))
    items, t = [], 0.0
    for i in range(n):
        t += gaps[i]
        items.append(
            ckpt(
                i + 1,
                (i + 1) * 100,
                minutes=t,
                value=draw(values),
                state=draw(st.sampled_from(["complete"] * 6 + ["corrupt", "gone", "pruned"])),
                pinned=draw(st.booleans().filter(lambda _: True)) and draw(st.integers(0, 9)) == 0,
                exported=draw(st.integers(0, 12)) == 0,
                evaluation=draw(st.sampled_from([None, None, "done", "pending", "running"])),
            )
        )
    rules = Rules(
        keep_last=draw(st.one_of(st.none(), st.integers(0, 6))),
        keep_best=draw(st.one_of(st.none(), st.integers(0, 4))),
        keep_every=draw(
            st.one_of(st.none(), st.integers(1, 300).map(lambda m: timedelta(minutes=m)))
        ),
        keep_every_steps=draw(st.one_of(st.none(), st.sampled_from([200, 300, 1000]))),
        min_age=timedelta(minutes=draw(st.integers(0, 200))),
        metric=draw(st.sampled_from([None, METRIC])),
        mode=draw(st.sampled_from(["max", "min"])),
    )
    return items, rules, T0 + timedelta(minutes=t + draw(st.floats(0, 300)))


@settings(max_examples=400, deadline=None)
@given(histories())
@pytest.mark.slow
def test_plan_never_deletes_what_matters(case: tuple[list[Checkpoint], Rules, datetime]) -> None:
    items, rules, now = case
    plan = plan_prune(items, rules, now)
    deleted = {c.id for c in plan.delete}
    live = [c for c in items if c.state == "complete"]
    # Only complete checkpoints are ever deleted; every live one is either kept or deleted.
    assert all(c.state == "complete" for c in plan.delete)
    assert deleted.isdisjoint(plan.keep)
    assert deleted | set(plan.keep) == {c.id for c in live}
    if live:
        newest = max(live, key=lambda c: c.step)  # type: ignore[arg-type, return-value]
        assert newest.id not in deleted and NEWEST in plan.keep[newest.id]
    if rules.metric:
        best = select_best(items, rules.metric, rules.mode)
        if best is not None:
            assert BEST in plan.keep[best.id]
    for c in live:
        if c.pinned:
            assert PINNED in plan.keep[c.id]
        if c.exported:
            assert EXPORTED in plan.keep[c.id]
        if c.evaluation == "running":
            assert IN_USE in plan.keep[c.id]
        if now - c.created_at < rules.min_age:  # type: ignore[operator]
            assert TOO_YOUNG in plan.keep[c.id]
    if rules.keep_last:
        assert {c.id for c in live[-rules.keep_last :]} <= set(plan.keep)
    if rules.keep_every_steps:
        assert all(c.id in plan.keep for c in live if c.step % rules.keep_every_steps == 0)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(histories())
@pytest.mark.slow
def test_plan_is_idempotent(case: tuple[list[Checkpoint], Rules, datetime]) -> None:
    items, rules, now = case
    plan = plan_prune(items, rules, now)
    deleted = {c.id for c in plan.delete}
    after = [replace(c, state="pruned") if c.id in deleted else c for c in items]
    again = plan_prune(after, rules, now)
    assert again.delete == ()
    assert again.keep == plan.keep


@settings(max_examples=200, deadline=None)
@given(histories())
@pytest.mark.slow
def test_plan_keeps_exactly_the_union_of_its_rules(
    case: tuple[list[Checkpoint], Rules, datetime],
) -> None:
    """Each rule alone keeps a set; the full plan keeps exactly their union (plus 'newest')."""
    items, rules, now = case
    full = set(plan_prune(items, rules, now).keep)
    single_rules = [
        Rules(keep_last=rules.keep_last),
        Rules(keep_best=rules.keep_best, metric=rules.metric, mode=rules.mode),
        Rules(keep_every=rules.keep_every, keep_last=rules.keep_last),
        Rules(keep_every_steps=rules.keep_every_steps),
        Rules(min_age=rules.min_age),
    ]
    union: set[int] = set()
    for r in single_rules:
        union |= set(plan_prune(items, r, now).keep)
    assert full == union


ORACLE = textwrap.dedent(
    """
    import json, os, sys, tempfile
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    from unittest import mock
    cases = json.loads(sys.argv[1])
    out = []
    for case in cases:
        d = tempfile.mkdtemp()
        clock = [case["times"][0]]
        with mock.patch("time.time", lambda: clock[0]):
            v = tf.Variable(1.0)
            ck = tf.train.Checkpoint(v=v)
            mgr = tf.train.CheckpointManager(ck, d, max_to_keep=case["n"], keep_checkpoint_every_n_hours=case["h"])
            for step, t in zip(case["steps"], case["times"]):
                clock[0] = t
                mgr.save(checkpoint_number=step)
        kept = sorted(int(f[len("ckpt-"):-len(".index")]) for f in os.listdir(d) if f.endswith(".index"))
        out.append(kept)
    print(json.dumps(out))
    """
)


@pytest.mark.tf
def test_keep_last_plus_keep_every_matches_tensorflow_checkpoint_manager() -> None:
    """TensorFlow as the oracle: same saves, same timestamps, same survivors."""
    import random

    rng = random.Random(7)
    cases = []
    for _ in range(12):
        n = rng.randint(1, 4)
        hours = rng.choice([0.5, 1.0, 2.5])
        t = 1_700_000_000.0
        times, steps = [], []
        for i in range(rng.randint(3, 40)):
            t += rng.uniform(60, 3 * 3600)
            times.append(t)
            steps.append((i + 1) * 10)
        cases.append({"n": n, "h": hours, "times": times, "steps": steps})
    proc = subprocess.run(
        [PY, "-c", ORACLE, json.dumps(cases)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tf_kept = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, expected in zip(cases, tf_kept, strict=True):
        items = [
            ckpt(i + 1, s, minutes=0).__class__(
                **{
                    **ckpt(i + 1, s, minutes=0).__dict__,
                    "created_at": datetime.fromtimestamp(t),
                    "recorded_at": datetime.fromtimestamp(t),
                }
            )
            for i, (s, t) in enumerate(zip(case["steps"], case["times"], strict=True))
        ]
        rules = Rules(keep_last=case["n"], keep_every=timedelta(hours=case["h"]))
        plan = plan_prune(items, rules, datetime.fromtimestamp(case["times"][-1] + 1))
        ours = sorted(c.step for c in items if c.id in plan.keep)  # type: ignore[misc]
        assert ours == expected, case
