"""One request in, its result out: the typed request is routed to its job's module, and every
failure becomes a WorkerFailure with a one-line message (TensorFlow's cause, not its trace)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from ckptd.worker import caches
from ckptd.worker.evaluate import evaluate
from ckptd.worker.export import export
from ckptd.worker.logs import log_traceback
from ckptd.worker.protocol import NOT_FOUND, TF_ERROR, PingResult, WorkerFailure, one_line
from ckptd.worker.requests import (
    CheckpointRequest,
    EvaluateRequest,
    ExportRequest,
    PingRequest,
    Request,
    VerifyRequest,
    parse_request,
)
from ckptd.worker.verify import verify


def ping() -> PingResult:
    return PingResult(
        pid=os.getpid(),
        tf_version=tf.__version__,
        python=sys.version.split()[0],
        cached=caches.sizes(),
    )


def run(request: Request) -> dict[str, Any]:
    """The result of one typed request (a *Result dict of ckptd.worker.protocol)."""
    if isinstance(request, EvaluateRequest):
        return dict(evaluate(request))
    if isinstance(request, ExportRequest):
        return dict(export(request))
    if isinstance(request, VerifyRequest):
        return dict(verify(request))
    if isinstance(request, PingRequest):
        return dict(ping())
    raise TypeError(f"no handler for {type(request).__name__}")


def _tf_message(exc: Any) -> str:
    """The cause, not the traceback: TF puts "Detected at node … (most recent call last)" first,
    then ``Node: '…'`` and the real reason (e.g. "No space left on device"), then a hint."""
    msg = str(exc.message).split("\n\nOriginal stack trace")[0]
    if "\nNode: '" in msg:
        msg = msg.split("\nNode: '", 1)[1].split("\n", 1)[-1]
    msg = "\n".join(
        line for line in msg.splitlines() if not line.strip().startswith(("[[{{node", "Hint:"))
    )
    return one_line(msg)[:600]


def _where(request: Request) -> str:
    if isinstance(request, CheckpointRequest):
        return f"{request.op} {request.checkpoint}"
    return request.op


def handle(wire: dict[str, Any]) -> dict[str, Any]:
    """Run one decoded request; returns its result (with `seconds`) or raises WorkerFailure."""
    request = parse_request(wire)
    start = time.perf_counter()
    try:
        result = run(request)
    except WorkerFailure:
        raise
    except tf.errors.NotFoundError as exc:
        raise WorkerFailure(NOT_FOUND, f"{_where(request)}: {_tf_message(exc)}") from exc
    except tf.errors.OpError as exc:
        name = type(exc).__name__
        raise WorkerFailure(TF_ERROR, f"{_where(request)}: {name}: {_tf_message(exc)}") from exc
    except FileNotFoundError as exc:
        raise WorkerFailure(NOT_FOUND, f"{_where(request)}: {exc}") from exc
    except Exception as exc:
        log_traceback()
        name = type(exc).__name__
        raise WorkerFailure(TF_ERROR, f"{_where(request)}: {name}: {one_line(str(exc))}") from exc
    result["seconds"] = time.perf_counter() - start
    return result
