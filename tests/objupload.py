"""Upload real TensorFlow runs to a bucket in the order TensorFlow writes them to object stores.

TensorFlow's S3 and GCS filesystems write final object names directly (no rename), and
``MergeBundles`` writes a checkpoint's ``.index`` after its data shards; the ``checkpoint``
state file is rewritten last. So a reader listing mid-save sees data shards without an index,
never an index before its data, unless the upload was interrupted in an unusual way: both
half-way states are reproducible here with ``stop``.

Usage (``corpus`` is the golden or trained session corpus of tests/conftest.py)::

    upload_run(fs, corpus.run_dir("tf1"), "bucket/runs/tf1")
    upload_checkpoint(fs, run_dir, "bucket/runs/r", "model.ckpt-20", stop="data")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

# Where an upload of one checkpoint stops:
#   None      everything (data shards, .meta, .index)
#   "data"    data shards only: the index was never written (the usual state mid-save)
#   "shard"   every file but the last data shard, index included (an upload that skipped one)
Stop = Literal["data", "shard"] | None

_DATA = re.compile(r"\.data-\d{5}-of-\d{5}$")


def checkpoint_prefixes(run_dir: Path) -> list[str]:
    """Checkpoint prefixes (``model.ckpt-20``) of a local run, in step order."""
    prefixes = {p.name[: -len(".index")] for p in run_dir.glob("*.index")}

    def step(prefix: str) -> tuple[int, str]:
        m = re.search(r"(\d+)$", prefix)
        return (int(m.group(1)) if m else -1, prefix)

    return sorted(prefixes, key=step)


def checkpoint_files(run_dir: Path, prefix: str) -> list[Path]:
    """Files of one checkpoint in TensorFlow's write order: data shards, ``.meta``, ``.index``."""
    files = [p for p in run_dir.iterdir() if p.is_file() and p.name.startswith(prefix + ".")]
    data = sorted(p for p in files if _DATA.search(p.name))
    meta = [p for p in files if p.name == prefix + ".meta"]
    index = [p for p in files if p.name == prefix + ".index"]
    return data + meta + index


def upload_checkpoint(
    fs: Any,
    run_dir: Path,
    dest: str,
    prefix: str,
    *,
    stop: Stop = None,
    before_each: Callable[[str], None] | None = None,
) -> list[str]:
    """Upload checkpoint ``prefix`` of ``run_dir`` under key ``dest`` (``bucket/runs/r``).

    Returns the keys uploaded, in order. ``before_each(key)`` runs before each put (a test can
    look at the bucket between two objects).
    """
    files = checkpoint_files(run_dir, prefix)
    if not any(p.name.endswith(".index") for p in files):
        raise ValueError(f"{run_dir}: no checkpoint {prefix}")
    if stop == "data":
        files = [p for p in files if _DATA.search(p.name)]
    elif stop == "shard":
        last = [p for p in files if _DATA.search(p.name)][-1]
        files = [p for p in files if p != last]
    keys = []
    for path in files:
        key = f"{dest.rstrip('/')}/{path.name}"
        if before_each is not None:
            before_each(key)
        fs.pipe_file(key, path.read_bytes())
        keys.append(key)
    return keys


def state_file(run_dir: Path, url: str, upto: str | None = None) -> bytes | None:
    """The run's ``checkpoint`` state file as TensorFlow would have written it at ``url``
    (absolute local paths moved there; relative ones kept); ``upto``: as it was right after
    that checkpoint was saved (it is the newest, later ones are not listed yet)."""
    path = run_dir / "checkpoint"
    if not path.exists():
        return None
    text = path.read_text().replace(f"{run_dir}/", f"{url.rstrip('/')}/")
    if upto is None:
        return text.encode()
    names = re.findall(r'^all_model_checkpoint_paths: "([^"]*)"', text, re.M)
    newest = re.search(r'^model_checkpoint_path: "([^"]*)"', text, re.M)
    absolute = newest is not None and "/" in newest.group(1)
    upto_name = f"{url.rstrip('/')}/{upto}" if absolute else upto
    kept = [n for n in names if _step(n) < _step(upto)] + [upto_name]
    lines = [f'model_checkpoint_path: "{upto_name}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in kept]
    return ("\n".join(lines) + "\n").encode()


def _step(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def upload_run(
    fs: Any,
    run_dir: Path,
    dest: str,
    *,
    scheme: str = "s3",
    prefixes: list[str] | None = None,
    stop: Stop = None,
    events: bool = True,
) -> list[str]:
    """Upload a local run's checkpoints (all, or ``prefixes``) in step order under ``dest``,
    each followed by the state file naming it, as training writes them; event files first.

    ``stop`` applies to the last checkpoint uploaded: it is left half-way, and the state file
    is not rewritten for it (TensorFlow updates it only after a complete save).
    Returns the keys uploaded, in order.
    """
    names = prefixes if prefixes is not None else checkpoint_prefixes(run_dir)
    url = f"{scheme}://{dest.rstrip('/')}"
    keys: list[str] = []
    if events:
        for path in sorted(run_dir.glob("events.out.tfevents.*")):
            key = f"{dest.rstrip('/')}/{path.name}"
            fs.pipe_file(key, path.read_bytes())
            keys.append(key)
    for i, prefix in enumerate(names):
        last = i == len(names) - 1
        keys += upload_checkpoint(fs, run_dir, dest, prefix, stop=stop if last else None)
        if last and stop is not None:
            break
        state = state_file(run_dir, url, upto=prefix)
        if state is not None:
            key = f"{dest.rstrip('/')}/checkpoint"
            fs.pipe_file(key, state)
            keys.append(key)
    return keys
