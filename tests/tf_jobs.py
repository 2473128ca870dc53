"""Small real TensorFlow / Keras jobs for the recording tests, run with the venv python.

``python tests/tf_jobs.py manager DIR UPTO BASE``: a TF2 CheckpointManager trainer started from
scratch (no restore) saving ``ckpt-1, ckpt-11, …`` up to UPTO, logging ``eval/accuracy`` =
BASE + step after each save. ``weights DIR N``: ``Checkpoint.write("weights")`` N times,
printing ``written I`` and waiting for a line on stdin after each. ``keras DIR EPOCHS``: a tiny
Keras fit with ModelCheckpoint (per epoch, and ``best.keras`` with save_best_only) and
TensorBoard, waiting for a line on stdin after each epoch; prints the history as JSON last.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def manager(directory: str, upto: int, base: float) -> None:
    import tensorflow as tf

    v = tf.Variable(0.0)
    ckpt = tf.train.Checkpoint(v=v)
    mgr = tf.train.CheckpointManager(ckpt, directory, max_to_keep=5)
    writer = tf.summary.create_file_writer(os.path.join(directory, "eval"))
    for step in range(1, upto + 1, 10):
        v.assign(float(step))
        mgr.save(checkpoint_number=step)
        with writer.as_default():
            tf.summary.scalar("accuracy", base + step, step=step)
        writer.flush()
    writer.close()


def weights(directory: str, times: int) -> None:
    import tensorflow as tf

    v = tf.Variable(tf.zeros([64]))
    ckpt = tf.train.Checkpoint(v=v)
    for i in range(1, times + 1):
        v.assign(tf.fill([64], float(i)))
        ckpt.write(os.path.join(directory, "weights"))
        print(f"written {i}", flush=True)
        sys.stdin.readline()


def keras_fit(directory: str, epochs: int) -> None:
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")

    class Handshake(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            print(f"epoch {epoch + 1}", flush=True)
            sys.stdin.readline()

    history = model.fit(
        x[:48],
        y[:48],
        validation_data=(x[48:], y[48:]),
        batch_size=48,  # one batch an epoch: optimizer iterations == epochs
        epochs=epochs,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                os.path.join(directory, "model.{epoch:02d}-{val_loss:.2f}.keras")
            ),
            keras.callbacks.ModelCheckpoint(
                os.path.join(directory, "best.keras"), save_best_only=True
            ),
            keras.callbacks.TensorBoard(directory),
            Handshake(),
        ],
    )
    print(json.dumps(history.history), flush=True)


if __name__ == "__main__":
    job, directory, *args = sys.argv[1:]
    if job == "manager":
        manager(directory, int(args[0]), float(args[1]))
    elif job == "weights":
        weights(directory, int(args[0]))
    else:
        keras_fit(directory, int(args[0]))
