"""Checkpoint discovery and completeness checks, for every format, without TensorFlow.

``list_run(run_dir)`` walks a run directory and groups its files into checkpoints: TF1 Saver and
TF2 object checkpoints (``PREFIX.index`` + ``PREFIX.data-NNNNN-of-MMMMM`` [+ ``PREFIX.meta``]) at
its top, Keras ``.keras`` / ``.weights.h5`` files also in its subdirectories (``ckpt/``), and
finds its TensorBoard event files. Temporary names TensorFlow uses while writing are never
checkpoints. Each result says whether the checkpoint is complete, and if not, why.

Every file is reached through :mod:`ckptd.io.safeio`: the run directory through a directory fd from
the watch root, files relative to it, never through a symlink, never blocking on a FIFO, with
capped reads. A checkpoint file that is not a regular file is corrupt ("not a regular file").

``discover`` lists a run directory, ``tf`` and ``keras`` judge each format's files (``tensorbundle``
reads an ``.index``), ``found`` is what they report.
"""

from ckptd.io.formats.discover import (
    EVENT_FILE,
    Listing,
    event_files,
    is_temp_name,
    is_utf8,
    list_run,
    scan_run,
)
from ckptd.io.formats.found import COMPLETE, CORRUPT, INCOMPLETE, Found, step_from_name
from ckptd.io.formats.keras import HDF5_SIGNATURE
from ckptd.io.formats.tf import INDEX_MAX_BYTES
from ckptd.io.kerasname import KerasTemplate

__all__ = [
    "COMPLETE",
    "CORRUPT",
    "EVENT_FILE",
    "HDF5_SIGNATURE",
    "INCOMPLETE",
    "INDEX_MAX_BYTES",
    "Found",
    "KerasTemplate",
    "Listing",
    "event_files",
    "is_temp_name",
    "is_utf8",
    "list_run",
    "scan_run",
    "step_from_name",
]
