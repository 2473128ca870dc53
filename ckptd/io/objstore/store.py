"""One object store bucket path, as ckptd uses it (a thin layer over an fsspec filesystem).

Keys are fsspec paths without the scheme (``bucket/runs/r1/model.ckpt-5.index``); URLs keep it
(``s3://bucket/runs/r1``). Listings never come from a cache: a stale listing hides new
checkpoints (s3fs#703), so every filesystem is opened with ``use_listings_cache=False``.

Retries are this module's own, bounded, with backoff (the libraries' are turned off, so the
request counts are the requests made): a throttled, unreachable or failing server, or a range
read that came back short, is tried again; every other failure is a :class:`StoreError` at once.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from ckptd.io.objstore import clients
from ckptd.io.objstore.failures import (
    CHANGED,
    CHANGED_TEXT,
    MISSING_LIBRARY,
    NOT_FOUND,
    TRUNCATED,
    StoreError,
    Truncated,
    classify,
)

SCHEMES = ("s3", "gs", "memory")  # memory://: fsspec's in-process store, for tests
METHODS = ("LIST", "GET", "HEAD", "PUT", "DELETE")
_T = TypeVar("_T")


def is_object_url(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme in SCHEMES


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing."""

    key: str  # full key without the scheme: bucket/prefix/name
    size: int
    version: str  # ETag (S3) or generation (GCS): changes whenever the object is rewritten
    mtime_ns: int  # last modified, as the store reports it (0 when it does not)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a transient failure is tried again."""

    attempts: int = 4  # in all, the first included
    base: float = 0.2  # seconds before the second attempt; doubled after each failure
    cap: float = 5.0

    def delay(self, failed: int) -> float:
        """Seconds to wait after failed attempt number ``failed`` (1-based), with jitter so
        daemons throttled together do not come back together."""
        return min(self.cap, self.base * 2 ** (failed - 1)) * random.uniform(0.5, 1.0)


