"""ckptd — a checkpoint lifecycle daemon for TensorFlow training.

Watches training directories, records every checkpoint with its step and metrics, evaluates and
exports the best, and prunes by a retention policy. This package never imports TensorFlow outside
``ckptd.worker``.
"""

__version__ = "0.1.0"
