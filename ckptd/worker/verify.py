"""The verify request: an export computes what its checkpoint computes.

The same inputs (literal feed values, the first rows of the data set, or a generated batch) go
to the checkpoint (its meta graph, Keras model or tf2 builder) and to each export format; the
largest absolute difference of any output must be within the tolerance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ckptd.worker.caches import (
    Arrays,
    array_named,
    keras_model,
    load_npz,
    resolve_tensor,
    restored_graph,
    v1,
)
from ckptd.worker.export import FROZEN_FILE, SAVED_MODEL_FILES
from ckptd.worker.protocol import BAD_REQUEST, NOT_FOUND, VerifyResult, WorkerFailure
from ckptd.worker.requests import VerifyRequest
from ckptd.worker.userfns import import_function

VERIFY_ROWS = 32  # rows of the data set fed when verifying an export
RANDOM_ROWS = 4  # rows of the generated batch when verifying without data
InputSpecs = dict[str, tuple[Any, Any]]  # input key -> (tf.DType, tf.TensorShape)


@dataclass
class Reference:
    """What the checkpoint itself computes on the sample inputs."""

    outputs: Arrays
    samples: Arrays  # input key -> the array fed
    inputs_info: dict[str, Any]  # input key -> shape, dtype, source of its array
    inputs: dict[str, str]  # input key -> tensor name (tf1: what the frozen graph is fed)
    output_names: dict[str, str]  # output key -> tensor name


def _random_batch(dtype: Any, shape: Any, rng: np.random.Generator) -> np.ndarray:
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
    req: VerifyRequest, specs: InputSpecs, names: dict[str, str]
) -> tuple[Arrays, dict[str, Any]]:
    """Input key -> array: literal feed values, else the first rows of the npz, else random."""
    data = req.data
    feed = req.feed or {}
    arrays = load_npz(data) if data else {}
    rng = np.random.default_rng(0)
    samples: Arrays = {}
    info: dict[str, Any] = {}
    for key, (dtype, shape) in specs.items():
        aliases = [key] + [a for a in (names.get(key),) if a]  # input key, tensor name / "x"
        source = next((feed[a] for a in aliases if feed.get(a) is not None), None)
        if source is None and data:
            source = next((a for a in aliases if a in arrays), None)
        if isinstance(source, list | int | float):
            value, origin = np.asarray(source, dtype=dtype.as_numpy_dtype), "feed"
        elif isinstance(source, str):
            if not data:
                raise WorkerFailure(BAD_REQUEST, f"verify: feed names array {source!r} but no data")
            value, origin = array_named(arrays, source, data)[:VERIFY_ROWS], f"{data}:{source}"
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


def _outputs(out: Any, single: str = "output_0") -> Arrays:
    """A model's or signature's return value as output key -> array."""
    if isinstance(out, dict):
        return {k: _as_numpy(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return {f"output_{i}": _as_numpy(v) for i, v in enumerate(out)}
    return {single: _as_numpy(out)}


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


def _call_signature(fn: Any, specs: list[Any], samples: Arrays) -> Arrays:
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
    return _outputs(out)


def _signature_specs(fn: Any) -> list[Any]:
    args, kwargs = fn.structured_input_signature
    specs = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return [s for s in specs if isinstance(s, tf.TensorSpec)]


# ------------------------------------------------------------------ the checkpoint's outputs


def reference_tf1(req: VerifyRequest) -> Reference:
    if not req.inputs or not req.outputs:
        raise WorkerFailure(BAD_REQUEST, "verify: tf1 needs 'inputs' and 'outputs' tensors")
    entry, _ = restored_graph(req.checkpoint, req.run_dir(), req.use_ema)
    # Collections do not survive freezing: pin every name to its tensor name.
    inputs = {k: entry.tensor(t).name for k, t in req.inputs.items()}
    outputs = {k: entry.tensor(t).name for k, t in req.outputs.items()}
    tensors = {k: entry.tensor(t) for k, t in inputs.items()}
    specs = {k: (t.dtype, t.shape) for k, t in tensors.items()}
    samples, info = sample_inputs(req, specs, inputs)
    feeds = {tensors[k]: v for k, v in samples.items()}
    fetches = {k: entry.tensor(t) for k, t in outputs.items()}
    return Reference(entry.sess.run(fetches, feeds), samples, info, inputs, outputs)


def reference_keras(req: VerifyRequest) -> Reference:
    inputs, outputs = req.inputs or {}, req.outputs or {}
    model, _ = keras_model(req.checkpoint, req.run_dir(), req.model)
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
    ref = _outputs(pred, single=(list(outputs) or ["output_0"])[0])
    return Reference(ref, samples, info, inputs, outputs)


def reference_tf2(req: VerifyRequest) -> Reference:
    inputs, outputs = req.inputs or {}, req.outputs or {}
    if req.builder is None:
        raise WorkerFailure(BAD_REQUEST, "verify: missing field 'builder'")
    build, _ = import_function(req.builder, "export builder")
    module = build(req.checkpoint)  # keep a reference: bound tf.functions hold only a weakref
    fn = _tf2_function(module, req.builder)
    sig = _signature_specs(fn.get_concrete_function())
    keys = list(inputs) if len(inputs) == len(sig) else [s.name for s in sig]
    specs = {k: (s.dtype, s.shape) for k, s in zip(keys, sig, strict=True)}
    samples, info = sample_inputs(req, specs, {})
    return Reference(_call_signature(fn, sig, samples), samples, info, inputs, outputs)


REFERENCES = {"tf1": reference_tf1, "keras": reference_keras, "tf2": reference_tf2}


# ------------------------------------------------------------------ the export's outputs


def saved_model_outputs(export_dir: str, samples: Arrays) -> tuple[Arrays, str]:
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
    path: str, inputs: dict[str, str], outputs: dict[str, str], samples: Arrays
) -> Arrays:
    graph_def = v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    feeds = {resolve_tensor(graph, inputs[k], path): v for k, v in samples.items()}
    fetches = {k: resolve_tensor(graph, t, path) for k, t in outputs.items()}
    with v1.Session(graph=graph) as sess:
        return dict(sess.run(fetches, feeds))


def _pair(
    ref: Arrays, got: Arrays, wanted: list[str], where: str
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


def _formats(req: VerifyRequest) -> list[str]:
    """The formats to check (requested, else all present); each must be in export_dir."""
    export_dir = req.export_dir
    if not os.path.isdir(export_dir):
        raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} not found")
    present = {
        "saved_model": any(os.path.isfile(os.path.join(export_dir, f)) for f in SAVED_MODEL_FILES),
        "frozen_graph": os.path.isfile(os.path.join(export_dir, FROZEN_FILE)),
    }
    formats = req.formats if req.formats is not None else [f for f, ok in present.items() if ok]
    for fmt in formats:
        if not present[fmt]:
            what = "saved_model.pb" if fmt == "saved_model" else FROZEN_FILE
            raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} has no {what}")
    if not formats:
        raise WorkerFailure(NOT_FOUND, f"export dir {export_dir} holds no SavedModel or frozen.pb")
    return formats


def verify(req: VerifyRequest) -> VerifyResult:
    formats = _formats(req)
    kind = req.checkpoint_kind()
    ref = REFERENCES[kind](req)
    wanted = list(ref.output_names) or sorted(ref.outputs)
    details: dict[str, Any] = {"inputs": ref.inputs_info}
    worst = 0.0
    for fmt in formats:
        start = time.perf_counter()
        if fmt == "saved_model":
            got, signature = saved_model_outputs(req.export_dir, ref.samples)
            where = f"SavedModel {req.export_dir} signature {signature!r}"
            detail: dict[str, Any] = {"signature": signature}
        else:
            if kind != "tf1":
                raise WorkerFailure(BAD_REQUEST, f"verify: frozen_graph needs kind tf1, not {kind}")
            where = os.path.join(req.export_dir, FROZEN_FILE)
            got = frozen_outputs(where, ref.inputs, ref.output_names, ref.samples)
            detail = {}
        diffs = {k: max_abs_diff(a, b) for k, a, b in _pair(ref.outputs, got, wanted, where)}
        detail["outputs"] = diffs
        detail["max_abs_diff"] = max(diffs.values())
        detail["verified"] = detail["max_abs_diff"] <= req.tolerance
        detail["seconds"] = time.perf_counter() - start
        details[fmt] = detail
        worst = max(worst, detail["max_abs_diff"])
    samples = ref.samples
    rows = max((len(v) if np.ndim(v) else 1) for v in samples.values()) if samples else 0
    return VerifyResult(
        verified=worst <= req.tolerance,
        max_abs_diff=worst,
        tolerance=req.tolerance,
        samples=rows,
        formats=formats,
        details=details,
    )
