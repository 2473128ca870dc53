"""The export request: a checkpoint written as a SavedModel or a frozen graph (frozen.pb).

A SavedModel is written into a staging directory inside out_dir and moved in when complete,
so out_dir can hold both formats of one checkpoint; everything written is fsynced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import tensorflow as tf

from ckptd.worker.caches import GraphEntry, build_graph, keras_model, restored_graph, v1
from ckptd.worker.files import fsync_tree, require_checkpoint, write_file
from ckptd.worker.protocol import BAD_REQUEST, NOT_FOUND, ExportResult, WorkerFailure
from ckptd.worker.requests import ExportRequest
from ckptd.worker.userfns import import_function

FROZEN_FILE = "frozen.pb"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


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


def export_saved_model_tf2(prefix: str, staging: str, builder: str) -> None:
    build, _ = import_function(builder, "export builder")
    module = build(prefix)
    if not isinstance(module, tf.Module):
        raise WorkerFailure(
            BAD_REQUEST,
            f"export builder {builder} returned {type(module).__name__}, not a tf.Module",
        )
    tf.saved_model.save(module, staging)


def export_saved_model_keras(req: ExportRequest, staging: str) -> None:
    # The run's warm model (a .weights.h5 takes its architecture from ``model``).
    model, _ = keras_model(req.checkpoint, req.run_dir(), req.model)
    model.export(staging)


def export_frozen(
    prefix: str, run: str, out_dir: str, outputs: dict[str, str], use_ema: bool
) -> list[str]:
    entry, _ = restored_graph(prefix, run, use_ema)  # read-only use: the cached graph is fine
    nodes = sorted({entry.tensor(t).op.name for t in outputs.values()})
    with entry.graph.as_default():
        frozen = v1.graph_util.convert_variables_to_constants(
            entry.sess, entry.graph.as_graph_def(), nodes
        )
    write_file(os.path.join(out_dir, FROZEN_FILE), frozen.SerializeToString())
    return [FROZEN_FILE]


def export(req: ExportRequest) -> ExportResult:
    prefix, out_dir = req.checkpoint, req.out_dir
    require_checkpoint(prefix)
    if req.kind == "tf1" and not os.path.isfile(prefix + ".meta"):
        raise WorkerFailure(NOT_FOUND, f"meta graph {prefix}.meta not found")
    os.makedirs(out_dir, exist_ok=True)
    if req.format == "frozen_graph":
        assert req.outputs is not None
        files = export_frozen(prefix, req.run_dir(), out_dir, req.outputs, req.use_ema)
    else:
        staging = _staging(out_dir)
        try:
            if req.kind == "tf1":
                assert req.inputs is not None and req.outputs is not None
                export_saved_model_tf1(prefix, staging, req.inputs, req.outputs, req.use_ema)
            elif req.kind == "tf2":
                assert req.builder is not None
                export_saved_model_tf2(prefix, staging, req.builder)
            else:
                export_saved_model_keras(req, staging)
            files = _publish(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    fsync_tree(out_dir, files)
    return ExportResult(files=files, format=req.format, out_dir=out_dir)
