"""The worker's TensorFlow operations: evaluate, export (freeze), verify, inspect.

`handle(request) -> result` dispatches on ``request["op"]``; failures are raised as
`WorkerFailure(kind, one-line message)`. Graph-mode work uses tf.compat.v1 with a private
`tf.Graph` + `Session` per cache entry, so eager mode stays on for Keras and `tf.saved_model.load`.

Warm cache (module level, lives as long as the worker process):

- meta graphs: key (run dir, use_ema) -> imported graph, session and restoring Saver. The next
  checkpoint of the same run only runs ``saver.restore`` (milliseconds) instead of
  ``import_meta_graph`` (seconds). If that checkpoint's own ``.meta`` differs from the one the
  graph was built from, or restoring into the cached graph fails (the trainer changed the
  model), the graph is rebuilt once from this checkpoint's ``.meta``.
- Keras models: key run dir -> model; the next ``.keras`` of the run is loaded with
  ``load_weights`` when the architecture matches, else the model is reloaded.
- data sets: key (npz path, mtime, size) -> arrays.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from ckptd.worker.protocol import BAD_REQUEST, NOT_FOUND, TF_ERROR, WorkerFailure, one_line

v1 = tf.compat.v1

EMA_NAME = "ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage(name=...) default
MAX_GRAPHS = 4  # cached meta graphs (each holds a session with all variables)
MAX_KERAS = 2
MAX_DATASETS = 4
VERIFY_ROWS = 32  # rows of the data set fed when verifying an export
RANDOM_ROWS = 4  # rows of the generated batch when verifying without data
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
FROZEN_FILE = "frozen.pb"


def _log(msg: str) -> None:
    print(f"[ckptd.worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ request fields


def _field(
    req: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any = ...
) -> Any:
    value = req.get(key)
    if value is None:
        if default is ...:
            raise WorkerFailure(BAD_REQUEST, f"{req.get('op')}: missing field {key!r}")
        return default
    if not isinstance(value, types):
        raise WorkerFailure(
            BAD_REQUEST, f"{req.get('op')}: field {key!r} has type {type(value).__name__}"
        )
    return value


def _path(req: dict[str, Any], key: str, default: Any = ...) -> Any:
    value = _field(req, key, str, default)
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) else value


def _names(req: dict[str, Any], key: str, default: Any = ...) -> Any:
    """A {str: str} mapping field (feed, fetch, inputs, outputs); {} counts as absent."""
    value = _field(req, key, dict, default)
    if value == {} and req.get(key) is not None:
        value = _field({"op": req.get("op")}, key, dict, default)  # missing unless optional
    if isinstance(value, dict) and (bad := [k for k, v in value.items() if not isinstance(v, str)]):
        raise WorkerFailure(
            BAD_REQUEST, f"{req.get('op')}: field {key!r} must map names to strings: {bad}"
        )
    return value


def _choice(req: dict[str, Any], key: str, choices: tuple[str, ...], default: Any = ...) -> str:
    value = _field(req, key, str, default)
    if value not in choices:
        raise WorkerFailure(
            BAD_REQUEST, f"{req.get('op')}: {key} {value!r} is not one of {', '.join(choices)}"
        )
    return value


def _bool(req: dict[str, Any], key: str) -> bool:
    return bool(_field(req, key, bool, False))


def _run_dir(req: dict[str, Any], checkpoint: str) -> str:
    return os.path.realpath(_path(req, "run", os.path.dirname(checkpoint)))


# ------------------------------------------------------------------ files


def require_checkpoint(prefix: str) -> None:
    """A TF checkpoint (prefix.index + every data shard) or a single-file checkpoint exists."""
    if os.path.isfile(prefix + ".index"):
        shards = [
            p
            for p in os.listdir(os.path.dirname(prefix) or ".")
            if p.startswith(os.path.basename(prefix) + ".data-")
        ]
        counts = {int(m.group(1)) for s in shards if (m := re.search(r"-of-(\d+)$", s))}
        if not counts:
            raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} has an index but no data files")
        total = max(counts)
        missing = [
            f"{prefix}.data-{i:05d}-of-{total:05d}"
            for i in range(total)
            if not os.path.isfile(f"{prefix}.data-{i:05d}-of-{total:05d}")
        ]
        if missing:
            raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} is missing {missing[0]}")
        return
    if os.path.isfile(prefix):
        return
    raise WorkerFailure(NOT_FOUND, f"checkpoint {prefix} not found (no {prefix}.index)")


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


_DATA: OrderedDict[tuple[str, int, int], dict[str, np.ndarray]] = OrderedDict()


def load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, cached per (path, mtime, size)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WorkerFailure(NOT_FOUND, f"data file {path} not found") from None
    key = (path, st.st_mtime_ns, st.st_size)
    if key in _DATA:
        _DATA.move_to_end(key)
        return _DATA[key]
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError) as exc:
        raise WorkerFailure(BAD_REQUEST, f"data file {path} is not a readable .npz: {exc}") from exc
    for stale in [k for k in _DATA if k[0] == path]:
        del _DATA[stale]
    _DATA[key] = arrays
    while len(_DATA) > MAX_DATASETS:
        _DATA.popitem(last=False)
    return arrays


def _array(arrays: dict[str, np.ndarray], name: str, data: str) -> np.ndarray:
    if name not in arrays:
        raise WorkerFailure(
            BAD_REQUEST, f"data file {data} has no array {name!r} (it has {sorted(arrays)})"
        )
    return arrays[name]


def _rows(feeds: dict[Any, np.ndarray], data: str) -> int:
    sizes = {len(a) for a in feeds.values() if np.ndim(a) > 0}
    if len(sizes) > 1:
        raise WorkerFailure(BAD_REQUEST, f"arrays fed from {data} differ in length: {sizes}")
    return sizes.pop() if sizes else 1


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str, files: list[str]) -> None:
    """fsync the files written and every directory under (and including) root, then its parent."""
    for rel in files:
        _fsync_path(os.path.join(root, rel))
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_path(dirpath)
    _fsync_path(os.path.dirname(root))


def _write_file(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _import_function(spec: str, what: str) -> tuple[Callable[..., Any], bool]:
    """'pkg.mod:fn' -> (fn, module was already imported)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise WorkerFailure(
            BAD_REQUEST, f"{what} {spec!r} is not of the form 'package.module:function'"
        )
    warm = module_name in sys.modules
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerFailure(
            BAD_REQUEST, f"{what} {spec!r}: cannot import {module_name}: {exc}"
        ) from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise WorkerFailure(BAD_REQUEST, f"{what} {spec!r}: {module_name} has no {attr}") from None
    if not callable(obj):
        raise WorkerFailure(BAD_REQUEST, f"{what} {spec!r} is not callable")
    return obj, warm


