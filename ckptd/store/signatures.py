"""Checkpoints' recorded signatures: what identified their files' versions when recorded (an
object store's prune deletes a main object only in that version)."""

from __future__ import annotations

import json
from collections.abc import Collection

from sqlalchemy import select

from ckptd.store import tables
from ckptd.store.handle import Store
from ckptd.store.tables import json_text

_c = tables.checkpoints
CHUNK = 500


def signatures(store: Store, ids: Collection[int]) -> dict[int, tuple[int, ...]]:
    """The signature recorded for each of the checkpoints ``ids`` (empty when none was)."""
    out: dict[int, tuple[int, ...]] = {}
    wanted = sorted(ids)
    with store.session() as s:
        for i in range(0, len(wanted), CHUNK):
            chunk = wanted[i : i + CHUNK]
            stmt = select(_c.c.id, json_text(_c.c.signature)).where(_c.c.id.in_(chunk))
            for cid, raw in s.execute(stmt):
                value = json.loads(raw) if raw else []
                out[cid] = tuple(int(v) for v in value if isinstance(v, int))
    return out
