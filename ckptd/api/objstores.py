"""The object stores of the configured watches, opened once per watch URL.

Acting on a recorded run (prune, evaluate, export) knows the run's URL, not its watch's
settings: :func:`configure` remembers each object-store watch's ``endpoint_url`` and
:func:`store_for` opens the store of the watch a URL is under (credentials and any other
endpoint come from the environment, as s3fs and gcsfs take them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ckptd.config import WatchConfig
from ckptd.io.objstore import Store, is_object_url, open_store

_lock = threading.Lock()
_endpoints: dict[str, str | None] = {}  # watch URL -> its endpoint_url
_stores: dict[str, Store] = {}  # bucket URL (scheme://bucket) -> its store


def url_of(path: object) -> str:
    """A watch's or export dir's location as a string (``s3://…`` kept whole)."""
    return str(path).rstrip("/")


def configure(watches: Iterable[WatchConfig]) -> None:
    """Remember the endpoints of the object-store watches (and of their export dirs)."""
    with _lock:
        for w in watches:
            endpoint = getattr(w, "endpoint_url", None)
            for where in (w.path, w.freeze.export_dir if w.freeze else None):
                if where is not None and is_object_url(url_of(where)):
                    _endpoints[url_of(where)] = endpoint


def key_of(url: str) -> str:
    """The store key of ``url`` (``bucket/runs/r1``)."""
    return url.partition("://")[2].strip("/")


def store_for(url: str) -> Store:
    """The store holding ``url`` (its bucket), with the endpoint of the watch it is under."""
    scheme, _, rest = url.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    with _lock:
        if bucket in _stores:
            return _stores[bucket]
        under = [w for w in _endpoints if url == w or url.startswith(w + "/") or w == bucket]
        endpoint = _endpoints[max(under, key=len)] if under else None
        if endpoint is None:  # a URL under no watch: any endpoint given for its bucket
            endpoint = next((e for w, e in _endpoints.items() if w.startswith(bucket)), None)
        store = _stores[bucket] = open_store(bucket, endpoint_url=endpoint)
        return store


def forget() -> None:
    """Drop the opened stores (tests; a configuration reloaded)."""
    with _lock:
        _stores.clear()
        _endpoints.clear()