# ------------------------------------------------------------------ meta graphs (TF1)


@dataclass
class GraphEntry:
    """One imported meta graph with its session; variables hold the last restored checkpoint."""

    graph: tf.Graph
    sess: Any  # tf.compat.v1.Session
    saver: Any  # tf.compat.v1.train.Saver or None (graph without variables)
    meta_path: str
    meta_digest: str
    use_ema: bool
    ema_variables: int = 0
    init_after_restore: Any = None  # initializer of variables an EMA restore cannot fill
    restored: str | None = None
    resolved: dict[str, tf.Tensor] = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.sess.close()
        except Exception:
            pass

    def restore(self, prefix: str) -> None:
        with self.graph.as_default():  # Saver.restore takes its eager path otherwise
            if self.saver is not None:
                self.saver.restore(self.sess, prefix)
            if self.init_after_restore is not None:
                self.sess.run(self.init_after_restore)
        self.restored = prefix

    def tensor(self, spec: str) -> tf.Tensor:
        """A tensor by name ('accuracy:0'), op name ('accuracy') or 'collection:NAME[i]'."""
        if spec not in self.resolved:
            self.resolved[spec] = resolve_tensor(self.graph, spec, self.meta_path)
        return self.resolved[spec]


def resolve_tensor(graph: tf.Graph, spec: str, origin: str) -> tf.Tensor:
    try:
        if spec.startswith("collection:"):
            m = re.fullmatch(r"collection:(.+?)(?:\[(\d+)\])?", spec)
            assert m is not None
            items = graph.get_collection(m.group(1))
            index = int(m.group(2) or 0)
            if index >= len(items):
                raise KeyError(f"collection {m.group(1)!r} has {len(items)} item(s)")
            item = items[index]
            return item.outputs[0] if isinstance(item, tf.Operation) else item
        if ":" in spec:
            return graph.get_tensor_by_name(spec)
        return graph.get_operation_by_name(spec).outputs[0]
    except (KeyError, ValueError, IndexError) as exc:
        msg = f"tensor {spec!r} not found in the meta graph {origin}: {exc}"
        raise WorkerFailure(BAD_REQUEST, msg) from None


