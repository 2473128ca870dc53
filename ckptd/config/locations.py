"""Where a config points: a local path (a Path) or an object store URL (a str), and what is
true of each kind (nesting, keys that apply to one kind only)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.config.values import path, show, string

OBJECT_SCHEMES = ("s3", "gs")
# S3's and GCS's bucket names, both: lower case, digits, dots, dashes (GCS also underscores).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_URL_EXAMPLE = (
    'a local path, or an object store URL such as "s3://bucket/runs" or "gs://bucket/runs"'
)


def is_object_url(text: str) -> bool:
    """Whether ``text`` is an object store URL (``s3://``, ``gs://``) rather than a path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in OBJECT_SCHEMES


def object_url(value: object) -> str:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix``, normalized (no trailing slash), so
    equal and nested watches are seen as such."""
    text = string(value).strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in OBJECT_SCHEMES:
        raise ValueError(f"expected {_URL_EXAMPLE}, got {show(value)}")
    bucket, _, prefix = rest.partition("/")
    parts = [p for p in prefix.split("/") if p]
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"expected a bucket name of 3 to 222 lower-case letters, digits, dots and dashes "
            f"after {scheme}://, got {show(value)}"
        )
    bad = [p for p in parts if p in (".", "..") or not p.isprintable()]
    if bad or "//" in f"/{prefix}" or len(prefix.encode()) > 1024:
        raise ValueError(
            f'expected a prefix of names without ".", "..", "//" or control characters, '
            f"at most 1024 bytes, got {show(value)}"
        )
    return f"{scheme}://{bucket}" + "".join(f"/{p}" for p in parts)


def path_or_url(value: object) -> Path | str:
    """A local path (a :class:`Path`), or an object store URL (a ``str``, see object_url)."""
    text = string(value)
    if "://" in text:
        return object_url(text)
    return path(value)


def endpoint_url(value: object) -> str:
    """``http(s)://host[:port][/path]`` of an S3-compatible or GCS-emulating server. Credentials
    are refused: they belong in the environment or a profile, never in the config."""
    from urllib.parse import urlsplit

    text = string(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError when out of range
    except ValueError as exc:
        raise ValueError(f"expected an http(s) URL ({exc}), got {show(value)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(
            f'expected an http(s) URL such as "https://s3.example.com" or '
            f'"http://127.0.0.1:8333", got {show(value)}'
        )
    if parts.username is not None or parts.password is not None or parts.query:
        raise ValueError(
            "expected an endpoint URL without credentials or a query: credentials come from the "
            "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS), "
            "never from the config"
        )
    return text.rstrip("/")


def parents(path: Path | str) -> list[Path | str]:
    """The directories above a path, or the prefixes above an object store URL (up to its
    bucket), nearest first."""
    if isinstance(path, Path):
        return list(path.parents)
    scheme, _, rest = path.partition("://")
    names = rest.split("/")
    return [f"{scheme}://" + "/".join(names[:n]) for n in range(len(names) - 1, 0, -1)]


def relative_parts(inner: Path | str, outer: Path | str) -> tuple[str, ...]:
    if isinstance(inner, Path) and isinstance(outer, Path):
        return inner.relative_to(outer).parts
    return tuple(str(inner)[len(str(outer)) + 1 :].split("/"))


def check_object_watch(
    fail: Callable[[str, str], None], values: dict[str, Any], where: str
) -> None:
    """Settings of a watch on an object store that cannot work there."""
    if values.get("observer") == "inotify":
        fail(
            f"{where}.observer",
            "an object store has no inotify: its watches are polled every poll_interval; "
            'use "auto"',
        )
