"""Observe one run on an object store: its listing turned into the :class:`Observation` a local
run directory gives, so ``core.recording.diff`` and the recorder need not know the difference.

The completeness rule is the local one: a checkpoint is complete when its ``.index`` parses and
every data shard it names is listed, large enough. An object is visible only once fully
uploaded, and TensorFlow writes the ``.index`` last, so a half-way upload (data without index,
an index whose shard is missing) is never complete. An object's identity is its version
(ETag or generation) with its size, as inode and mtime are on a local disk: a rewritten object is
a new version. Reads are ranged: the ``.index`` (the parser needs all of it: one GET of the
listed size), the few bytes of the step in the data shard, and event files from the offset
already read (on GCS each flush re-uploads an event file whole; the new generation holds the
old bytes first, so reading on from the offset is right there too).
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptd.core.recording import EventRead, EventTail, Found, Observation
from ckptd.io.eventfiles import ReadResult, scan_records
from ckptd.io.formats import COMPLETE, CORRUPT, EVENT_FILE, INCOMPLETE, INDEX_MAX_BYTES
from ckptd.io.formats.discover import SUBDIR_INDEX, is_temp_name, unread_reason
from ckptd.io.formats.found import Seen, step_from_name
from ckptd.io.formats.keras import hdf5_incomplete, keras_name
from ckptd.io.formats.sstable import BundleError
from ckptd.io.formats.step import readable, step_keys, step_value
from ckptd.io.formats.tensorbundle import read_header
from ckptd.io.formats.tf import index_error, shards_problem
from ckptd.io.kerasname import KerasTemplate
from ckptd.io.objstore.failures import CHANGED, NOT_FOUND
from ckptd.io.objstore.listing import RunListing
from ckptd.io.objstore.store import ObjectInfo, Store, StoreError
from ckptd.io.observe import Request, RunObservation

_DATA = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<total>\d{5})$")
_SAVED_MODEL = "saved_model.pb"
_ZIP_END = b"PK\x05\x06"  # a zip's end-of-central-directory record: the archive is whole
_ZIP_TAIL = 22 + 0xFFFF  # the end record and the longest comment it may have


class ShortRead(Exception):
    """A ranged read returned fewer bytes than the listing says the object holds (a truncated
    response, or the object replaced meanwhile): nothing is concluded, the run is read again."""


READ_THREADS = 8  # reads of one run in flight at once


def _read(store: Store, o: ObjectInfo, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the listed version of ``o`` (one ranged GET, retried by the
    store when cut short); FileNotFoundError when that version is gone since the listing."""
    try:
        data = store.read_range(o.key, start, end, size=o.size, version=o.version or None)
    except StoreError as exc:
        if exc.kind in (NOT_FOUND, CHANGED):  # the listed version is gone: list again
            raise FileNotFoundError(o.key) from None
        raise
    if len(data) != end - start:
        raise ShortRead(f"{store.url_of(o.key)}: read {len(data)} of bytes {start}-{end}; retrying")
    return data


def identity(*objects: ObjectInfo) -> int:
    """A number that changes whenever one of ``objects`` is rewritten (a signature holds
    integers; the database's are 64-bit). Stores that give no version: their mtime."""
    h = hashlib.blake2b(digest_size=7)
    for o in objects:
        h.update(f"{o.key}\0{o.version or o.mtime_ns}\0".encode())
    return int.from_bytes(h.digest(), "big")


@dataclass
class _Group:
    index: ObjectInfo | None = None
    meta: ObjectInfo | None = None
    data: dict[int, ObjectInfo] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)


