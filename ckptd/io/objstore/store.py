"""One object store bucket path, as ckptd uses it (a thin layer over an fsspec filesystem).

Keys are fsspec paths without the scheme (``bucket/runs/r1/model.ckpt-5.index``); URLs keep it
(``s3://bucket/runs/r1``). Listings never come from a cache: a stale listing hides new
checkpoints (s3fs#703), so every filesystem is opened with ``use_listings_cache=False``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

SCHEMES = ("s3", "gs", "memory")  # memory://: fsspec's in-process store, for tests


class StoreError(Exception):
    """An object store request failed in a way the caller should report (one line)."""


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


class Store:
    """The objects under one URL prefix; counts the requests it makes."""

    def __init__(self, url: str, fs: Any) -> None:
        self.url = url.rstrip("/")
        self.scheme, _, rest = self.url.partition("://")
        self.root = rest  # key of the URL prefix
        self.fs = fs
        self._lock = threading.Lock()
        self.requests = 0  # LIST + GET + PUT + DELETE requests made so far

    def _count(self, n: int = 1) -> None:
        with self._lock:
            self.requests += n

    def url_of(self, key: str) -> str:
        return f"{self.scheme}://{key}"

    def list_dir(self, key: str) -> tuple[list[ObjectInfo], list[str]]:
        """The objects directly under ``key`` and its sub-prefixes (one delimiter listing)."""
        self._count()
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        for entry in self.fs.ls(key, detail=True, refresh=True):
            name = _key(entry["name"].rstrip("/"))
            if entry.get("type") == "directory":
                prefixes.append(name)
            else:
                objects.append(_info(name, entry))
        return objects, prefixes

    def list_tree(self, key: str) -> list[ObjectInfo]:
        """Every object under the prefix ``key`` (one listing without a delimiter, paged by the
        store): a run and its subdirectories in one request where a delimiter listing would
        cost one per subdirectory."""
        self._count()
        found = self.fs.find(key, detail=True, withdirs=False)
        return [
            _info(_key(name), entry)
            for name, entry in sorted(found.items())
            if entry.get("type") != "directory" and not name.endswith("/")
        ]

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of an object (one ranged GET)."""
        self._count()
        data: bytes = self.fs.cat_file(key, start=start, end=end)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` as one object (readers see the old or the new one, never a mix)."""
        self._count()
        self.fs.pipe_file(key, data)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self._count()
            self.fs.rm(keys)


def _key(name: str) -> str:
    return name.lstrip("/")  # memory:// names start with one; object keys are bucket/…


def _info(name: str, entry: dict[str, Any]) -> ObjectInfo:
    version = entry.get("generation") or entry.get("ETag") or entry.get("etag") or ""
    modified = entry.get("LastModified") or entry.get("updated") or entry.get("created")
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


def open_store(url: str, *, endpoint_url: str | None = None) -> Store:
    """The store at ``url``; credentials come from the environment as s3fs/gcsfs take them."""
    import fsspec

    scheme = url.partition("://")[0]
    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if endpoint_url and scheme in ("s3", "gs"):
        options["endpoint_url"] = endpoint_url
    return Store(url, fsspec.filesystem(scheme, **options))
