"""The evaluate request: metrics of one checkpoint by its meta graph, Keras model or a user
function. Graphs, models and data sets come warm from ckptd.worker.caches."""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptd.worker.caches import array_named, keras_model, load_npz, restored_graph
from ckptd.worker.protocol import BAD_REQUEST, EvaluateResult, WorkerFailure, one_line
from ckptd.worker.requests import EvaluateRequest
from ckptd.worker.userfns import import_function

KERAS_FEED = {"x": "x", "y": "y"}  # model.evaluate argument -> array name


def _scalar(value: Any, name: str, spec: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise WorkerFailure(
            BAD_REQUEST,
            f"fetch {name!r} -> {spec} has shape {arr.shape}; a metric must be a scalar",
        )
    return float(arr.reshape(()))


def _rows(feeds: dict[Any, np.ndarray], data: str) -> int:
    sizes = {len(a) for a in feeds.values() if np.ndim(a) > 0}
    if len(sizes) > 1:
        raise WorkerFailure(BAD_REQUEST, f"arrays fed from {data} differ in length: {sizes}")
    return sizes.pop() if sizes else 1


def evaluate_meta_graph(req: EvaluateRequest) -> EvaluateResult:
    assert req.data is not None and req.feed is not None and req.fetch is not None
    data, fetch = req.data, req.fetch
    arrays = load_npz(data)
    entry, warm = restored_graph(req.checkpoint, req.run_dir(), req.use_ema, req.meta)
    feeds = {entry.tensor(t): array_named(arrays, a, data) for t, a in req.feed.items()}
    fetches = {name: entry.tensor(spec) for name, spec in fetch.items()}
    rows = _rows(feeds, data)
    batch_size = req.batch_size
    if batch_size is None or batch_size >= rows:
        values = entry.sess.run(fetches, feeds)
        metrics = {n: _scalar(v, n, fetch[n]) for n, v in values.items()}
    else:
        sums = dict.fromkeys(fetches, 0.0)
        for start in range(0, rows, batch_size):
            part = {t: a[start : start + batch_size] for t, a in feeds.items()}
            n = len(next(iter(part.values())))
            for name, value in entry.sess.run(fetches, part).items():
                sums[name] += _scalar(value, name, fetch[name]) * n
        metrics = {name: total / rows for name, total in sums.items()}
    result = EvaluateResult(metrics=metrics, warm=warm, rows=rows)
    if req.use_ema:
        result["ema_variables"] = entry.ema_variables
    return result


def evaluate_keras(req: EvaluateRequest) -> EvaluateResult:
    assert req.data is not None
    path, data = req.checkpoint, req.data
    feed = req.feed or KERAS_FEED
    unknown = set(feed) - {"x", "y", "sample_weight"}
    if unknown or "x" not in feed:
        raise WorkerFailure(
            BAD_REQUEST, f"evaluate: keras feed maps x, y, sample_weight to arrays, got {feed}"
        )
    arrays = load_npz(data)
    kwargs = {k: array_named(arrays, a, data) for k, a in feed.items()}
    model, warm = keras_model(path, req.run_dir(), req.model)
    if not getattr(model, "compiled", True) or getattr(model, "loss", None) is None:
        raise WorkerFailure(
            BAD_REQUEST, f"{path}: the model was saved without compile(); it has no loss/metrics"
        )
    values = model.evaluate(**kwargs, batch_size=req.batch_size, return_dict=True, verbose=0)
    metrics = {name: _scalar(v, name, "model.evaluate") for name, v in values.items()}
    return EvaluateResult(metrics=metrics, warm=warm, rows=_rows(kwargs, data))


def _number(value: Any) -> float | None:
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        return float(value)
    return None


def check_metrics(obj: Any, origin: str) -> dict[str, float]:
    """A user function's return value as {name: float}; anything else is a bad_request."""
    if not isinstance(obj, dict):
        raise WorkerFailure(
            BAD_REQUEST,
            f"{origin} returned {type(obj).__name__}, expected a dict of metric name -> number",
        )
    metrics: dict[str, float] = {}
    for name, value in obj.items():
        number = _number(value)
        if not isinstance(name, str) or number is None:
            raise WorkerFailure(
                BAD_REQUEST,
                f"{origin} returned {name!r}: {one_line(repr(value))[:100]} "
                f"({type(value).__name__}); metrics must map names to numbers",
            )
        metrics[name] = number
    return metrics


def evaluate_python(req: EvaluateRequest) -> EvaluateResult:
    assert req.function is not None
    fn, warm = import_function(req.function, "python evaluator")
    obj = fn(checkpoint=req.checkpoint, step=req.step, run=req.run_dir())
    return EvaluateResult(metrics=check_metrics(obj, f"python evaluator {req.function}"), warm=warm)


def evaluate(req: EvaluateRequest) -> EvaluateResult:
    if req.evaluator == "meta_graph":
        return evaluate_meta_graph(req)
    if req.evaluator == "keras":
        return evaluate_keras(req)
    return evaluate_python(req)
