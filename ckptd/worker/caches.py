"""What the worker keeps warm between requests, for as long as its process lives.

- meta graphs: key (run dir, use_ema) -> imported graph, session and restoring Saver. The next
  checkpoint of the same run only runs ``saver.restore`` (milliseconds) instead of
  ``import_meta_graph`` (seconds). If that checkpoint's own ``.meta`` differs from the one the
  graph was built from, or restoring into the cached graph fails (the trainer changed the
  model), the graph is rebuilt once from this checkpoint's ``.meta``.
- Keras models: key run dir -> model; the next ``.keras`` of the run is loaded with
  ``load_weights`` when the architecture matches, else the model is reloaded.
- data sets: key (npz path, mtime, size) -> arrays.

Graph-mode work uses tf.compat.v1 with a private `tf.Graph` + `Session` per entry, so eager mode
stays on for Keras and `tf.saved_model.load`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from ckptd.worker.files import digest, require_checkpoint
from ckptd.worker.logs import log
from ckptd.worker.protocol import BAD_REQUEST, NOT_FOUND, WorkerFailure
from ckptd.worker.userfns import keras_architecture

v1 = tf.compat.v1

EMA_NAME = "ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage(name=...) default
MAX_GRAPHS = 4  # cached meta graphs (each holds a session with all variables)
MAX_KERAS = 2
MAX_DATASETS = 4

Arrays = dict[str, np.ndarray]

# ------------------------------------------------------------------ data sets

_DATA: OrderedDict[tuple[str, int, int], Arrays] = OrderedDict()


def load_npz(path: str) -> Arrays:
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


def array_named(arrays: Arrays, name: str, data: str) -> np.ndarray:
    if name not in arrays:
        raise WorkerFailure(
            BAD_REQUEST, f"data file {data} has no array {name!r} (it has {sorted(arrays)})"
        )
    return arrays[name]


# ------------------------------------------------------------------ meta graphs (TF1)


@dataclass
class GraphEntry:
    """One imported meta graph with its session; variables hold the last restored checkpoint."""

    graph: Any  # tf.Graph
    sess: Any  # tf.compat.v1.Session
    saver: Any  # tf.compat.v1.train.Saver or None (graph without variables)
    meta_path: str
    meta_digest: str
    ema_variables: int = 0
    init_after_restore: Any = None  # initializer of variables an EMA restore cannot fill
    resolved: dict[str, Any] = field(default_factory=dict)  # spec -> tf.Tensor

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

    def tensor(self, spec: str) -> Any:
        """A tensor by name ('accuracy:0'), op name ('accuracy') or 'collection:NAME[i]'."""
        if spec not in self.resolved:
            self.resolved[spec] = resolve_tensor(self.graph, spec, self.meta_path)
        return self.resolved[spec]


def resolve_tensor(graph: Any, spec: str, origin: str) -> Any:
    """The tf.Tensor `spec` names in `graph` (see GraphEntry.tensor); else a bad_request."""
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
        shadow = f"{v.op.name}/{EMA_NAME}"
        if shadow in in_ckpt:
            var_list[shadow] = v
            shadowed += 1
    leftover = []
    for v in variables:
        name = v.op.name
        if var_list.get(f"{name}/{EMA_NAME}") is v:
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
    return GraphEntry(graph, sess, saver, meta_path, digest(meta_path), shadowed, init_after)


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
        if os.path.isfile(meta_path) and digest(meta_path) != entry.meta_digest:
            log(f"{meta_path} differs from {entry.meta_path}; rebuilding the graph of {run}")
        else:
            try:
                entry.restore(prefix)
                _GRAPHS.move_to_end(key)
                return entry, True
            except _MISMATCH as exc:
                log(
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


# ------------------------------------------------------------------ Keras

_KERAS: OrderedDict[str, Any] = OrderedDict()  # run dir -> keras.Model


def keras_model(path: str, run: str, architecture: str | None = None) -> tuple[Any, bool]:
    """The run's cached Keras model with `path`'s weights -> (model, warm)."""
    import keras

    require_checkpoint(path)
    model = _KERAS.get(run)
    if model is not None:
        try:
            model.load_weights(path)
            _KERAS.move_to_end(run)
            return model, True
        except Exception as exc:  # another architecture: reload below
            log(f"load_weights({path}) into the cached model of {run} failed: {exc}; reloading")
            del _KERAS[run]
    if path.endswith(".keras"):
        model = keras.saving.load_model(path)
    elif not architecture:
        raise WorkerFailure(
            BAD_REQUEST,
            f"{path} holds weights only: set keras_model in its [[watch]] (a .keras file with "
            'the architecture, or "module:function" returning the model)',
        )
    else:
        model = keras_architecture(architecture)
        model.load_weights(path)
    _KERAS[run] = model
    while len(_KERAS) > MAX_KERAS:
        _KERAS.popitem(last=False)
    return model, False


def sizes() -> dict[str, int]:
    """How many entries each cache holds (the ping result)."""
    return {"graphs": len(_GRAPHS), "keras": len(_KERAS), "data": len(_DATA)}
