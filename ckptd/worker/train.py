"""Run a real, tiny TensorFlow training job that writes real checkpoints.

Used by the test suite (to create genuine checkpoints once per session), by
``ckptd demo`` and by benchmarks measuring how fast a watcher notices a save.
Only ever run in a subprocess::

    python -m ckptd.worker.train {tf1,tf2,sharded,keras} --out DIR [options]

stdout carries exactly one JSON line per save plus a final ``done`` line, so a
parent process can parse it; all logging goes to stderr.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

FEATURES, HIDDEN, CLASSES = 64, 32, 10
N_TRAIN, N_HELDOUT, BATCH = 1024, 512, 64
LEARNING_RATE = 0.01
# Small enough that the tiny model's variables span several shards.
SHARD_BYTES = 8 * 1024

# Real stdout is reserved for the JSON protocol; see main().
_PROTOCOL_OUT = sys.stdout


def _emit(record: dict[str, Any]) -> None:
    """Write one protocol line and flush, so watchers see it immediately."""
    _PROTOCOL_OUT.write(json.dumps(record) + "\n")
    _PROTOCOL_OUT.flush()


def _log(msg: str) -> None:
    print(f"[ckptd.worker.train] {msg}", file=sys.stderr, flush=True)


def make_dataset(seed: int) -> tuple[np.ndarray, ...]:
    """Gaussian blobs: learnable, but noisy enough that accuracy climbs gradually."""
    rng = np.random.RandomState(seed)
    centers = rng.normal(0.0, 1.0, size=(CLASSES, FEATURES)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.randint(0, CLASSES, size=n).astype(np.int64)
        x = centers[y] + rng.normal(0.0, 2.0, size=(n, FEATURES))
        return x.astype(np.float32), y

    x_train, y_train = sample(N_TRAIN)
    x_held, y_held = sample(N_HELDOUT)
    return x_train, y_train, x_held, y_held


class Pacer:
    """Sleeps so consecutive saves start at least `interval` seconds apart.

    If training falls behind (e.g. the first step traces a graph), the schedule
    re-anchors instead of bursting saves to catch up.
    """

    def __init__(self, interval: float | None) -> None:
        self.interval = interval or 0.0
        self.deadline = time.monotonic() + self.interval

    def wait(self) -> None:
        if self.interval <= 0:
            return
        now = time.monotonic()
        if now < self.deadline:
            time.sleep(self.deadline - now)
        else:
            self.deadline = now
        self.deadline += self.interval


def _is_save_step(step: int, args: argparse.Namespace) -> bool:
    """Save every K steps, and always at the final step."""
    return step % args.save_every == 0 or step == args.steps


def _f32(value: Any) -> float:
    """The exact float that a float32 event-file value decodes to."""
    return float(np.float32(value))


def _batches(x: np.ndarray, y: np.ndarray, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled minibatches."""
    rng = np.random.RandomState(seed + 1)
    while True:
        order = rng.permutation(len(x))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            yield x[idx], y[idx]


