"""`ckptd db`: the database's schema revision, and upgrading it (Alembic, loaded on demand)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.store import migrate
from ckptd.store.handle import Store
from ckptd.store.urls import redacted


@dataclass(frozen=True)
class Revision:
    database: str  # the configured URL, without a password
    current: str | None  # None: an empty database
    head: str | None  # the newest revision this ckptd ships

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


@dataclass(frozen=True)
class Upgrade:
    database: str
    before: str | None
    after: str | None


def current(store: Store, url: str) -> Revision:
    """The schema revision of the database at ``url`` (opened as ``store``)."""
    now, head = migrate.schema_revisions(store)
    return Revision(redacted(url), now, head)


def upgrade(store: Store, url: str) -> Upgrade:
    """Create or upgrade the schema of the database at ``url`` (opened as ``store``)."""
    before, after = migrate.upgrade_schema(store)
    return Upgrade(redacted(url), before, after)
