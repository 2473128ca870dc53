"""The weights saved in a Keras checkpoint, without TensorFlow: a ``.keras`` zip archive holds
them in ``model.weights.h5``; a ``.weights.h5`` file is that HDF5 file itself.

HDF5 is read with h5py (it comes with TensorFlow/Keras; imported only here, only when asked).
Without h5py, a ``.keras`` archive's members are listed instead and :class:`Listed` says so.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import IO, Any

from ckptd.io.formats.tensorbundle import TensorInfo

WEIGHTS_MEMBER = "model.weights.h5"
NO_H5PY = "h5py is not installed (it comes with TensorFlow): install it to list the weights"


class KerasUnreadable(Exception):
    """Not a Keras archive or HDF5 file this can read; the message says why."""


@dataclass(frozen=True)
class Listed:
    tensors: list[TensorInfo]
    note: str | None = None  # what could not be listed, and why


def list_weights(fh: IO[bytes], name: str) -> Listed:
    """The weights of the Keras checkpoint open as ``fh`` (a seekable binary file)."""
    if name.endswith(".weights.h5"):
        return Listed(_hdf5_tensors(fh))
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise KerasUnreadable(f"not a complete .keras (zip) archive: {exc}") from None
    with archive:
        members = archive.infolist()
        if WEIGHTS_MEMBER not in archive.namelist():
            raise KerasUnreadable(
                f"the archive has no {WEIGHTS_MEMBER} (members: "
                f"{', '.join(m.filename for m in members) or 'none'})"
            )
        try:
            with archive.open(WEIGHTS_MEMBER) as member:
                return Listed(_hdf5_tensors(member))
        except ModuleNotFoundError:
            return Listed(
                [TensorInfo(m.filename, "", (), 0, m.file_size) for m in members],
                f"archive members, not weights: {NO_H5PY}",
            )


def _hdf5_tensors(fh: IO[bytes]) -> list[TensorInfo]:
    """Every dataset of an HDF5 file, by path (``layers/dense/vars/0``), as a tensor."""
    import h5py  # raises ModuleNotFoundError without it

    tensors: list[TensorInfo] = []

    def visit(path: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            shape = tuple(int(n) for n in (obj.shape or ()))
            tensors.append(TensorInfo(path, obj.dtype.name, shape, 0, int(obj.nbytes)))

    try:
        with h5py.File(fh, "r") as f:
            f.visititems(visit)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise KerasUnreadable(f"not a readable HDF5 weights file: {exc}") from None
    return tensors
