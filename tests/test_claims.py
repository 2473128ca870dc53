"""Per-run job claims: one holder at a time, renewal, release, expiry returns the job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import insert

from ckptd.core.model import utcnow
from ckptd.store import claims, migrate, tables
from ckptd.store.handle import Store


@pytest.fixture
def two(database_url: str) -> tuple[Store, Store, int]:
    url = database_url
    a, b = Store.open(url), Store.open(url)
    migrate.ensure_schema(a.engine)
    with a.session() as s:
        run_id = s.execute(
            insert(tables.runs).values(name="r", path="/r", watch_path="/", created_at=utcnow())
        ).inserted_primary_key[0]
    yield a, b, run_id
    a.close()
    b.close()


def test_one_holder_at_a_time_until_release(two: tuple[Store, Store, int]) -> None:
    a, b, run = two
    assert a.holder != b.holder
    assert claims.claim(a, run, claims.PRUNE)
    assert not claims.claim(b, run, claims.PRUNE)
    assert claims.claim(b, run, claims.FREEZE)  # another job of the same run is free
    assert claims.holder_of(b, run, claims.PRUNE)[0] == a.holder
    assert claims.renew(a, run, claims.PRUNE)
    assert not claims.renew(b, run, claims.PRUNE)
    claims.release(b, run, claims.PRUNE)  # not b's: no effect
    assert not claims.claim(b, run, claims.PRUNE)
    claims.release(a, run, claims.PRUNE)
    assert claims.claim(b, run, claims.PRUNE)


def test_an_expired_claim_returns_the_job(two: tuple[Store, Store, int]) -> None:
    a, b, run = two
    assert claims.claim(a, run, claims.PRUNE, ttl=timedelta(seconds=-1))  # a died long ago
    assert claims.claim(b, run, claims.PRUNE)
    assert not claims.renew(a, run, claims.PRUNE)  # a's renewal finds the job taken


def test_claimed_raises_busy_naming_the_holder(two: tuple[Store, Store, int]) -> None:
    a, b, run = two
    with (
        claims.claimed(a, run, claims.PRUNE),
        pytest.raises(claims.Busy, match=a.holder),
        claims.claimed(b, run, claims.PRUNE),
    ):
        pass
    with claims.claimed(b, run, claims.PRUNE):
        pass
    assert claims.holder_of(a, run, claims.PRUNE) is None
