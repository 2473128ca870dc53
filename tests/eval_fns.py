"""Functions the worker imports by name in tests (`tests.eval_fns:NAME`).

They run inside the worker process, where TensorFlow is already imported, so they add no import
cost. The numpy oracles here share no code with the worker (ckptd.worker): they read raw tensors
with `tf.train.load_checkpoint` and compute the model by hand.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

EMA = "/ExponentialMovingAverage"


def constant_metrics(checkpoint: str, step: int | None, run: str) -> dict[str, Any]:
    """Numbers of several types, plus what the worker passed in (as numbers)."""
    return {
        "eval/accuracy": 0.5,
        "count": 3,
        "np32": np.float32(0.25),
        "np0d": np.array(7.0),
        "nan": float("nan"),
        "step_seen": -1 if step is None else step,
        "run_is_dir": float(os.path.isdir(run)),
        "checkpoint_is_abs": float(os.path.isabs(checkpoint)),
    }


def garbage_value(checkpoint: str, step: int | None, run: str) -> dict[str, Any]:
    return {"eval/accuracy": "high", "loss": 0.1}


def garbage_type(checkpoint: str, step: int | None, run: str) -> list[float]:
    return [0.1, 0.2]


def raises(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    raise RuntimeError(f"evaluator exploded on {checkpoint}")


def exits(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    sys.exit(3)


def noisy(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """Writes to stdout three ways; none of it may reach the protocol stream."""
    print("print() to stdout {not json")
    sys.stdout.flush()
    os.write(1, b"raw write to fd 1\n")
    return {"quiet": 1.0}


def _mlp(get: Any, x: np.ndarray) -> np.ndarray:
    """The trainer's tf1 model by hand: relu(x W1 + b1) W2 + b2 -> logits (float64)."""
    hidden = np.maximum(x @ get("hidden/weights") + get("hidden/biases"), 0.0)
    return hidden @ get("softmax/weights") + get("softmax/biases")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _metrics(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(y)), y].mean()
    return float((logits.argmax(axis=1) == y).mean()), float(loss)


def numpy_oracle(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """Accuracy/loss on heldout.npz from the raw and from the EMA shadow values, by hand."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    data = np.load(os.path.join(run, "heldout.npz"))
    out = {}
    for tag, suffix in (("raw", ""), ("ema", EMA)):
        logits = _mlp(lambda n, s=suffix: reader.get_tensor(n + s).astype(np.float64), data["x"])
        out[f"{tag}/accuracy"], out[f"{tag}/loss"] = _metrics(logits, data["y"])
    return out


def export_outputs(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """`run` is an export dir: compare its SavedModel and frozen.pb with numpy on the checkpoint.

    Uses plain TensorFlow APIs (tf.saved_model.load, tf.import_graph_def), not the worker's.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    x = np.load(os.path.join(os.path.dirname(checkpoint), "heldout.npz"))["x"][:32]
    expected = _softmax(_mlp(lambda n: reader.get_tensor(n).astype(np.float64), x))

    serving = tf.saved_model.load(run).signatures["serving_default"]
    from_saved_model = serving(x=tf.constant(x))["y"].numpy()

    graph_def = tf.compat.v1.GraphDef()
    with open(os.path.join(run, "frozen.pb"), "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        from_frozen = sess.run("y:0", {"x:0": x})
        placeholders = sum(op.type == "Placeholder" for op in graph.get_operations())
        variables = sum("Variable" in op.type for op in graph.get_operations())
    return {
        "saved_model_vs_numpy": float(np.abs(from_saved_model - expected).max()),
        "frozen_vs_numpy": float(np.abs(from_frozen - expected).max()),
        "saved_model_vs_frozen": float(np.abs(from_saved_model - from_frozen).max()),
        "rows": float(len(x)),
        "frozen_placeholders": float(placeholders),
        "frozen_variable_ops": float(variables),
    }


def write_wide_tf1(checkpoint: str, step: int | None, run: str) -> dict[str, float]:
    """Save a tf1 checkpoint (with .meta) of a *wider* model at `checkpoint`, as if the trainer
    had been restarted with another architecture; returns its accuracy on the run's heldout set."""
    import tensorflow as tf

    v1 = tf.compat.v1
    data = np.load(os.path.join(run, "heldout.npz"))
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(1)
        x = v1.placeholder(tf.float32, [None, 64], name="x")
        y_ = v1.placeholder(tf.int64, [None], name="y_")
        with v1.variable_scope("hidden"):
            w1 = v1.get_variable("weights", [64, 48])
            b1 = v1.get_variable("biases", [48], initializer=v1.zeros_initializer())
        with v1.variable_scope("softmax"):
            w2 = v1.get_variable("weights", [48, 10])
            b2 = v1.get_variable("biases", [10], initializer=v1.zeros_initializer())
        logits = tf.identity(tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2, name="logits")
        tf.nn.softmax(logits, name="y")
        correct = tf.cast(tf.equal(tf.argmax(logits, 1), y_), tf.float32)
        accuracy = tf.reduce_mean(correct, name="accuracy")
        tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_, logits=logits), name="loss"
        )
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            value = sess.run(accuracy, {x: data["x"], y_: data["y"]})
            saver.save(sess, checkpoint)
    return {"accuracy": float(value)}


def build_tf2(prefix: str) -> Any:
    """Export builder for the trainer's tf2 runs: rebuild the module, restore, add a signature."""
    import tensorflow as tf

    class Served(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = tf.Variable(tf.zeros([64, 32]), name="hidden/kernel")
            self.b1 = tf.Variable(tf.zeros([32]), name="hidden/bias")
            self.w2 = tf.Variable(tf.zeros([32, 10]), name="logits/kernel")
            self.b2 = tf.Variable(tf.zeros([10]), name="logits/bias")

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            logits = tf.matmul(tf.nn.relu(tf.matmul(x, self.w1) + self.b1), self.w2) + self.b2
            return {"probs": tf.nn.softmax(logits)}

    module = Served()
    tf.train.Checkpoint(model=module).restore(
        prefix
    ).expect_partial().assert_existing_objects_matched()
    return module
