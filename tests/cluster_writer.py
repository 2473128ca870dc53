"""A real TensorFlow trainer writing several runs, on command: the cluster fault tests' load.

``python tests/cluster_writer.py DIR RUN...``: one ``tf.train.CheckpointManager`` per run
(``DIR/RUN``, a ``step`` counter as its checkpoint number, keeping every checkpoint: ckptd is the
only thing that deletes). Commands on stdin, one a line: ``go SECONDS`` saves one checkpoint of
every run each SECONDS until ``stop``, which is answered ``{"event": "stopped"}`` once the last
save is on disk; ``quit`` exits. Each save prints ``{"event": "saved", "prefix", "run", "step"}``.
One process writes several runs because each ``import tensorflow`` costs seconds of CPU.
"""

from __future__ import annotations

import json
import os
import select
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(root: str, names: list[str]) -> None:
    import tensorflow as tf

    managers = []
    for name in names:
        step = tf.Variable(0, dtype=tf.int64)
        ckpt = tf.train.Checkpoint(step=step, w=tf.Variable(tf.zeros([16])))
        directory = os.path.join(root, name)
        mgr = tf.train.CheckpointManager(ckpt, directory, max_to_keep=None, step_counter=step)
        managers.append((name, step, mgr))
    print(json.dumps({"event": "ready"}), flush=True)
    interval: float | None = None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready:
            command = sys.stdin.readline().split()
            if not command or command[0] == "quit":
                return
            if command[0] == "go":
                interval = float(command[1])
            elif command[0] == "stop":
                interval = None
                print(json.dumps({"event": "stopped"}), flush=True)
            continue
        for name, step, mgr in managers:
            step.assign_add(1)
            prefix = mgr.save()
            print(
                json.dumps({"event": "saved", "prefix": prefix, "run": name, "step": int(step)}),
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
