"""Fixtures for object storage tests (loaded by tests/conftest.py): real servers on loopback.

``s3_server`` / ``gcs_server``: one SeaweedFS and one fake-gcs-server a session (tests/objservers.py).
``objstore_server``: each of them in turn (parametrized ``s3``, ``gs``; narrow it with
``@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)``).
``bucket``: a fresh, empty bucket on ``objstore_server`` for one test (a :class:`Bucket`).
``objstore_env``: the server's endpoint and credentials in the environment of this process and
of every ckptd subprocess the test starts (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` or ``STORAGE_EMULATOR_HOST``).

Tests using any of them are marked ``objstore`` (tests/conftest.py adds the marker).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.objservers import ObjServer, Unavailable, fake_gcs, in_ci, seaweedfs

FIXTURES = frozenset({"s3_server", "gcs_server", "objstore_server", "bucket", "objstore_env"})
_names = itertools.count(1)


def _serve(kind: str, make: Any, root: Path) -> Iterator[ObjServer]:
    try:
        server = make(root)
    except Unavailable as exc:
        if in_ci():
            pytest.fail(f"{exc}; under CI=true the test extras must provide it", pytrace=False)
        pytest.skip(str(exc))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"{kind} server did not start: {exc}", pytrace=False)
    try:
        # fsspec's IO thread lives for the session: started here, before any test's thread
        # snapshot, so it is not counted as a test's leak.
        server.filesystem().ls("", refresh=True)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjServer]:
    """SeaweedFS serving S3 on loopback for the session (credentials required)."""
    yield from _serve("S3 (SeaweedFS)", seaweedfs, tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjServer]:
    """fake-gcs-server serving the GCS JSON API on loopback for the session."""
    yield from _serve("GCS (fake-gcs-server)", fake_gcs, tmp_path_factory.mktemp("fakegcs"))


@pytest.fixture(params=["s3", "gs"])
def objstore_server(request: pytest.FixtureRequest) -> ObjServer:
    """Each object store server in turn."""
    server: ObjServer = request.getfixturevalue(
        "s3_server" if request.param == "s3" else "gcs_server"
    )
    return server


@dataclass
class Bucket:
    """A bucket created for one test, and the test's full-access filesystem on it."""

    server: ObjServer
    name: str
    fs: Any

    @property
    def scheme(self) -> str:
        return self.server.scheme

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.name}"

    def key(self, *parts: str) -> str:
        """``bucket/a/b``: the fsspec path of ``parts`` under the bucket."""
        return "/".join([self.name, *(p.strip("/") for p in parts if p)])

    def url_of(self, *parts: str) -> str:
        return f"{self.scheme}://{self.key(*parts)}"

    def put(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(rel), data)

    def get(self, rel: str) -> bytes:
        data: bytes = self.fs.cat_file(self.key(rel))
        return data

    def names(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix``, relative to the bucket, sorted."""
        found = self.fs.find(self.key(prefix) if prefix else self.name)
        return sorted(p[len(self.name) + 1 :] for p in found)


@pytest.fixture
def bucket(objstore_server: ObjServer) -> Iterator[Bucket]:
    """A fresh bucket on each server (``s3`` and ``gs``), emptied and removed afterwards."""
    name = f"ckptd-t{next(_names)}-{uuid.uuid4().hex[:8]}"
    objstore_server.make_bucket(name)
    fs = objstore_server.filesystem()
    yield Bucket(objstore_server, name, fs)
    try:
        fs.rm(name, recursive=True)
    except OSError:
        pass  # a test that stopped the server; the session's directory is removed anyway


@pytest.fixture
def objstore_env(objstore_server: ObjServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Endpoint and credentials of ``objstore_server`` in this process's environment and in
    that of the ckptd commands and daemons the test starts (tests/conftest.py's ENV)."""
    from tests.conftest import ENV

    env = objstore_server.env
    for key in ("AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "AWS_PROFILE"):
        monkeypatch.delitem(ENV, key, raising=False)
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setitem(ENV, key, value)
        monkeypatch.setenv(key, value)
    return dict(env)


def mark_objstore(items: list[pytest.Item]) -> None:
    """The ``objstore`` marker on every test that uses one of these fixtures."""
    for item in items:
        if FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.objstore)


__all__ = [
    "Bucket",
    "bucket",
    "gcs_server",
    "mark_objstore",
    "objstore_env",
    "objstore_server",
    "s3_server",
]
