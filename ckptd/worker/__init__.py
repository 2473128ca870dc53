"""Worker code run in subprocesses. Only the TensorFlow side (caches, dispatch, evaluate, export,
verify, train, __main__) imports TensorFlow or numpy; the daemon reaches it through client.py
and protocol.py."""
