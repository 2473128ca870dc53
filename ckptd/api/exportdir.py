"""An export root on disk: numbered version directories (TF Serving's layout), the hidden temp
directories exports are written in, and each version's ``assets.extra/ckptd.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptd.config import WatchConfig
from ckptd.core.model import Run

TMP_PREFIX = ".ckptd-tmp-"
MANIFEST = os.path.join("assets.extra", "ckptd.json")  # where Serving expects extra files


def export_root(watch: WatchConfig, run: Run) -> Path:
    assert watch.freeze is not None
    root = watch.freeze.export_dir
    if isinstance(root, str):
        raise ValueError(f"exports to an object store ({root}) are not supported yet")
    return root / run.name if watch.runs else root


def highest_version(root: Path) -> int:
    """The highest numeric directory name under ``root`` (0 if none): what Serving serves."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    return max((int(p) for p in names if p.isdigit()), default=0)


def write_manifest(tmp: Path, info: dict[str, Any]) -> None:
    """``assets.extra/ckptd.json``: which checkpoint this version is, fsynced like the rest."""
    path = tmp / MANIFEST
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(info, indent=2, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    fsync_dir(tmp)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