def _ema_var_list(prefix: str, variables: list[Any]) -> tuple[dict[str, Any], list[Any], int]:
    """Checkpoint key -> variable, restoring shadow values like EMA.variables_to_restore().

    A variable whose `<name>/ExponentialMovingAverage` is in the checkpoint is restored from it;
    others restore from their own key. The shadow variables themselves cannot also be restored
    from their key (it is taken), so they are returned to be re-initialized after the restore
    (variables_to_restore() leaves them out the same way).
    """
    in_ckpt = set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    var_list: dict[str, Any] = {}
    shadowed = 0
    for v in variables:
        name = v.op.name
        shadow = f"{name}/{EMA_NAME}"
        if shadow in in_ckpt:
            var_list[shadow] = v
            shadowed += 1
    leftover = []
    for v in variables:
        name = v.op.name
        if f"{name}/{EMA_NAME}" in var_list and var_list[f"{name}/{EMA_NAME}"] is v:
            continue
        if name in var_list:
            leftover.append(v)
        else:
            var_list[name] = v
    if not shadowed:
        raise WorkerFailure(
            BAD_REQUEST, f"use_ema: checkpoint {prefix} has no '/{EMA_NAME}' shadow variables"
        )
    return var_list, leftover, shadowed


def build_graph(prefix: str, meta_path: str, use_ema: bool) -> GraphEntry:
    """import_meta_graph into a private graph, with a Saver restoring raw or EMA values."""
    if not os.path.isfile(meta_path):
        raise WorkerFailure(NOT_FOUND, f"meta graph {meta_path} not found")
    graph = tf.Graph()
    with graph.as_default():
        saver = v1.train.import_meta_graph(meta_path, clear_devices=True)
        variables = v1.global_variables()
        init_after, shadowed = None, 0
        if use_ema:
            var_list, leftover, shadowed = _ema_var_list(prefix, variables)
            saver = v1.train.Saver(var_list=var_list)
            if leftover:
                init_after = v1.variables_initializer(leftover)
        elif saver is None and variables:
            saver = v1.train.Saver(var_list=variables)
    sess = v1.Session(graph=graph)
    return GraphEntry(
        graph, sess, saver, meta_path, _digest(meta_path), use_ema, shadowed, init_after
    )


_GRAPHS: OrderedDict[tuple[str, bool], GraphEntry] = OrderedDict()
_MISMATCH = (
    tf.errors.NotFoundError,
    tf.errors.InvalidArgumentError,
    tf.errors.FailedPreconditionError,
)


def restored_graph(
    prefix: str, run: str, use_ema: bool, meta: str | None = None
) -> tuple[GraphEntry, bool]:
    """The run's graph with `prefix` restored into it -> (entry, warm)."""
    require_checkpoint(prefix)
    meta_path = meta or prefix + ".meta"
    key = (run, use_ema)
    entry = _GRAPHS.get(key)
    if entry is not None:
        if os.path.isfile(meta_path) and _digest(meta_path) != entry.meta_digest:
            _log(f"{meta_path} differs from {entry.meta_path}; rebuilding the graph of {run}")
        else:
            try:
                entry.restore(prefix)
                _GRAPHS.move_to_end(key)
                return entry, True
            except _MISMATCH as exc:
                _log(
                    f"restoring {prefix} into the cached graph of {run} failed "
                    f"({type(exc).__name__}); rebuilding from {meta_path}"
                )
        _GRAPHS.pop(key).close()
    entry = build_graph(prefix, meta_path, use_ema)
    try:
        entry.restore(prefix)
    except BaseException:
        entry.close()
        raise
    _GRAPHS[key] = entry
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)[1].close()
    return entry, False


