"""Worker code run in subprocesses; only train.py and tf_ops.py may import TensorFlow."""
