"""The worker's line protocol, shared by the worker and its client: one JSON object per line.

Imported by both sides (the daemon's client and the worker), so it must never import TensorFlow.

Request:  ``{"id": ..., "op": "ping" | "evaluate" | "export" | "verify", ...fields}``: one of the
          request classes of ``requests.py``, as ``Request.to_wire()`` writes it and
          ``parse_request`` reads it.
Response: ``{"id": <same id>, "ok": true, "result": {...}}`` (one of the ``*Result`` dicts) or
          ``{"id": <same id>, "ok": false, "kind": <one of KINDS>, "error": "<one line>"}``.

NaN/Infinity are written as the bare tokens Python's json module reads back (a diverged run's
loss is NaN, and NaN must survive the trip to rank worst); the reader is always Python.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    from ckptd.worker.requests import Request

NOT_FOUND = "not_found"  # a checkpoint, meta graph, data file or export is missing
BAD_REQUEST = "bad_request"  # the request (or a user function's return value) is malformed
TF_ERROR = "tf_error"  # the operation itself failed (TensorFlow, Keras, a user function)
TIMEOUT = "timeout"  # set by the client: the worker missed its deadline and was killed
CRASHED = "crashed"  # set by the client: the worker died or wrote garbage
STOPPING = "stopping"  # set by the client: the daemon is stopping, no request is run
KINDS = frozenset({NOT_FOUND, BAD_REQUEST, TF_ERROR, TIMEOUT, CRASHED, STOPPING})
# Failures found before any TensorFlow state changed: the worker stays warm after them.
HARMLESS = frozenset({NOT_FOUND, BAD_REQUEST})

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


# ------------------------------------------------------------------ results
# `seconds` is set by the worker's dispatcher: the time spent inside the worker on the request.


class PingResult(TypedDict):
    pid: int
    tf_version: str
    python: str
    cached: dict[str, int]  # warm cache entries: graphs, keras, data
    seconds: NotRequired[float]


class EvaluateResult(TypedDict):
    metrics: dict[str, float]
    warm: bool  # the run's graph/model/function was already loaded
    rows: NotRequired[int]  # held-out rows evaluated (meta_graph, keras)
    ema_variables: NotRequired[int]  # variables restored from shadow values (use_ema)
    seconds: NotRequired[float]


class ExportResult(TypedDict):
    files: list[str]  # written, relative to out_dir
    format: str
    out_dir: str
    seconds: NotRequired[float]


class VerifyResult(TypedDict):
    verified: bool
    max_abs_diff: float
    tolerance: float
    samples: int  # rows fed
    formats: list[str]
    details: dict[str, Any]  # "inputs" and each format's comparison
    seconds: NotRequired[float]


# ------------------------------------------------------------------ lines


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


def request_line(request_id: int, request: Request | dict[str, Any]) -> bytes:
    """The client's line for one request, newline included."""
    wire = request if isinstance(request, dict) else request.to_wire()
    return (encode({**wire, "id": request_id}) + "\n").encode()


def read_response(line: bytes, request_id: int) -> dict[str, Any]:
    """The result of the client's request `request_id`, or its WorkerFailure. A line that is
    not a response to that request means the worker is broken: kind crashed."""
    try:
        reply = decode(line)
    except WorkerFailure:
        msg = f"worker wrote garbage on its protocol channel: {line[:200]!r}"
        raise WorkerFailure(CRASHED, msg) from None
    if reply.get("id") != request_id:
        msg = f"worker answered request {reply.get('id')} instead of {request_id}"
        raise WorkerFailure(CRASHED, msg)
    if not reply.get("ok"):
        kind = reply.get("kind")
        error = str(reply.get("error") or "unknown worker error")
        raise WorkerFailure(kind if kind in KINDS else TF_ERROR, error)
    result = reply.get("result")
    return dict(result) if isinstance(result, dict) else {}


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
