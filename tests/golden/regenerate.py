"""Regenerate the golden corpus: real TensorFlow files that the fast test tier reads.

    cd REPO && .venv/bin/python tests/golden/regenerate.py

Trains the runs of ``CORPUS`` (tests/conftest.py) with ckptd/worker/train.py, as the ``trained``
fixture does but without held-out data, and replaces the run directories here with what it
wrote. ``manifest.json`` keeps what the fast tier cannot ask TensorFlow: the trainer's "saved"
records, TF's listing of every checkpoint's variables, each file's mtime (the write order) and
the directory it was written to (the absolute paths in the records and TF1 state files).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.conftest import CORPUS, ENV, PY, train_corpus  # noqa: E402

VERSIONS = (
    "import json, keras, tensorflow as tf; print(json.dumps([tf.__version__, keras.__version__]))"
)

README = """\
# Golden corpus

Checkpoints and event files written by real TensorFlow, so that the tests that only read them
(`pytest -m "not tf"`) run without TensorFlow. Each directory is one run of `CORPUS` in
tests/conftest.py; `manifest.json` holds the trainer's records, TF's variable listings, the files'
mtimes and the directory they were written to. The `golden` fixture serves copies of them.

Regenerate (replaces everything here): `.venv/bin/python tests/golden/regenerate.py`.
`tests/test_golden.py` (marked `tf`) checks that today's TensorFlow still writes files that parse
the same way.

Generated {date} with TensorFlow {tf}, Keras {keras}, Python {python}.
"""


def main() -> int:
    out = subprocess.run([PY, "-c", VERSIONS], env=ENV, capture_output=True, text=True, check=True)
    tf_version, keras_version = json.loads(out.stdout.splitlines()[-1])
    root = Path(tempfile.mkdtemp(prefix="ckptd-golden-"))
    try:
        saves, variables = train_corpus(root, "--no-npz")
        mtimes = {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}
        for kind in CORPUS:
            shutil.rmtree(HERE / kind, ignore_errors=True)
            shutil.copytree(root / kind, HERE / kind)
    finally:
        shutil.rmtree(root)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    manifest = {
        "generated": date,
        "tensorflow": tf_version,
        "keras": keras_version,
        "root": str(root),
        "saves": saves,
        "variables": variables,
        "mtimes": mtimes,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    python = ".".join(map(str, sys.version_info[:3]))
    (HERE / "README.md").write_text(
        README.format(date=date, tf=tf_version, keras=keras_version, python=python)
    )
    print(f"golden corpus written with TensorFlow {tf_version} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