class Store:
    """The objects under one URL prefix; counts the requests it makes, by method."""

    def __init__(
        self,
        url: str,
        fs: Any,
        *,
        retry: Retry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        counted: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.scheme, _, rest = self.url.partition("://")
        self.root = rest  # key of the URL prefix
        self.bucket = rest.split("/", 1)[0]
        self.fs = fs
        # True: ``fs`` reports each HTTP request it sends (count_request); else each call counts.
        self.counted = counted
        self.retry = retry or Retry()
        self.sleep = sleep
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(METHODS, 0)
        self.retries = 0  # attempts beyond the first, all requests together
        self.last_error: StoreError | None = None  # the latest failure, retried or not
        self.last_error_at = 0.0  # its time.time(), for "failing since" in status
        self._errors: dict[str, int] = {}

    # ------------------------------------------------------------ accounting

    @property
    def requests(self) -> int:
        """Requests made so far (every attempt), all methods together."""
        with self._lock:
            return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        """Requests made so far by method (``LIST``, ``GET``, ``HEAD``, ``PUT``, ``DELETE``)."""
        with self._lock:
            return dict(self._counts)

    def errors(self) -> dict[str, int]:
        """Failed attempts so far by failure kind (``throttled``, ``unreachable``, …)."""
        with self._lock:
            return dict(self._errors)

    def count_request(self, method: str) -> None:
        """One request sent (called by the filesystem as it sends it, from its IO thread)."""
        with self._lock:
            self._counts[method] += 1

    def url_of(self, key: str) -> str:
        return f"{self.scheme}://{key}"

    def _call(
        self, method: str, key: str, fn: Callable[[], _T], *, bucket_request: bool = False
    ) -> _T:
        """``fn()`` (one request), tried again on transient failures; a StoreError otherwise."""
        attempt = 1
        while True:
            if not self.counted:
                self.count_request(method)
            try:
                return fn()
            except Exception as exc:
                err = classify(exc, self.url_of(key), bucket_request=bucket_request)
                err.attempts = attempt
                with self._lock:
                    self._errors[err.kind] = self._errors.get(err.kind, 0) + 1
                    self.last_error, self.last_error_at = err, time.time()
                if not err.transient or attempt >= self.retry.attempts:
                    raise err from exc
            with self._lock:
                self.retries += 1
            self.sleep(self.retry.delay(attempt))
            attempt += 1

    # ------------------------------------------------------------ requests

    def list_dir(self, key: str | None = None) -> tuple[list[ObjectInfo], list[str]]:
        """The objects directly under ``key`` (default: the store's prefix) and its
        sub-prefixes: one delimiter listing. A prefix holding nothing lists empty."""
        key = self.root if key is None else key.rstrip("/")

        try:
            entries = self._call(
                "LIST", key, lambda: clients.list_entries(self.fs, self.scheme, key)
            )
        except StoreError as err:
            if err.kind != NOT_FOUND:
                raise
            return [], []
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        for entry in entries:
            name = _key(entry["name"].rstrip("/"))
            if name == key:
                continue  # the prefix itself (a "directory" marker object)
            if entry.get("type") == "directory":
                prefixes.append(name)
            else:
                objects.append(_info(name, entry))
        return objects, prefixes

    def list_tree(self, key: str) -> list[ObjectInfo]:
        """Every object under the prefix ``key`` (one listing without a delimiter, paged by the
        store): a run and its subdirectories in one request where a delimiter listing would
        cost one per subdirectory. A prefix holding nothing lists empty."""

        def find() -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = self.fs.find(key, detail=True, withdirs=False)
            return found

        try:
            found = self._call("LIST", key, find)
        except StoreError as err:
            if err.kind != NOT_FOUND:
                raise
            return []
        return [
            _info(_key(name), entry)
            for name, entry in sorted(found.items())
            if entry.get("type") != "directory" and not name.endswith("/")
        ]

    def stat(self, key: str) -> ObjectInfo | None:
        """The object ``key`` (one HEAD), or None when there is none."""
        try:
            entry = self._call("HEAD", key, lambda: clients.head(self.fs, self.scheme, key))
        except StoreError as err:
            if err.kind == NOT_FOUND:
                return None
            raise
        if entry.get("type") == "directory":
            return None
        return _info(str(entry["name"]).rstrip("/"), entry)

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of an object (``end`` None: to its end): one GET."""
        data: bytes = self._call("GET", key, lambda: self.fs.cat_file(key, start=start, end=end))
        return data

    def read_range(
        self,
        key: str,
        start: int,
        end: int,
        *,
        size: int | None = None,
        version: str | None = None,
    ) -> bytes:
        """Bytes ``[start, end)`` of an object of ``size`` bytes (when known): one ranged GET.

        A body shorter than the range (clipped to ``size``) is a truncated read and is tried
        again; without ``size``, a short body is checked against the object's size (a HEAD).
        With ``version`` (an ObjectInfo's), the bytes are that version's or the read fails
        with kind ``changed``: never a mix of an old listing and a new object.
        """
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        wanted = (min(end, size) if size is not None else end) - start
        if wanted <= 0:
            return b""

        def get() -> bytes:
            if version:
                stop = start + wanted
                data = clients.get_range(self.fs, self.scheme, key, start, stop, version)
            else:
                data = self.fs.cat_file(key, start=start, end=start + wanted)
            if len(data) < wanted:
                real = size
                if real is None:
                    info = self.stat(key)
                    real = info.size if info is not None else 0
                if len(data) < min(wanted, real - start):
                    raise Truncated(f"got {len(data)} of {wanted} bytes")
            return data

        try:
            return self._call("GET", key, get)
        except StoreError as err:
            if version and err.kind == NOT_FOUND:  # that generation is gone: replaced
                text = f"{err.url}: {CHANGED_TEXT}"
                raise StoreError(CHANGED, text, url=err.url, attempts=err.attempts) from err
            if err.kind == TRUNCATED:
                err.message = f"{err.message} (after {err.attempts} attempts)"
            raise

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` as one object (readers see the old or the new one, never a mix)."""
        self._call("PUT", key, lambda: self.fs.pipe_file(key, data))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects (one batched request per 1000 keys on S3; one per key on GCS)."""
        keys = list(keys)
        if not keys:
            return
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            self._call("DELETE", batch[0], functools.partial(self.fs.rm, batch))

    def check_access(self) -> None:
        """That the bucket exists, the server answers and the credentials may list the prefix
        (a StoreError saying which is not so): one LIST."""
        self.list_dir()


def _key(name: str) -> str:
    return name.lstrip("/")  # memory:// names start with one; object keys are bucket/…


def _info(name: str, entry: dict[str, Any]) -> ObjectInfo:
    version = entry.get("generation") or entry.get("ETag") or entry.get("etag") or ""
    modified = entry.get("LastModified") or entry.get("mtime") or entry.get("created")
    stamp = getattr(modified, "timestamp", None)  # a datetime; some stores give a string or none
    if isinstance(modified, str):  # gcsfs: RFC 3339 text
        try:
            stamp = datetime.fromisoformat(modified).timestamp
        except ValueError:
            stamp = None
    if stamp is not None:
        mtime_ns = int(stamp() * 1e9)
    else:  # memory:// gives seconds as a number
        mtime_ns = int(modified * 1e9) if isinstance(modified, int | float) else 0
    return ObjectInfo(name, int(entry.get("size") or 0), str(version).strip('"'), mtime_ns)


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    retry: Retry | None = None,
    sleep: Callable[[float], None] = time.sleep,
    timeouts: tuple[float, float] = (clients.CONNECT_TIMEOUT, clients.READ_TIMEOUT),
) -> Store:
    """The store at ``url``; credentials come from the environment as s3fs/gcsfs take them
    (``AWS_*``/profiles, ``GOOGLE_APPLICATION_CREDENTIALS``), never from ckptd."""
    scheme = url.partition("://")[0]
    store = Store(url, None, retry=retry, sleep=sleep)
    try:
        store.fs, store.counted = clients.filesystem(
            scheme, endpoint_url, store.count_request, timeouts
        )
    except ImportError as exc:
        extra = {"s3": "s3", "gs": "gcs"}.get(scheme, scheme)
        raise StoreError(
            MISSING_LIBRARY,
            f"{url}: {exc.name or 'its library'} is not installed; pip install 'ckptd[{extra}]'",
            url=url,
        ) from None
    return store
