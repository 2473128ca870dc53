"""Retention rules one by one, their union, the config's rule list, and export retention."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings

from ckptd.config import BestConfig, RetainConfig
from ckptd.core import retention
from ckptd.core.model import Checkpoint
from ckptd.core.retention import (
    BEST,
    EXPORTED,
    IN_USE,
    LAST,
    NEWEST,
    PENDING,
    PINNED,
    TOO_YOUNG,
    History,
    KeepBest,
    KeepEvery,
    KeepEverySteps,
    KeepLast,
    Published,
    TooYoung,
)
from tests.retention_rules import Rules
from tests.test_policy import METRIC, T0, ckpt, histories

NOW = T0 + timedelta(hours=10)


def _history(items: list[Checkpoint]) -> History[Checkpoint]:
    live = [c for c in items if c.state == "complete"]
    return History(items, live, NOW)


RUN = [
    ckpt(1, 100, minutes=0, value=0.5, pinned=True),
    ckpt(2, 200, minutes=60, value=0.9, exported=True),
    ckpt(3, 300, minutes=120, state="corrupt", value=0.99),
    ckpt(4, 400, minutes=180, evaluation="running"),
    ckpt(5, 500, minutes=240, value=0.7, evaluation="done"),
    ckpt(6, 600, minutes=595, evaluation="pending"),
]


def test_each_rule_alone() -> None:
    h = _history(RUN)
    assert retention.newest(h) == {6: NEWEST}
    assert KeepLast(2)(h) == {5: LAST, 6: LAST}
    assert KeepLast(0)(h) == {}  # keep = 0 keeps none (not "all": a slice [-0:] would)
    assert KeepBest(METRIC, "max")(h) == {2: BEST}  # the corrupt 0.99 is never best
    assert KeepBest(METRIC, "min", 2)(h) == {1: BEST, 5: BEST, 4: PENDING, 6: PENDING}
    assert KeepEverySteps(200)(h) == {
        2: "every 200 steps",
        4: "every 200 steps",
        6: "every 200 steps",
    }
    # From the first save, each one at least 2 h after the last kept; 3 (corrupt) counts as a
    # save (the whole history) but is never kept; 6 is in the keep_last window.
    assert KeepEvery(timedelta(hours=2), window=1)(h) == {5: "every 2h"}
    assert retention.pinned(h) == {1: PINNED}
    assert retention.exported(h) == {2: EXPORTED}
    assert retention.in_use(h) == {4: IN_USE}
    assert TooYoung(timedelta(minutes=10))(h) == {6: TOO_YOUNG}


def test_plan_keeps_the_union_with_every_reason_in_rule_order() -> None:
    rules = [retention.newest, KeepLast(2), retention.pinned, TooYoung(timedelta(minutes=10))]
    plan = retention.plan(list(reversed(RUN)), rules, NOW)  # any order in, oldest first out
    assert plan.keep == {1: (PINNED,), 5: (LAST,), 6: (NEWEST, LAST, TOO_YOUNG)}
    assert [c.id for c in plan.delete] == [2, 4]  # only complete ones: 3 is corrupt
    assert retention.plan([], rules, NOW) == retention.Plan({}, ())


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(histories())
def test_a_plan_is_the_union_of_its_rules_each_alone(
    case: tuple[list[Checkpoint], Rules, datetime],
) -> None:
    items, spec, now = case
    rules = retention.rules_from(spec, spec.metric, spec.mode)
    union: dict[int, list[str]] = {}
    for rule in rules:
        for cid, reasons in retention.plan(items, [rule], now).keep.items():
            got = union.setdefault(cid, [])
            got += [r for r in reasons if r not in got]
    assert retention.plan(items, rules, now).keep == {k: tuple(v) for k, v in union.items()}


def test_config_builds_the_rules_directly() -> None:
    retain = RetainConfig(
        keep_last=3, keep_best=2, keep_every=timedelta(hours=1), min_age=timedelta(minutes=5)
    )
    rules = retain.rules(BestConfig(METRIC, "min"))
    assert rules == (
        retention.newest,
        KeepLast(3),
        KeepBest(METRIC, "min", 2),
        KeepEvery(timedelta(hours=1), 3),
        retention.current,
        retention.pinned,
        retention.exported,
        retention.in_use,
        TooYoung(timedelta(minutes=5)),
    )
    assert retention.needs_whole_history(rules) and retention.metrics_of(rules) == {METRIC}
    plain = RetainConfig(keep_every_steps=1000).rules(BestConfig())
    assert KeepEverySteps(1000) in plain and not retention.needs_whole_history(plain)
    assert retention.metrics_of(plain) == set()
    assert retention.describe(retain) == (
        "not kept by keep_last=3, keep_best=2, keep_every=1:00:00"
    )
    assert retention.describe(Rules()) == "not kept by any rule"


def test_exports_beyond_keep_are_retired_but_never_the_bests() -> None:
    published = [Published(i, 100 + i, f"/exports/r/{i}") for i in range(1, 6)]  # oldest first
    retire = retention.exports_to_retire
    assert [e.id for e in retire(published, 2, None, NOW)] == [1, 2, 3]
    assert [e.id for e in retire(published, 2, 102, NOW)] == [1, 3]  # 2 is the best's
    assert [e.id for e in retire(published, 5, 101, NOW)] == []
    assert [e.id for e in retire(published, 0, 105, NOW)] == [1, 2, 3, 4]
