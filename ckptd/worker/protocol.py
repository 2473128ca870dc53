"""The worker's line protocol: one JSON object per line, request in, response out.

Imported by both sides (the daemon's client and the worker), so it must never import TensorFlow.

Request:  ``{"id": ..., "op": "ping" | "evaluate" | "export" | "verify" | "inspect", ...}``
Response: ``{"id": <same id>, "ok": true, "result": {...}}`` or
          ``{"id": <same id>, "ok": false, "kind": <one of KINDS>, "error": "<one line>"}``

NaN/Infinity are written as the bare tokens Python's json module reads back (a diverged run's
loss is NaN, and NaN must survive the trip to rank worst); the reader is always Python.
"""

from __future__ import annotations

import json
from typing import Any

NOT_FOUND = "not_found"  # a checkpoint, meta graph, data file or export is missing
BAD_REQUEST = "bad_request"  # the request (or a user function's return value) is malformed
TF_ERROR = "tf_error"  # the operation itself failed (TensorFlow, Keras, a user function)
TIMEOUT = "timeout"  # set by the client: the worker missed its deadline and was killed
CRASHED = "crashed"  # set by the client: the worker died or wrote garbage
KINDS = frozenset({NOT_FOUND, BAD_REQUEST, TF_ERROR, TIMEOUT, CRASHED})

_MAX_ERROR = 2000  # characters; TF error texts can carry whole graph dumps


class WorkerFailure(Exception):
    """A request failed in a known way; `kind` is one of KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown worker failure kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message


def one_line(text: str) -> str:
    """Collapse whitespace (TF messages span many lines) and cap the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _MAX_ERROR else flat[: _MAX_ERROR - 3] + "..."


def encode(obj: dict[str, Any]) -> str:
    """One protocol line (without the newline): compact JSON that never contains a newline."""
    return json.dumps(obj, separators=(",", ":"), default=_default)


def decode(line: str | bytes) -> dict[str, Any]:
    """Parse one protocol line; anything but a JSON object is a bad_request."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkerFailure(BAD_REQUEST, f"not a JSON line: {one_line(str(exc))}") from exc
    if not isinstance(obj, dict):
        raise WorkerFailure(BAD_REQUEST, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def ok(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def failure(request_id: Any, kind: str, error: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "kind": kind, "error": one_line(error)}


def _default(obj: Any) -> Any:
    """numpy scalars/arrays and paths, without importing numpy."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