def observe_listing(
    store: Store, listing: RunListing, req: Request, *, now: float | None = None
) -> RunObservation:
    """What ``listing`` shows, reading only what changed since ``req`` (what the database
        holds). Raises :class:`StoreError` when the store fails a read, :class:`ShortRead` when
    it returns less than asked: nothing is concluded then."""
    if not listing.present:
        return RunObservation(listing.url, False, basis=req.basis)
    now = time.time() if now is None else now
    groups: dict[str, _Group] = {}
    keras: list[tuple[str, ObjectInfo]] = []
    events: list[tuple[str, ObjectInfo]] = []
    unread: dict[str, str] = {}
    exports = {listing.rel(o).rpartition("/")[0] for o in listing.objects if o.name == _SAVED_MODEL}
    for o in listing.objects:
        rel = listing.rel(o)
        folder, _, name = rel.rpartition("/")
        if any(folder == e or folder.startswith(e + "/") for e in exports if e):
            continue  # an export below the run (its variables/ hold an index)
        if is_temp_name(rel) and not name.startswith(EVENT_FILE):
            continue
        if not folder and name.endswith(".index"):
            groups.setdefault(name[:-6], _Group()).index = o
        elif not folder and name.endswith(".meta"):
            groups.setdefault(name[:-5], _Group()).meta = o
        elif not folder and (m := _DATA.match(name)):
            g = groups.setdefault(m.group("prefix"), _Group())
            g.data[int(m.group("shard"))] = o
            g.totals.add(int(m.group("total")))
        elif name.endswith((".keras", ".weights.h5")):
            keras.append((rel, o))
        elif name.startswith(EVENT_FILE):
            events.append((rel, o))
        elif folder and name.endswith(".index"):
            unread[rel] = SUBDIR_INDEX
        elif (why := unread_reason(name)) is not None:
            unread[rel] = why
    known = req.known
    found: list[Found] = []
    keys = step_keys(req.step_variable)
    bundles = [(n, g) for n, g in sorted(groups.items()) if g.index is not None or g.data]

    def bundle(item: tuple[str, _Group]) -> Found:  # (a lone .meta is not a checkpoint)
        return _bundle(store, listing.url, item[0], item[1], known, now, req.stale_after, keys)

    if len(bundles) > 1:
        # Each bundle costs up to two reads, and a request's round trip is what bounds a run
        # read one after another: several in flight at once (the store's I/O loop serves
        # them together; threads are made only as reads wait).
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ckptd-objread") as pool:
            found.extend(pool.map(bundle, bundles))
    else:
        found.extend(map(bundle, bundles))
    template = KerasTemplate(req.keras_template) if req.keras_template else None
    for rel, o in keras:
        found.append(_keras(store, listing.url, rel, o, template, known, now, req.stale_after))
    tails = {
        f"{listing.url}/{rel}": _tail(store, f"{listing.url}/{rel}", rel, o, req)
        for rel, o in sorted(events)
        if f"{listing.url}/{rel}" not in req.skip_events
    }
    return RunObservation(
        listing.url,
        True,
        tuple(found),
        (),
        tails,
        req.basis,
        None,  # no fingerprint: the poller's listing marker plays its part
        unread=tuple(sorted(unread.items())),
    )


def settled(obs: Observation) -> bool:
    """Whether observing the same listing again could only give the same (nothing in progress
    that time alone changes, no read to retry): then an unchanged marker skips the run."""
    return (
        obs.unreadable is None
        and all(f.state != INCOMPLETE for f in obs.found)
        and not any(t.read is not None and t.read.retry for t in obs.events.values())
    )


def _mtime(now: float, *objects: ObjectInfo) -> float:
    """The newest upload time; a store that reports none counts as written now (never stale)."""
    newest = max((o.mtime_ns for o in objects), default=0)
    return newest / 1e9 if newest else now