def train_tf1(args: argparse.Namespace, data: tuple[np.ndarray, ...]) -> int:
    """Classic graph-mode job: placeholders, Saver with meta graphs, EMA, FileWriters."""
    import tensorflow as tf

    v1 = tf.compat.v1
    v1.disable_eager_execution()
    x_train, y_train, x_held, y_held = data
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(args.seed)
        x = v1.placeholder(tf.float32, [None, FEATURES], name="x")
        y_ = v1.placeholder(tf.int64, [None], name="y_")
        init = v1.glorot_uniform_initializer()
        with v1.variable_scope("hidden"):
            w1 = v1.get_variable("weights", [FEATURES, HIDDEN], initializer=init)
            b1 = v1.get_variable("biases", [HIDDEN], initializer=v1.zeros_initializer())
        with v1.variable_scope("softmax"):
            w2 = v1.get_variable("weights", [HIDDEN, CLASSES], initializer=init)
            b2 = v1.get_variable("biases", [CLASSES], initializer=v1.zeros_initializer())
        hidden = tf.nn.relu(tf.matmul(x, w1) + b1)
        logits = tf.identity(tf.matmul(hidden, w2) + b2, name="logits")
        y = tf.nn.softmax(logits, name="y")
        v1.add_to_collection("pred_network", y)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_, logits=logits),
            name="loss",
        )
        correct = tf.equal(tf.argmax(logits, 1), y_)
        accuracy = tf.reduce_mean(tf.cast(correct, tf.float32), name="accuracy")
        global_step = v1.train.get_or_create_global_step()
        opt_step = v1.train.AdamOptimizer(LEARNING_RATE).minimize(loss, global_step=global_step)
        ema = v1.train.ExponentialMovingAverage(0.99, global_step)
        with tf.control_dependencies([opt_step]):  # average the *updated* weights
            ema_op = ema.apply(v1.trainable_variables())
        train_op = tf.group(opt_step, ema_op, name="train")
        saver = v1.train.Saver(max_to_keep=args.max_to_keep or None)

    train_writer = v1.summary.FileWriter(args.out, graph)
    eval_writer = v1.summary.FileWriter(os.path.join(args.out, "eval"))
    prefix_base = os.path.join(args.out, "model.ckpt")
    held = {x: x_held, y_: y_held}
    pacer, saves = Pacer(args.interval), 0
    batches = _batches(x_train, y_train, args.seed)
    with v1.Session(graph=graph) as sess:
        sess.run(v1.global_variables_initializer())
        for _ in range(args.steps):
            xb, yb = next(batches)
            _, train_loss = sess.run([train_op, loss], {x: xb, y_: yb})
            step = int(sess.run(global_step))  # fetched with train_op it may read pre-increment
            summary = v1.Summary(value=[v1.Summary.Value(tag="loss", simple_value=train_loss)])
            train_writer.add_summary(summary, step)
            if not _is_save_step(step, args):
                continue
            pacer.wait()
            values = sess.run({"accuracy": accuracy, "loss": loss}, held)
            metrics = {tag: _f32(value) for tag, value in values.items()}
            summary_values = [v1.Summary.Value(tag=t, simple_value=v) for t, v in metrics.items()]
            eval_writer.add_summary(v1.Summary(value=summary_values), step)
            train_writer.flush()
            eval_writer.flush()  # metrics land before the checkpoint that they describe
            prefix = saver.save(sess, prefix_base, global_step=step)
            saved_at = time.time()
            saves += 1
            _emit_saved("tf1", step, prefix, saved_at, _eval_names(metrics))
    train_writer.close()
    eval_writer.close()
    return saves


def _shard_count(prefix: str) -> int:
    """Number of data shards N from `<prefix>.data-0000i-of-0000N` files."""
    paths = glob.glob(glob.escape(prefix) + ".data-*-of-*")
    return max((int(re.sub(r".*-of-", "", p)) for p in paths), default=0)


