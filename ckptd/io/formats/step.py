"""The training step a TF checkpoint belongs to, read from the checkpoint itself.

A file name counts saves (``CheckpointManager.save()`` names ``ckpt-1``, ``ckpt-2`` … whatever
the step), while event files log values at the training step. The step is a scalar variable in
the checkpoint: TF1's ``global_step``, a TF2 tracked counter (``step``, ``global_step``) or the
optimizer's iteration count. Its ``BundleEntryProto`` in the ``.index`` (already parsed to judge
completeness) gives its shard, offset and size, so the value costs one read of a few bytes from
the data shard. ``save_counter`` is the save count, never the step.
"""

from __future__ import annotations

from ckptd.io import safeio
from ckptd.io.formats.sstable import masked_crc32c
from ckptd.io.formats.tensorbundle import TensorAt

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"  # what TF2 appends to an object's path for its value

# By preference: a counter the user tracks says what they mean by "step"; the optimizer's
# iterations are what most trainers log at when there is none.
DEFAULT_KEYS: tuple[bytes, ...] = tuple(
    k.encode()
    for k in (
        f"step{VALUE}",
        f"global_step{VALUE}",
        "global_step",  # TF1 Saver
        f"optimizer/iterations{VALUE}",
        f"optimizer/_iterations{VALUE}",  # Keras 3
        f"optimizer/iter{VALUE}",  # tf.keras (Keras 2)
    )
)

# DataType number -> (bytes, signed) of the integer dtypes a step counter has.
_INTEGERS = {3: (4, True), 9: (8, True), 22: (4, False), 23: (8, False)}


def step_keys(step_variable: str | None) -> tuple[bytes, ...]:
    """The tensor keys to read the step from: a watch's ``step_variable`` (a key as
    ``tf.train.list_variables`` prints it, or a TF2 object path without the ``VALUE`` suffix),
    else the usual counters."""
    if not step_variable:
        return DEFAULT_KEYS
    key = step_variable.encode()
    return (key,) if ".ATTRIBUTES/" in step_variable else (key, key + VALUE.encode())


def read_step(dir_fd: int, data_name: str, at: TensorAt) -> int | None:
    """The integer scalar ``at`` in the data shard ``data_name`` of ``dir_fd``; None when it is
    not one, cannot be read, or its bytes fail the index's checksum (the shard is not the one
    this index describes, e.g. rewritten since): the caller falls back to the file name."""
    if not readable(at):
        return None
    try:
        raw = safeio.read_checked(data_name, dir_fd, at.offset, at.size)
    except OSError:
        return None
    return step_value(raw, at)


def readable(at: TensorAt) -> bool:
    """Whether ``at`` is a tensor a step can be read from (an integer scalar)."""
    width = _INTEGERS.get(at.dtype)
    return width is not None and at.size == width[0]


def step_value(raw: bytes, at: TensorAt) -> int | None:
    """The step in ``raw``, the bytes ``at`` locates (read from a local file or an object);
    None when they fail the index's checksum or are no step."""
    width = _INTEGERS.get(at.dtype)
    if width is None or len(raw) != at.size or masked_crc32c(raw) != at.crc32c:
        return None
    value = int.from_bytes(raw, "little", signed=width[1])
    return value if value >= 0 else None