def _bundle(
    store: Store,
    url: str,
    name: str,
    g: _Group,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
    keys: tuple[bytes, ...],
) -> Found:
    objects = [o for o in (g.index, g.meta, *g.data.values()) if o is not None]
    shard_sizes = {i: o.size for i, o in g.data.items()}
    has_meta = g.meta is not None
    fmt = "tf1" if has_meta else "tf2"
    mtime = _mtime(now, *objects)
    files = tuple(sorted(o.name for o in objects))
    size = sum(o.size for o in objects)
    seen = Seen(f"{url}/{name}", step_from_name(name), files, size, has_meta, mtime)
    if g.index is None:
        if now - mtime > stale_after:
            reason = f"no .index object; data unchanged for {now - mtime:.0f} s"
            return seen.found(fmt, CORRUPT, reason)
        return seen.found(fmt, INCOMPLETE, "index not uploaded yet")
    index = g.index
    # The index and the data are the save's identity (a .meta arriving later is the same save).
    ident = identity(index, *(g.data[i] for i in sorted(g.data)))
    signature = (index.size, ident, len(g.data), int(has_meta), sum(shard_sizes.values()))
    before = known.get(seen.prefix) if known is not None else None
    if before is not None and len(before) == 7 and before[:5] == signature:
        if before[6] >= 0:
            seen.step = before[6]
        return seen.found("tf2" if before[5] else "tf1", COMPLETE, None, tuple(before))
    if index.size > INDEX_MAX_BYTES:
        reason = f"index is larger than the {INDEX_MAX_BYTES >> 20} MiB cap; not read"
        return seen.found(fmt, CORRUPT, reason, signature)
    try:
        data = _read(store, index, 0, index.size)
    except FileNotFoundError:
        return seen.found(fmt, INCOMPLETE, "index deleted or replaced while being read")
    try:
        header = read_header(data, keys)
    except BundleError as exc:
        state, reason = index_error(exc, now - _mtime(now, index), stale_after)
        return seen.found(fmt, state, reason, signature)
    fmt = "tf2" if header.is_object_graph else "tf1"
    problem = shards_problem(header, g.totals, g.data.keys(), shard_sizes)
    if problem is not None:
        return seen.found(fmt, CORRUPT, problem, signature)
    step = None
    at = header.located
    if at is not None and at.shard in g.data and readable(at):
        try:
            raw = _read(store, g.data[at.shard], at.offset, at.offset + at.size)
        except FileNotFoundError:
            return seen.found(fmt, INCOMPLETE, "data deleted or replaced while being read")
        step = step_value(raw, at)  # None: the name's number stays the step
    if step is not None:
        seen.step = step
    return seen.found(
        fmt, COMPLETE, None, (*signature, int(header.is_object_graph), -1 if step is None else step)
    )


def _keras(
    store: Store,
    url: str,
    rel: str,
    o: ObjectInfo,
    template: KerasTemplate | None,
    known: dict[str, tuple[int, ...]] | None,
    now: float,
    stale_after: float,
) -> Found:
    fmt, step, metrics = keras_name(o.name, template)
    signature = (o.size, identity(o))
    mtime = _mtime(now, o)
    seen = Seen(f"{url}/{rel}", step, (rel,), o.size, False, mtime, metrics)
    if known is not None and known.get(seen.prefix) == signature:
        return seen.found(fmt, COMPLETE, None, signature)
    try:
        if fmt == "keras_weights":
            problem = hdf5_incomplete(_read(store, o, 0, min(48, o.size)), o.size)
        else:
            tail = _read(store, o, max(0, o.size - _ZIP_TAIL), o.size)
            problem = None if _ZIP_END in tail else "not a complete zip archive (truncated)"
    except FileNotFoundError:
        return seen.found(fmt, INCOMPLETE, "deleted or replaced while being read")
    if problem is None:
        return seen.found(fmt, COMPLETE, None, signature)
    if now - mtime > stale_after:
        return seen.found(fmt, CORRUPT, f"{problem}; unchanged for {now - mtime:.0f} s", signature)
    return seen.found(fmt, INCOMPLETE, problem, signature)


def _tail(store: Store, url: str, rel: str, o: ObjectInfo, req: Request) -> EventTail:
    """The event file ``o`` read from the offset the database holds (from 0 if it shrank:
    another file under the same name)."""
    offset = req.event_offsets.get(url)
    if offset is not None and o.size == offset:
        return EventTail(o.size, offset, None)
    start = offset if offset is not None and o.size > offset else 0
    result = ReadResult(offset=start)
    prefix = rel.rpartition("/")[0]
    try:
        scan_records(
            lambda n, pos: store.read_range(
                o.key, pos, pos + n, size=o.size, version=o.version or None
            ),
            o.size,
            prefix,
            result,
        )
    except StoreError as exc:
        if exc.kind not in (NOT_FOUND, CHANGED):
            raise  # the store fails: reported, nothing concluded
        result.retry = f"unreadable: {exc}"  # a newer upload: read on from here next poll
    except OSError as exc:  # keep what was read; the rest at the next poll
        result.retry = f"unreadable: {exc}"
    r = result
    read = EventRead(r.offset, tuple(r.scalars), r.error, r.retry, r.skipped, r.skip_reason)
    return EventTail(o.size, start, read)