def train_eager(args: argparse.Namespace, data: tuple[np.ndarray, ...]) -> int:
    """TF2 object-based job (tf.train.Checkpoint + CheckpointManager, tensor summaries)."""
    import keras
    import tensorflow as tf

    class MLP(tf.Module):
        """Flat module so keys read `model/w1/...` (a Keras 3 model's weights would be
        keyed `optimizer/_trainable_variables/N/...`, their shortest object-graph path)."""

        def __init__(self) -> None:
            super().__init__(name="mlp")
            init = tf.initializers.GlorotUniform(seed=args.seed)
            self.w1 = tf.Variable(init([FEATURES, HIDDEN]), name="hidden/kernel")
            self.b1 = tf.Variable(tf.zeros([HIDDEN]), name="hidden/bias")
            self.w2 = tf.Variable(init([HIDDEN, CLASSES]), name="logits/kernel")
            self.b2 = tf.Variable(tf.zeros([CLASSES]), name="logits/bias")

        def __call__(self, x: Any) -> Any:
            return tf.matmul(tf.nn.relu(tf.matmul(x, self.w1) + self.b1), self.w2) + self.b2

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_held, y_held = data
    model = MLP()
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(step=step_var, model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(
        ckpt, args.out, max_to_keep=args.max_to_keep or None, checkpoint_name="ckpt"
    )
    options = None
    if args.kind == "sharded":
        policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=SHARD_BYTES)
        options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)

    train_writer = tf.summary.create_file_writer(args.out)
    eval_writer = tf.summary.create_file_writer(os.path.join(args.out, "eval"))
    pacer, saves = Pacer(args.interval), 0
    batches = _batches(x_train, y_train, args.seed)
    for _ in range(args.steps):
        xb, yb = next(batches)
        with tf.GradientTape() as tape:
            train_loss = loss_fn(yb, model(xb))
        grads = tape.gradient(train_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        step = int(step_var.assign_add(1))
        with train_writer.as_default():
            tf.summary.scalar("loss", train_loss, step=step)
        if not _is_save_step(step, args):
            continue
        pacer.wait()
        logits = model(x_held)
        correct = tf.cast(tf.equal(tf.argmax(logits, 1), y_held), tf.float32)
        values = {"accuracy": tf.reduce_mean(correct), "loss": loss_fn(y_held, logits)}
        with eval_writer.as_default():
            for tag, value in values.items():
                tf.summary.scalar(tag, value, step=step)
        train_writer.flush()
        eval_writer.flush()  # metrics land before the checkpoint that they describe
        prefix = manager.save(checkpoint_number=step, options=options)
        saved_at = time.time()
        saves += 1
        if args.kind == "sharded" and (shards := _shard_count(prefix)) < 3:
            raise RuntimeError(f"expected >= 3 data shards for {prefix}, found {shards}")
        metrics = {tag: _f32(value.numpy()) for tag, value in values.items()}
        _emit_saved(args.kind, step, os.path.abspath(prefix), saved_at, _eval_names(metrics))
    train_writer.close()
    eval_writer.close()
    return saves


def train_keras(args: argparse.Namespace, data: tuple[np.ndarray, ...]) -> int:
    """Keras 3 model.fit with two ModelCheckpoint callbacks; one epoch per save."""
    import keras

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_held, y_held = data
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
            keras.layers.Dense(CLASSES, activation="softmax", name="probs"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model_pattern = os.path.join(args.out, "model.{epoch:02d}-{val_loss:.2f}.keras")
    weights_pattern = os.path.join(args.out, "weights.{epoch:02d}.weights.h5")
    pacer = Pacer(args.interval)
    saves = 0

    def pace(epoch: int, logs: dict | None) -> None:
        pacer.wait()  # runs before the ModelCheckpoint callbacks save

    def report(epoch: int, logs: dict | None) -> None:
        nonlocal saves
        saved_at = time.time()
        logs = dict(logs or {})
        files = [p.format(epoch=epoch + 1, **logs) for p in (model_pattern, weights_pattern)]
        if missing := [f for f in files if not os.path.exists(f)]:
            raise RuntimeError(f"ModelCheckpoint did not write {missing}")
        saves += 1
        metrics = {k: float(logs[k]) for k in ("val_loss", "val_accuracy")}
        _emit_saved("keras", epoch + 1, files[0], saved_at, metrics, files=files)

    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_end=pace),
        keras.callbacks.ModelCheckpoint(model_pattern),
        keras.callbacks.ModelCheckpoint(weights_pattern, save_weights_only=True),
        keras.callbacks.LambdaCallback(on_epoch_end=report),
    ]
    model.fit(
        x_train,
        y_train,
        batch_size=BATCH,
        epochs=args.steps,
        verbose=0,
        validation_data=(x_held, y_held),
        callbacks=callbacks,
    )
    return saves


def _eval_names(metrics: dict[str, float]) -> dict[str, float]:
    """Metric names as ckptd derives them from the `eval/` event-file directory."""
    return {f"eval/{tag}": value for tag, value in metrics.items()}


def _emit_saved(
    kind: str, step: int, prefix: str, saved_at: float, metrics: dict[str, float], **extra: Any
) -> None:
    """Report one finished save on the protocol stream (and log it)."""
    record = {"event": "saved", "kind": kind, "step": step, "prefix": prefix, "saved_at": saved_at}
    _emit({**record, "metrics": metrics, **extra})
    _log(f"saved {kind} step {step}: {prefix} {metrics}")


TRAINERS = {"tf1": train_tf1, "tf2": train_eager, "sharded": train_eager, "keras": train_keras}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ckptd.worker.train", description=__doc__.split(".")[0]
    )
    p.add_argument("kind", choices=list(TRAINERS))
    p.add_argument("--out", required=True, help="checkpoint/log directory (created)")
    p.add_argument("--steps", type=int, default=30, help="training steps (keras: epochs)")
    p.add_argument("--save-every", type=int, default=10, help="save every K steps (not keras)")
    p.add_argument("--interval", type=float, default=None, help="seconds between saves")
    p.add_argument("--max-to-keep", type=int, default=0, help="0 = keep all (not keras)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-npz", action="store_true", help="do not write heldout.npz")
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1:
        p.error("--steps and --save-every must be >= 1")
    args.out = os.path.abspath(args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit status."""
    global _PROTOCOL_OUT
    args = parse_args(argv)
    # Keep stray prints (from TF/Keras) off the JSON protocol stream.
    _PROTOCOL_OUT, sys.stdout = sys.stdout, sys.stderr
    try:
        os.makedirs(args.out, exist_ok=True)
        data = make_dataset(args.seed)
        if not args.no_npz:
            np.savez(os.path.join(args.out, "heldout.npz"), x=data[2], y=data[3])
        saves = TRAINERS[args.kind](args, data)
        _emit({"event": "done", "saves": saves})
        return 0
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    finally:
        sys.stdout = _PROTOCOL_OUT


if __name__ == "__main__":
    sys.exit(main())