def _scalar(value: Any, name: str, spec: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise WorkerFailure(
            BAD_REQUEST,
            f"fetch {name!r} -> {spec} has shape {arr.shape}; a metric must be a scalar",
        )
    return float(arr.reshape(()))


def evaluate_meta_graph(req: dict[str, Any]) -> dict[str, Any]:
    prefix = _path(req, "checkpoint")
    run = _run_dir(req, prefix)
    data = _path(req, "data")
    feed = _names(req, "feed")
    fetch = _names(req, "fetch")
    use_ema = _bool(req, "use_ema")
    batch_size = _field(req, "batch_size", int, None)
    if batch_size is not None and batch_size < 1:
        raise WorkerFailure(BAD_REQUEST, f"evaluate: batch_size must be >= 1, got {batch_size}")
    arrays = load_npz(data)
    entry, warm = restored_graph(prefix, run, use_ema, _path(req, "meta", None))
    feeds = {entry.tensor(t): _array(arrays, a, data) for t, a in feed.items()}
    fetches = {name: entry.tensor(spec) for name, spec in fetch.items()}
    rows = _rows(feeds, data)
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
    result: dict[str, Any] = {"metrics": metrics, "warm": warm, "rows": rows}
    if use_ema:
        result["ema_variables"] = entry.ema_variables
    return result


# ------------------------------------------------------------------ Keras


@dataclass
class KerasEntry:
    model: Any
    path: str


_KERAS: OrderedDict[str, KerasEntry] = OrderedDict()


def keras_model(path: str, run: str, architecture: str | None = None) -> tuple[Any, bool]:
    """The run's cached Keras model with `path`'s weights -> (model, warm)."""
    import keras

    require_checkpoint(path)
    entry = _KERAS.get(run)
    if entry is not None:
        try:
            entry.model.load_weights(path)
            entry.path = path
            _KERAS.move_to_end(run)
            return entry.model, True
        except Exception as exc:  # another architecture: reload below
            _log(f"load_weights({path}) into the cached model of {run} failed: {exc}; reloading")
            del _KERAS[run]
    source = path
    if not path.endswith(".keras"):
        if not architecture:
            raise WorkerFailure(
                BAD_REQUEST,
                f"{path} holds weights only; pass 'model' (a .keras file with the architecture)",
            )
        require_checkpoint(architecture)
        source = architecture
    model = keras.saving.load_model(source)
    if source != path:
        model.load_weights(path)
    _KERAS[run] = KerasEntry(model, path)
    while len(_KERAS) > MAX_KERAS:
        _KERAS.popitem(last=False)
    return model, False


def evaluate_keras(req: dict[str, Any]) -> dict[str, Any]:
    path = _path(req, "checkpoint")
    run = _run_dir(req, path)
    data = _path(req, "data")
    feed = _names(req, "feed", {"x": "x", "y": "y"})
    unknown = set(feed) - {"x", "y", "sample_weight"}
    if unknown or "x" not in feed:
        raise WorkerFailure(
            BAD_REQUEST, f"evaluate: keras feed maps x, y, sample_weight to arrays, got {feed}"
        )
    batch_size = _field(req, "batch_size", int, None)
    arrays = load_npz(data)
    kwargs = {k: _array(arrays, a, data) for k, a in feed.items()}
    model, warm = keras_model(path, run, _path(req, "model", None))
    if not getattr(model, "compiled", True) or getattr(model, "loss", None) is None:
        raise WorkerFailure(
            BAD_REQUEST, f"{path}: the model was saved without compile(); it has no loss/metrics"
        )
    values = model.evaluate(**kwargs, batch_size=batch_size, return_dict=True, verbose=0)
    metrics = {name: _scalar(v, name, "model.evaluate") for name, v in values.items()}
    return {"metrics": metrics, "warm": warm, "rows": _rows(kwargs, data)}


# ------------------------------------------------------------------ python evaluator


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


def evaluate_python(req: dict[str, Any]) -> dict[str, Any]:
    spec = _field(req, "function", str)
    prefix = _path(req, "checkpoint")
    run = _run_dir(req, prefix)
    step = _field(req, "step", int, None)
    fn, warm = _import_function(spec, "python evaluator")
    obj = fn(checkpoint=prefix, step=step, run=run)
    return {"metrics": check_metrics(obj, f"python evaluator {spec}"), "warm": warm}


EVALUATORS = {"meta_graph": evaluate_meta_graph, "keras": evaluate_keras, "python": evaluate_python}


def op_evaluate(req: dict[str, Any]) -> dict[str, Any]:
    evaluator = _choice(req, "evaluator", tuple(EVALUATORS))
    return EVALUATORS[evaluator](req)


# ------------------------------------------------------------------ export


def _staging(out_dir: str) -> str:
    """A fresh, not-yet-existing path inside out_dir (SavedModel writers want a new dir)."""
    path = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    os.rmdir(path)
    return path


def _relfiles(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


def _publish(staging: str, out_dir: str) -> list[str]:
    """Move a finished SavedModel from staging into out_dir (which may already hold frozen.pb)."""
    files = _relfiles(staging)
    clash = [e for e in os.listdir(staging) if os.path.lexists(os.path.join(out_dir, e))]
    if clash:
        shutil.rmtree(staging, ignore_errors=True)
        raise WorkerFailure(
            BAD_REQUEST, f"export dir {out_dir} already holds {', '.join(sorted(clash))}"
        )
    for name in os.listdir(staging):
        os.rename(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    return files


def _tf1_signature(entry: GraphEntry, inputs: dict[str, str], outputs: dict[str, str]) -> Any:
    return v1.saved_model.signature_def_utils.predict_signature_def(
        inputs={k: entry.tensor(t) for k, t in inputs.items()},
        outputs={k: entry.tensor(t) for k, t in outputs.items()},
    )


def export_saved_model_tf1(
    prefix: str, staging: str, inputs: dict[str, str], outputs: dict[str, str], use_ema: bool
) -> None:
    # A fresh graph, not the cached one: the Builder adds its own Saver ops to the graph.
    entry = build_graph(prefix, prefix + ".meta", use_ema)
    try:
        entry.restore(prefix)
        with entry.graph.as_default():
            signature = _tf1_signature(entry, inputs, outputs)
            builder = v1.saved_model.Builder(staging)
            builder.add_meta_graph_and_variables(
                entry.sess,
                [v1.saved_model.tag_constants.SERVING],
                signature_def_map={
                    v1.saved_model.signature_constants.DEFAULT_SERVING_SIGNATURE_DEF_KEY: signature
                },
                strip_default_attrs=True,
            )
            builder.save()
    finally:
        entry.close()


def export_frozen(
    prefix: str, run: str, out_dir: str, outputs: dict[str, str], use_ema: bool
) -> list[str]:
    entry, _ = restored_graph(prefix, run, use_ema)  # read-only use: the cached graph is fine
    nodes = sorted({entry.tensor(t).op.name for t in outputs.values()})
    with entry.graph.as_default():
        frozen = v1.graph_util.convert_variables_to_constants(
            entry.sess, entry.graph.as_graph_def(), nodes
        )
    _write_file(os.path.join(out_dir, FROZEN_FILE), frozen.SerializeToString())
    return [FROZEN_FILE]


def op_export(req: dict[str, Any]) -> dict[str, Any]:
    fmt = _choice(req, "format", ("saved_model", "frozen_graph"))
    kind = _choice(req, "kind", ("tf1", "tf2", "keras"), "tf1")
    prefix = _path(req, "checkpoint")
    out_dir = _path(req, "out_dir")
    use_ema = _bool(req, "use_ema")
    if use_ema and kind != "tf1":
        raise WorkerFailure(BAD_REQUEST, "export: use_ema applies to tf1 meta graphs only")
    require_checkpoint(prefix)
    if kind == "tf1" and not os.path.isfile(prefix + ".meta"):
        raise WorkerFailure(NOT_FOUND, f"meta graph {prefix}.meta not found")
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "frozen_graph":
        if kind != "tf1":
            raise WorkerFailure(
                BAD_REQUEST, f"export: frozen_graph needs a tf1 meta graph, not kind {kind!r}"
            )
        outputs = _names(req, "outputs")
        files = export_frozen(prefix, _run_dir(req, prefix), out_dir, outputs, use_ema)
    else:
        staging = _staging(out_dir)
        try:
            if kind == "tf1":
                inputs, outputs = _names(req, "inputs"), _names(req, "outputs")
                export_saved_model_tf1(prefix, staging, inputs, outputs, use_ema)
            elif kind == "tf2":
                spec = _field(req, "builder", str)
                build, _ = _import_function(spec, "export builder")
                module = build(prefix)
                if not isinstance(module, tf.Module):
                    raise WorkerFailure(
                        BAD_REQUEST,
                        f"export builder {spec} returned {type(module).__name__}, not a tf.Module",
                    )
                tf.saved_model.save(module, staging)
            else:
                import keras

                keras.saving.load_model(prefix, compile=False).export(staging)
            files = _publish(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    fsync_tree(out_dir, files)
    return {"files": files, "format": fmt, "out_dir": out_dir}


# ------------------------------------------------------------------ verify


def _random_batch(dtype: tf.DType, shape: Any, rng: np.random.Generator) -> np.ndarray:
    dims = [RANDOM_ROWS] if shape.rank is None else [d or RANDOM_ROWS for d in shape.as_list()]
    np_dtype = dtype.as_numpy_dtype
    if dtype.is_floating:
        return rng.standard_normal(dims).astype(np_dtype)
    if dtype.is_integer:
        return rng.integers(0, 10, size=dims).astype(np_dtype)
    if dtype.is_bool:
        return rng.random(dims) < 0.5
    raise WorkerFailure(BAD_REQUEST, f"verify: cannot generate inputs of dtype {dtype.name}")


def sample_inputs(
    req: dict[str, Any], specs: dict[str, tuple[tf.DType, Any]], names: dict[str, str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Input key -> array: literal feed values, else the first rows of the npz, else random."""
    data = _path(req, "data", None)
    feed = _field(req, "feed", dict, {})
    arrays = load_npz(data) if data else {}
    rng = np.random.default_rng(0)
    samples, info = {}, {}
    for key, (dtype, shape) in specs.items():
        aliases = [key] + [a for a in (names.get(key),) if a]  # input key, tensor name / "x"
        source = next((feed[a] for a in aliases if feed.get(a) is not None), None)
        if source is None and data:
            source = next((a for a in aliases if a in arrays), None)
        if isinstance(source, list | int | float):
            value, origin = np.asarray(source, dtype=dtype.as_numpy_dtype), "feed"
        elif isinstance(source, str):
            name = source
            if not data:
                raise WorkerFailure(BAD_REQUEST, f"verify: feed names array {name!r} but no data")
            value, origin = _array(arrays, name, data)[:VERIFY_ROWS], f"{data}:{name}"
        elif data:
            raise WorkerFailure(
                BAD_REQUEST, f"verify: no array for input {key!r} in {data}; map it in 'feed'"
            )
        else:
            value, origin = _random_batch(dtype, shape, rng), "random"
        samples[key] = value
        info[key] = {"shape": list(value.shape), "dtype": str(value.dtype), "source": origin}
    return samples, info


def _as_numpy(value: Any) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _tf2_function(module: Any, spec: str) -> Any:
    """The module's one tf.function with an input signature (what tf.saved_model.save exports)."""
    found = []
    for name in dir(module):
        if name.startswith("_") and name != "__call__":
            continue
        try:
            attr = getattr(module, name)
        except Exception:
            continue
        if getattr(attr, "input_signature", None) is not None and hasattr(
            attr, "get_concrete_function"
        ):
            found.append(attr)
    if len(found) != 1:
        raise WorkerFailure(
            BAD_REQUEST,
            f"export builder {spec}: expected one tf.function with an input_signature, "
            f"found {len(found)}",
        )
    return found[0]


def _call_signature(fn: Any, specs: list[Any], samples: dict[str, np.ndarray]) -> dict[str, Any]:
    """Call a tf.function / signature by input names, or positionally when there is one input."""
    names = [s.name for s in specs]
    if set(samples) <= set(names) and len(samples) == len(names):
        out = fn(**{s.name: tf.constant(samples[s.name], dtype=s.dtype) for s in specs})
    elif len(specs) == 1 and len(samples) == 1:
        (value,) = samples.values()
        try:
            out = fn(**{specs[0].name: tf.constant(value, dtype=specs[0].dtype)})
        except TypeError:
            out = fn(tf.constant(value, dtype=specs[0].dtype))
    else:
        raise WorkerFailure(
            BAD_REQUEST, f"verify: inputs {sorted(samples)} do not match the signature's {names}"
        )
    if isinstance(out, dict):
        return {k: _as_numpy(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return {f"output_{i}": _as_numpy(v) for i, v in enumerate(out)}
    return {"output_0": _as_numpy(out)}


def _signature_specs(fn: Any) -> list[Any]:
    args, kwargs = fn.structured_input_signature
    specs = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return [s for s in specs if isinstance(s, tf.TensorSpec)]


def _pair(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], wanted: list[str], where: str
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    common = [k for k in wanted if k in ref and k in got]
    if len(common) == len(wanted):
        return [(k, ref[k], got[k]) for k in wanted]
    if len(ref) == 1 and len(got) == 1:
        ((k, a),), ((_, b),) = ref.items(), got.items()
        return [(k, a, b)]
    raise WorkerFailure(
        BAD_REQUEST, f"verify: outputs {wanted} not found in {where} (it has {sorted(got)})"
    )


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; NaN where both are NaN counts as equal; a shape mismatch is inf."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    diff[np.isnan(a) & np.isnan(b)] = 0.0
    diff[np.isnan(diff)] = np.inf
    return float(diff.max())


def saved_model_outputs(export_dir: str, samples: dict[str, np.ndarray]) -> tuple[dict, str]:
    loaded = tf.saved_model.load(export_dir)
    signatures = dict(loaded.signatures)
    for key in ("serving_default", "predict", "serve"):
        if key in signatures:
            break
    else:
        if len(signatures) != 1:
            raise WorkerFailure(
                BAD_REQUEST, f"SavedModel {export_dir} has signatures {sorted(signatures)}"
            )
        (key,) = signatures
    fn = signatures[key]
    return _call_signature(fn, _signature_specs(fn), samples), key


def frozen_outputs(
    path: str, inputs: dict[str, str], outputs: dict[str, str], samples: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    graph_def = v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    feeds = {resolve_tensor(graph, inputs[k], path): v for k, v in samples.items()}
    fetches = {k: resolve_tensor(graph, t, path) for k, t in outputs.items()}
    with v1.Session(graph=graph) as sess:
        return sess.run(fetches, feeds)


def op_verify(req: dict[str, Any]) -> dict[str, Any]:
    export_dir = _path(req, "export_dir")
    if not os.path.isdir(export_dir):
        raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} not found")
    has_sm = any(os.path.isfile(os.path.join(export_dir, f)) for f in SAVED_MODEL_FILES)
    has_frozen = os.path.isfile(os.path.join(export_dir, FROZEN_FILE))
    detected = (["saved_model"] if has_sm else []) + (["frozen_graph"] if has_frozen else [])
    formats = _field(req, "formats", list, detected)
    for fmt in formats:
        if fmt not in ("saved_model", "frozen_graph"):
            raise WorkerFailure(BAD_REQUEST, f"verify: unknown format {fmt!r}")
        if not (has_sm if fmt == "saved_model" else has_frozen):
            what = "saved_model.pb" if fmt == "saved_model" else FROZEN_FILE
            raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} has no {what}")
    if not formats:
        raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} holds no SavedModel or frozen.pb")
    prefix = _path(req, "checkpoint")
    tolerance = float(_field(req, "tolerance", (int, float), 1e-5))
    use_ema = _bool(req, "use_ema")
    kind = req.get("kind") or (
        "keras" if prefix.endswith((".keras", ".h5")) else "tf2" if req.get("builder") else "tf1"
    )
    inputs = _names(req, "inputs", {})
    outputs = _names(req, "outputs", {})

    # The checkpoint's own outputs.
    if kind == "tf1":
        if not inputs or not outputs:
            raise WorkerFailure(BAD_REQUEST, "verify: tf1 needs 'inputs' and 'outputs' tensors")
        entry, _ = restored_graph(prefix, _run_dir(req, prefix), use_ema)
        # Collections do not survive freezing: pin every name to its tensor name.
        inputs = {k: entry.tensor(t).name for k, t in inputs.items()}
        outputs = {k: entry.tensor(t).name for k, t in outputs.items()}
        tensors = {k: entry.tensor(t) for k, t in inputs.items()}
        specs = {k: (t.dtype, t.shape) for k, t in tensors.items()}
        samples, info = sample_inputs(req, specs, inputs)
        feeds = {tensors[k]: v for k, v in samples.items()}
        fetches = {k: entry.tensor(t) for k, t in outputs.items()}
        ref = entry.sess.run(fetches, feeds)
    elif kind == "keras":
        model, _ = keras_model(prefix, _run_dir(req, prefix), _path(req, "model", None))
        names = [t.name for t in model.inputs]
        keys = list(inputs) if len(inputs) == len(names) else names
        specs = {
            k: (tf.as_dtype(t.dtype), tf.TensorShape(t.shape))
            for k, t in zip(keys, model.inputs, strict=True)
        }
        # A single-input model also takes its data from feed/array "x", as the keras evaluator.
        aliases = {keys[0]: "x"} if len(keys) == 1 else dict(zip(keys, names, strict=True))
        samples, info = sample_inputs(req, specs, aliases)
        args = [tf.constant(samples[k]) for k in keys]
        pred = model(args[0] if len(args) == 1 else args, training=False)
        if isinstance(pred, dict):
            ref = {k: _as_numpy(v) for k, v in pred.items()}
        elif isinstance(pred, list | tuple):
            ref = {f"output_{i}": _as_numpy(v) for i, v in enumerate(pred)}
        else:
            ref = {(list(outputs) or ["output_0"])[0]: _as_numpy(pred)}
    elif kind == "tf2":
        spec = _field(req, "builder", str)
        build, _ = _import_function(spec, "export builder")
        module = build(prefix)  # keep a reference: bound tf.functions hold only a weakref
        fn = _tf2_function(module, spec)
        sig = _signature_specs(fn.get_concrete_function())
        keys = list(inputs) if len(inputs) == len(sig) else [s.name for s in sig]
        specs = {k: (s.dtype, s.shape) for k, s in zip(keys, sig, strict=True)}
        samples, info = sample_inputs(req, specs, {})
        ref = _call_signature(fn, sig, samples)
    else:
        raise WorkerFailure(BAD_REQUEST, f"verify: kind {kind!r} is not one of tf1, tf2, keras")

    wanted = list(outputs) or sorted(ref)
    details: dict[str, Any] = {"inputs": info}
    worst = 0.0
    for fmt in formats:
        start = time.perf_counter()
        if fmt == "saved_model":
            got, signature = saved_model_outputs(export_dir, samples)
            where = f"SavedModel {export_dir} signature {signature!r}"
            detail: dict[str, Any] = {"signature": signature}
        else:
            if kind != "tf1":
                raise WorkerFailure(BAD_REQUEST, f"verify: frozen_graph needs kind tf1, not {kind}")
            path = os.path.join(export_dir, FROZEN_FILE)
            got, where, detail = frozen_outputs(path, inputs, outputs, samples), path, {}
        diffs = {k: max_abs_diff(a, b) for k, a, b in _pair(ref, got, wanted, where)}
        detail["outputs"] = diffs
        detail["max_abs_diff"] = max(diffs.values())
        detail["verified"] = detail["max_abs_diff"] <= tolerance
        detail["seconds"] = time.perf_counter() - start
        details[fmt] = detail
        worst = max(worst, detail["max_abs_diff"])
    samples_n = max((len(v) if np.ndim(v) else 1) for v in samples.values()) if samples else 0
    return {
        "verified": worst <= tolerance,
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "samples": samples_n,
        "formats": formats,
        "details": details,
    }


# ------------------------------------------------------------------ inspect / ping

STEP_KEYS = ("global_step", "step", "save_counter")


def op_inspect(req: dict[str, Any]) -> dict[str, Any]:
    """Variables of a TF checkpoint (name, dtype, shape) and its step, read by TensorFlow."""
    prefix = _path(req, "checkpoint")
    require_checkpoint(prefix)
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    variables = [
        {"name": n, "dtype": tf.as_dtype(dtypes[n]).name, "shape": list(shapes[n])}
        for n in sorted(shapes)
    ]
    step = None
    for key in STEP_KEYS:
        for name in (key, f"{key}/.ATTRIBUTES/VARIABLE_VALUE"):
            if step is None and name in shapes and not shapes[name]:
                step = int(reader.get_tensor(name))
    return {"variables": variables, "step": step}


def op_ping(req: dict[str, Any]) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "tf_version": tf.__version__,
        "python": sys.version.split()[0],
        "cached": {"graphs": len(_GRAPHS), "keras": len(_KERAS), "data": len(_DATA)},
    }


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": op_ping,
    "evaluate": op_evaluate,
    "export": op_export,
    "verify": op_verify,
    "inspect": op_inspect,
}


def _tf_message(exc: tf.errors.OpError) -> str:
    """The cause, not the traceback: TF puts "Detected at node … (most recent call last)" first,
    then ``Node: '…'`` and the real reason (e.g. "No space left on device"), then a hint."""
    msg = exc.message.split("\n\nOriginal stack trace")[0]
    if "\nNode: '" in msg:
        msg = msg.split("\nNode: '", 1)[1].split("\n", 1)[-1]
    msg = "\n".join(
        line for line in msg.splitlines() if not line.strip().startswith(("[[{{node", "Hint:"))
    )
    return one_line(msg)[:600]


def _where(req: dict[str, Any]) -> str:
    target = req.get("checkpoint") or req.get("export_dir") or ""
    return f"{req.get('op')} {target}".strip()


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request; returns its result or raises WorkerFailure."""
    op = request.get("op")
    fn = OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        raise WorkerFailure(BAD_REQUEST, f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    start = time.perf_counter()
    try:
        result = fn(request)
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
        _log_traceback()
        name = type(exc).__name__
        raise WorkerFailure(TF_ERROR, f"{_where(request)}: {name}: {one_line(str(exc))}") from exc
    result["seconds"] = time.perf_counter() - start
    return result


def _log_traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)
