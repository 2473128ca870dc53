"""Where an export is published: a local directory, or a prefix on an object store.

The worker always writes an export into a local directory (it never imports fsspec); the
destination decides how it then becomes a numeric version TF Serving loads. Locally: a hidden
temp directory beside the versions, renamed into place. On an object store: a local temp
directory whose files are uploaded under the version's prefix, every object first and the
marker (``saved_model.pb``; the manifest for a frozen graph alone) last, by itself, so Serving
never loads half a model (serving#1086); a version without its marker was never published.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ckptd.api.exportdir import TMP_PREFIX, export_root, fsync_dir, highest_version
from ckptd.api.objstores import key_of, store_for, url_of
from ckptd.config import WatchConfig
from ckptd.core.model import Run
from ckptd.io import fsops
from ckptd.io.objstore import Store, is_object_url, transfer

log = logging.getLogger("ckptd.api.freeze")


class LocalDest:
    """Versions in a local directory (the worker writes beside them; a rename publishes)."""

    def __init__(self, root: Path) -> None:
        self.path = root
        self.root = str(root)

    def highest_version(self) -> int:
        return highest_version(self.path)

    def final(self, version: int) -> str:
        return str(self.path / str(version))

    def staging(self, version: int) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"

    def upload(self, tmp: Path, version: int) -> None:
        """Nothing to do before the publish: the files are in place already."""

    def publish(self, tmp: Path, version: int) -> None:
        os.rename(tmp, self.final(version))  # atomic: the numeric name appears complete
        fsync_dir(self.path)

    def discard(self, tmp: Path, version: int) -> None:
        try:
            fsops.remove_tree(self.path, tmp.name)
        except (OSError, fsops.UnsafePath):
            log.warning("could not remove %s", tmp)

    def remove(self, path: str) -> None:
        p = Path(path)
        fsops.remove_tree(p.parent, p.name)

    def exists(self, path: str, formats: str) -> bool:
        return Path(path).is_dir()


class ObjectDest:
    """Versions under a prefix of an object store (uploaded, the marker last)."""

    def __init__(self, url: str, store: Store | None = None) -> None:
        self.root = url
        self.key = key_of(url)
        self._store = store
        self._plans: dict[int, transfer.Upload] = {}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = store_for(self.root)
        return self._store

    def highest_version(self) -> int:
        return transfer.highest_version(self.store, self.key)

    def final(self, version: int) -> str:
        return f"{self.root}/{version}"

    def staging(self, version: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"ckptd-export-{version}-"))

    def upload(self, tmp: Path, version: int) -> None:
        """Every object of the export but its marker (before the database commits it)."""
        plan = self._plans[version] = transfer.plan_upload(tmp)
        transfer.upload_body(self.store, tmp, f"{self.key}/{version}", plan)

    def publish(self, tmp: Path, version: int) -> None:
        """The marker: one PUT, inside the transaction that records the export published."""
        transfer.upload_marker(self.store, tmp, f"{self.key}/{version}", self._plans[version])
        del self._plans[version]  # published: a failed commit leaves it to recovery
        shutil.rmtree(tmp, ignore_errors=True)

    def discard(self, tmp: Path, version: int) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if self._plans.pop(version, None) is not None:  # objects were uploaded: never published
            try:
                transfer.remove_tree(self.store, f"{self.key}/{version}")
            except transfer.StoreError as exc:
                log.warning("could not remove %s: %s (removed at the next start)", tmp, exc)

    def remove(self, path: str) -> None:
        transfer.remove_tree(self.store, key_of(path))

    def exists(self, path: str, formats: str) -> bool:
        """Whether the version at ``path`` was published (its marker is there)."""
        marker = transfer.marker_of(formats.split("+"))
        return transfer.is_published(self.store, key_of(path), marker)


Dest = LocalDest | ObjectDest


def destination(watch: WatchConfig, run: Run) -> Dest:
    assert watch.freeze is not None
    url = url_of(watch.freeze.export_dir)
    if is_object_url(url):
        return ObjectDest(f"{url}/{run.name}" if watch.runs else url)
    return LocalDest(export_root(watch, run))


def of_path(path: str) -> Dest:
    """The destination an export row's ``path`` (``root/version``) belongs to."""
    root = path.rsplit("/", 1)[0]
    return ObjectDest(root) if is_object_url(path) else LocalDest(Path(root))
