"""The fsspec filesystems a Store talks through, each reporting every HTTP request it sends.

Counting happens where the request leaves (botocore's ``before-send`` event for S3, gcsfs's
``_request`` for GCS), so a library call that makes two requests (s3fs's ``info`` of a missing
key also lists its prefix) counts two, and each retried attempt counts. The libraries' own
retries are turned off: the Store retries, with its own bounds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

# A server that accepts but never answers must not hang a scan (or `config check`) for long:
# bounded connects and reads (per socket read, not per body: a large shard may take a while).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

Count = Callable[[str], None]  # called with "LIST", "GET", "HEAD", "PUT" or "DELETE"

_S3_OPERATIONS = {
    "ListObjectsV2": "LIST",
    "ListObjects": "LIST",
    "ListObjectVersions": "LIST",
    "ListBuckets": "LIST",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "HeadBucket": "HEAD",
    "DeleteObject": "DELETE",
    "DeleteObjects": "DELETE",
}
_BY_HTTP = {"GET": "GET", "HEAD": "HEAD", "DELETE": "DELETE"}  # anything else writes: PUT


def s3_method(operation: str, http_method: str) -> str:
    return _S3_OPERATIONS.get(operation) or _BY_HTTP.get(http_method.upper(), "PUT")


def gcs_method(http_method: str, path: str, params: dict[str, Any]) -> str:
    """What a gcsfs request is, from its method and its URL template (``b/{}/o``)."""
    method = http_method.upper()
    if method == "DELETE" or "/batch/" in path:
        return "DELETE"  # gcsfs batches only deletions
    if method not in ("GET", "HEAD"):
        return "PUT"
    if path.startswith("http"):
        return "GET"  # a media download URL
    if re.search(r"(^|/)b/\{\}/o$", path):
        return "LIST"
    if path == "b" and "project" in params:
        return "LIST"  # the project's buckets
    return "HEAD"  # an object's or a bucket's metadata


def filesystem(
    scheme: str,
    endpoint_url: str | None,
    count: Count,
    timeouts: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
) -> tuple[Any, bool]:
    """An fsspec filesystem for ``scheme`` without listing cache or retries of its own, and
    whether it reports its HTTP requests through ``count`` (the in-memory one has none).
    ``timeouts``: seconds to connect, and to wait for each read from the socket."""
    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if scheme == "s3":
        return _s3(endpoint_url, count, options, timeouts), True
    if scheme == "gs":
        from aiohttp import ClientTimeout

        timeout = ClientTimeout(sock_connect=timeouts[0], sock_read=timeouts[1])
        fs = _gcs_class()(endpoint_url=endpoint_url, requests_timeout=timeout, **options)
        fs.ckptd_count = count
        return fs, True
    import fsspec

    return fsspec.filesystem(scheme, **options), False


def list_entries(fs: Any, scheme: str, key: str) -> list[dict[str, Any]]:
    """One delimiter listing of ``key`` (all its pages), entries as fsspec's ``ls`` gives them.

    The libraries' ``ls`` of a prefix that holds nothing makes a second request (s3fs lists the
    parent, gcsfs looks for an object of that name); an empty prefix here is one LIST, and
    lists empty.
    """
    from fsspec.asyn import sync

    if scheme == "s3" and hasattr(fs, "_lsdir"):
        entries: list[dict[str, Any]] = sync(fs.loop, fs._lsdir, key, refresh=True)
        return entries
    if scheme == "gs" and hasattr(fs, "_do_list_objects"):
        bucket = key.split("/", 1)[0]
        try:
            items, prefixes = sync(fs.loop, fs._do_list_objects, key)
        except FileNotFoundError as exc:  # the listing of an existing bucket never is a 404
            raise FileNotFoundError(f"NoSuchBucket: {bucket}") from exc
        dirs = [
            {"name": f"{bucket}/{p.strip('/')}", "type": "directory", "size": 0} for p in prefixes
        ]
        return [*items, *dirs]
    listed: list[dict[str, Any]] = fs.ls(key, detail=True, refresh=True)
    return listed


def get_range(fs: Any, scheme: str, key: str, start: int, end: int, version: str) -> bytes:
    """Bytes ``[start, end)`` of ``key`` as of ``version`` (an S3 ETag, a GCS generation): one
    GET that fails rather than mix two versions (S3: 412 for If-Match; GCS: that generation,
    a 404 once it is replaced)."""
    if scheme == "s3":
        from fsspec.asyn import sync

        bucket, _, name = key.partition("/")

        async def get() -> bytes:
            resp = await fs._call_s3(
                "get_object",
                Bucket=bucket,
                Key=name,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=f'"{version}"',
            )
            try:
                data: bytes = await resp["Body"].read()
                return data
            finally:
                resp["Body"].close()

        result: bytes = sync(fs.loop, get)
        return result
    if scheme == "gs":
        data: bytes = fs.cat_file(key, start=start, end=end, generation=version)
        return data
    if str(fs.info(key).get("ETag") or "") not in ("", version):
        raise FileNotFoundError(f"{key}: version {version} is gone")
    data = fs.cat_file(key, start=start, end=end)
    return data


def head(fs: Any, scheme: str, key: str) -> dict[str, Any]:
    """An object's metadata in one request (the libraries' ``info`` also lists the key as a
    prefix, to find "directories": two or three requests). FileNotFoundError when absent."""
    if scheme == "s3":
        bucket, _, name = key.partition("/")
        meta = fs.call_s3("head_object", Bucket=bucket, Key=name)
        return {
            "name": key,
            "type": "file",
            "size": meta.get("ContentLength", 0),
            "ETag": meta.get("ETag"),
            "LastModified": meta.get("LastModified"),
        }
    if scheme == "gs":
        from fsspec.asyn import sync

        entry: dict[str, Any] = sync(fs.loop, fs._get_object, key)
        return entry
    info: dict[str, Any] = fs.info(key)
    return info


def _s3(
    endpoint_url: str | None, count: Count, options: dict[str, Any], timeouts: tuple[float, float]
) -> Any:
    from aiobotocore.session import AioSession
    from s3fs import S3FileSystem

    session = AioSession()

    def before_send(request: Any = None, event_name: str = "", **_: Any) -> None:
        count(s3_method(event_name.rsplit(".", 1)[-1], getattr(request, "method", "GET")))

    session.register("before-send.s3", before_send)
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    # botocore's retries: one attempt in all (s3fs's loop is set to one below).
    options["config_kwargs"] = {
        "retries": {"total_max_attempts": 1},
        "connect_timeout": timeouts[0],
        "read_timeout": timeouts[1],
    }
    fs = S3FileSystem(session=session, **options)
    fs.retries = 1
    return fs


@functools.cache
def _gcs_class() -> type:
    """gcsfs's plain filesystem (not its experimental class, which queries bucket types an
    emulator does not know), its ``_request`` without the retry decorator, counted."""
    from gcsfs.core import GCSFileSystem

    wrapped = GCSFileSystem._request
    raw = getattr(wrapped, "__wrapped__", wrapped)

    class CountedGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
        ckptd_count: Count | None = None

        async def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            if self.ckptd_count is not None:
                self.ckptd_count(gcs_method(method, path, kwargs))
            return await raw(self, method, path, *args, **kwargs)

    return CountedGCSFileSystem
