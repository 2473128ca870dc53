"""Checkpoint discovery and completeness on REAL TensorFlow checkpoints (no TF import here).

The session ``corpus`` fixture writes genuine TF1 Saver, TF2 CheckpointManager, sharded TF2 and
Keras checkpoints once; tests that damage files work on a private copy. Time is injected through
``scan_run(now=...)`` relative to the files' own mtimes, never by sleeping.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from ckptd.io import formats, safeio
from ckptd.io.formats import (
    COMPLETE,
    CORRUPT,
    INCOMPLETE,
    Found,
    KerasTemplate,
    event_files,
    is_temp_name,
    scan_run,
)
from ckptd.io.formats import sstable as sst
from ckptd.io.formats import tensorbundle as tb
from tests.conftest import Corpus

TEMPLATE = "model.{epoch:02d}-{val_loss:.2f}.keras"
STALE = 60.0
ITEMSIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8}


def _by_prefix(found: list[Found]) -> dict[str, Found]:
    out = {f.prefix: f for f in found}
    assert len(out) == len(found), "a prefix was reported twice"
    return out


def _fresh(path: Path) -> float:
    """A ``now`` just after ``path`` was last written (the writer may still be busy)."""
    return path.stat().st_mtime + 1.0


def _stale(path: Path) -> float:
    """A ``now`` long after ``path`` was last written (the writer must have died)."""
    return path.stat().st_mtime + STALE + 1.0


def _data_files(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.glob(prefix.name + ".data-*-of-*"))


class _OpenSpy:
    """Records every file ``ckptd.io.formats`` opens: all of them go through
    ``safeio.open_regular`` or ``safeio.read_checked`` (relative to a run directory's fd)."""

    def __init__(self, open_regular: Any, read_checked: Any) -> None:
        self.paths: list[Path] = []
        self._open_regular, self._read_checked = open_regular, read_checked

    def _seen(self, name: str, dir_fd: int) -> None:
        self.paths.append(Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / name)

    def open_regular(self, name: str, dir_fd: int) -> Any:
        self._seen(name, dir_fd)
        return self._open_regular(name, dir_fd)

    def read_checked(self, name: str, dir_fd: int, offset: int, size: int) -> bytes:
        self._seen(name, dir_fd)
        return self._read_checked(name, dir_fd, offset, size)  # type: ignore[no-any-return]


@pytest.fixture
def open_spy(monkeypatch: pytest.MonkeyPatch) -> _OpenSpy:
    spy = _OpenSpy(safeio.open_regular, safeio.read_checked)
    monkeypatch.setattr(safeio, "open_regular", spy.open_regular)
    monkeypatch.setattr(safeio, "read_checked", spy.read_checked)
    return spy


# ------------------------------------------------------------------ real formats


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded"])
def test_real_bundle_checkpoints_are_discovered_complete(corpus: Corpus, kind: str) -> None:
    run = corpus.run_dir(kind)
    found = _by_prefix(scan_run(run))
    saves = corpus.saves[kind]
    assert sorted(found) == sorted(rec["prefix"] for rec in saves)
    for rec in saves:
        f = found[rec["prefix"]]
        prefix = Path(rec["prefix"])
        assert f.step == rec["step"]
        assert (f.state, f.reason) == (COMPLETE, None)
        # TF1 has a .meta; TF2 (sharded too) has _CHECKPOINTABLE_OBJECT_GRAPH in its index.
        assert f.format == ("tf1" if kind == "tf1" else "tf2")
        assert f.has_meta is (kind == "tf1")
        expected = [prefix.name + ".index", *_data_files(prefix)]
        if kind == "tf1":
            expected.append(prefix.name + ".meta")
        assert f.files == tuple(sorted(expected))
        assert f.size == sum((run / name).stat().st_size for name in f.files)
        assert f.mtime == max((run / name).stat().st_mtime for name in f.files)
        assert f.signature, "a complete bundle needs a signature for the fast path"


def test_sharded_checkpoint_has_all_its_shards(corpus: Corpus) -> None:
    for rec in corpus.saves["sharded"]:
        prefix = Path(rec["prefix"])
        shards = _data_files(prefix)
        totals = {int(re.sub(r".*-of-", "", name)) for name in shards}
        assert len(totals) == 1
        (total,) = totals
        assert total >= 3 and len(shards) == total  # the trainer forces several shards (4 here)
        index = prefix.with_name(prefix.name + ".index").read_bytes()
        header = tb.read_header(index)
        assert header.num_shards == total and header.is_object_graph
        # Every shard holds tensor data (list_tensors' sizes add up to them: see below).
        assert all((prefix.parent / name).stat().st_size > 0 for name in shards)
    found = scan_run(corpus.run_dir("sharded"))
    assert all(f.state == COMPLETE and len(f.files) == 1 + total for f in found)


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded"])
def test_header_of_real_indexes_and_of_their_damaged_copies(corpus: Corpus, kind: str) -> None:
    """read_header on real indexes: the format, the shard count and the bytes each data file
    holds; every truncation and every single-bit corruption is refused or changes nothing."""
    rng = random.Random(7)
    for rec in corpus.saves[kind]:
        prefix = Path(rec["prefix"])
        data = prefix.with_name(prefix.name + ".index").read_bytes()
        header = tb.read_header(data)
        assert header.is_object_graph is (kind != "tf1")
        shards = sorted(prefix.parent.glob(prefix.name + ".data-*"))
        assert header.num_shards == len(shards)
        assert header.shard_bytes and header.shard_bytes == {
            i: p.stat().st_size for i, p in enumerate(shards) if p.stat().st_size
        }
        for n in range(0, len(data), max(1, len(data) // 40)):
            with pytest.raises(tb.BundleError):
                tb.read_header(data[:n])
        for _ in range(40):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            try:
                assert tb.read_header(bytes(flipped)) == header
            except tb.BundleError:
                pass


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded"])
def test_list_tensors_matches_tensorflow(corpus: Corpus, kind: str) -> None:
    prefixes = [rec["prefix"] for rec in corpus.saves[kind]]
    assert prefixes and all(p in corpus.variables for p in prefixes)
    for prefix in prefixes:
        oracle = corpus.variables[prefix]
        tensors = tb.list_tensors(Path(prefix + ".index").read_bytes())
        names = [t.name for t in tensors]
        assert names == sorted(names), "index entries come in key order"
        assert {t.name: list(t.shape) for t in tensors} == dict(oracle["variables"])
        assert {t.name: t.dtype for t in tensors} == oracle["dtypes"]
        header = tb.read_header(Path(prefix + ".index").read_bytes())
        assert header.is_object_graph is (kind != "tf1")
        assert all(0 <= t.shard < header.num_shards for t in tensors)
        # Sizes are right, also for tensors the sharding policy split into slices: every
        # numeric tensor is dense, and together the tensors fill the data shards exactly.
        for t in tensors:
            if t.dtype in ITEMSIZE:
                assert t.size == ITEMSIZE[t.dtype] * math.prod(t.shape), t
        data_bytes = sum(
            p.stat().st_size for p in Path(prefix).parent.glob(Path(prefix).name + ".data-*")
        )
        assert sum(t.size for t in tensors) == data_bytes


def test_slice_keys_name_their_tensor() -> None:
    # EncodeTensorNameSlice: OrderedCode number 0, the name as an OrderedCode string, the slice.
    def key(name: bytes) -> bytes:
        escaped = b"".join(
            b"\0\xff" if c == 0 else b"\xff\0" if c == 0xFF else bytes([c]) for c in name
        )
        return b"\0" + escaped + b"\0\1" + b"\x01\x02\x80\xa0"

    for name in [b"model/w1/.ATTRIBUTES/VARIABLE_VALUE", b"a\xff\x01", b"a\0b", b"\xff\xff"]:
        assert tb._slice_owner(key(name)) == name


def test_keras_checkpoints_parse_step_and_metric_from_the_name(corpus: Corpus) -> None:
    run = corpus.run_dir("keras")
    found = _by_prefix(scan_run(run, TEMPLATE))
    saves = corpus.saves["keras"]
    assert len(found) == 2 * len(saves)
    for rec in saves:
        model_path, weights_path = rec["files"]
        model, weights = found[model_path], found[weights_path]
        assert (model.format, model.step, model.state) == ("keras", rec["step"], COMPLETE)
        # ModelCheckpoint formats val_loss with .2f into the name; that is all the name can tell.
        assert model.metrics == {"val_loss": float(f"{rec['metrics']['val_loss']:.2f}")}
        assert model.files == (Path(model_path).name,)
        assert model.size == Path(model_path).stat().st_size and not model.has_meta
        # The weights template is not the configured one: the step falls back to the number.
        assert (weights.format, weights.step, weights.state) == (
            "keras_weights",
            rec["step"],
            COMPLETE,
        )
        assert weights.metrics == {}


@pytest.mark.parametrize(
    ("template", "name", "expected"),
    [
        (TEMPLATE, "model.03-0.41.keras", (3, {"val_loss": 0.41})),
        (TEMPLATE, "model.12-nan.keras", (12, {"val_loss": float("nan")})),
        (TEMPLATE, "model.03-0.41.weights.h5", None),
        (TEMPLATE, "modelX03-0.41.keras", None),  # the '.' in the template is literal
        ("w.{epoch}.weights.h5", "w.7.weights.h5", (7, {})),
        (
            "{epoch:03d}-{val_acc:.4f}-{loss:.1e}.keras",
            "004-0.9500-1.2e-03.keras",
            (4, {"val_acc": 0.95, "loss": 0.0012}),
        ),
        (
            "{epoch:03d}_{val_acc:.4f}_{loss:.1e}.keras",
            "004_0.9500_1.2e-03.keras",
            (4, {"val_acc": 0.95, "loss": 0.0012}),
        ),
        # Field names that also occur in the literal text or in another field's name.
        ("epoch{epoch:02d}.keras", "epoch05.keras", (5, {})),
        (
            "ckpt-{epoch:02d}-val_loss{val_loss:.2f}-loss{loss:.2f}.keras",
            "ckpt-02-val_loss0.50-loss0.40.keras",
            (2, {"val_loss": 0.5, "loss": 0.4}),
        ),
    ],
)
def test_keras_template(template: str, name: str, expected: object) -> None:
    got = KerasTemplate(template).parse(name)
    if expected is None or got is None:
        assert got == expected
        return
    step, metrics = got
    exp_step, exp_metrics = expected  # type: ignore[misc]
    assert step == exp_step
    assert metrics.keys() == exp_metrics.keys()
    for key, value in exp_metrics.items():
        assert metrics[key] == pytest.approx(value, nan_ok=True)


# ------------------------------------------------------------------ partial writes


@pytest.mark.parametrize("kind", ["tf1", "tf2"])
def test_truncated_index_is_incomplete_then_corrupt(
    corpus: Corpus, tmp_path: Path, kind: str
) -> None:
    run = corpus.copy(kind, tmp_path / kind)
    rec = corpus.saves[kind][1]
    index = run / (Path(rec["prefix"]).name + ".index")
    data = index.read_bytes()
    index.write_bytes(data[: len(data) // 2])
    prefix = str(run / Path(rec["prefix"]).name)

    found = _by_prefix(scan_run(run, now=_fresh(index), stale_after=STALE))
    f = found[prefix]
    assert f.state == INCOMPLETE and "footer" in (f.reason or "")
    assert f.step == rec["step"]
    others = [g for p, g in found.items() if p != prefix]
    assert len(others) == len(corpus.saves[kind]) - 1
    assert all(g.state == COMPLETE for g in others)

    f = _by_prefix(scan_run(run, now=_stale(index), stale_after=STALE))[prefix]
    assert f.state == CORRUPT and "truncated" in (f.reason or "")


def test_missing_data_shard_is_corrupt_at_once(corpus: Corpus, tmp_path: Path) -> None:
    run = corpus.copy("sharded", tmp_path / "sharded")
    rec = corpus.saves["sharded"][0]
    name = Path(rec["prefix"]).name
    shards = _data_files(run / name)
    missing = shards[2]
    (run / missing).unlink()
    total = re.sub(r".*-of-", "", missing)

    # Fresh or not: the index is whole, so a shard it names that is absent is a loss.
    found = _by_prefix(scan_run(run, now=_fresh(run / (name + ".index")), stale_after=STALE))
    f = found[str(run / name)]
    assert f.state == CORRUPT
    assert "missing" in (f.reason or "") and "00002" in (f.reason or "")
    assert total in (f.reason or "")
    assert missing not in f.files and len(f.files) == len(shards)  # index + remaining shards
    other = found[str(run / Path(corpus.saves["sharded"][1]["prefix"]).name)]
    assert other.state == COMPLETE


def test_data_without_index_is_incomplete_then_corrupt(corpus: Corpus, tmp_path: Path) -> None:
    run = corpus.copy("tf2", tmp_path / "tf2")
    name = Path(corpus.saves["tf2"][-1]["prefix"]).name
    (run / (name + ".index")).unlink()
    data = run / _data_files(run / name)[0]

    f = _by_prefix(scan_run(run, now=_fresh(data), stale_after=STALE))[str(run / name)]
    assert f.state == INCOMPLETE and "index" in (f.reason or "")
    assert f.files == (data.name,) and f.step == corpus.saves["tf2"][-1]["step"]
    assert not f.has_meta

    f = _by_prefix(scan_run(run, now=_stale(data), stale_after=STALE))[str(run / name)]
    assert f.state == CORRUPT and "no .index" in (f.reason or "")


def test_meta_arriving_after_the_checkpoint(
    corpus: Corpus, tmp_path: Path, open_spy: _OpenSpy
) -> None:
    run = corpus.copy("tf1", tmp_path / "tf1")
    rec = corpus.saves["tf1"][-1]
    name = Path(rec["prefix"]).name
    held = tmp_path / "held"
    held.mkdir()
    os.replace(run / (name + ".meta"), held / (name + ".meta"))

    before = _by_prefix(scan_run(run))[str(run / name)]
    # The index alone says TF1 (no object graph); the meta graph is simply not there yet.
    assert (before.state, before.format, before.has_meta) == (COMPLETE, "tf1", False)
    assert not any(n.endswith(".meta") for n in before.files)

    # Rescanning with the signature known must not change the answer (nor re-read the index).
    known = {before.prefix: before.signature}
    open_spy.paths.clear()
    again = _by_prefix(scan_run(run, known=known))[before.prefix]
    assert run / (name + ".index") not in open_spy.paths
    assert (again.state, again.format, again.has_meta) == (COMPLETE, "tf1", False)
    assert again.signature == before.signature

    os.replace(held / (name + ".meta"), run / (name + ".meta"))  # keeps the old mtime
    after = _by_prefix(scan_run(run, known=known))[str(run / name)]
    assert (after.state, after.format, after.has_meta) == (COMPLETE, "tf1", True)
    assert name + ".meta" in after.files
    assert after.signature != before.signature
    assert after.size == before.size + (run / (name + ".meta")).stat().st_size


TEMP_NAMES = [
    "x.index.tempstate123",
    "model.ckpt-7.data-00000-of-00001.tempstate5566",
    "checkpoint.tmp1234",
    "model.ckpt-7.meta.tmp99",
    "ckpt-5_temp",
]


@pytest.mark.parametrize("name", TEMP_NAMES)
def test_temp_names_are_recognised(name: str) -> None:
    assert is_temp_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "model.ckpt-7.index",
        "model.ckpt-7.meta",
        "ckpt-5.data-00000-of-00001",
        "model.03-0.41.keras",
        "weights.03.weights.h5",
        "checkpoint",
        "events.out.tfevents.1700000000.host",
        "eval",
        "temperature-5.index",
    ],
)
def test_real_names_are_not_temp(name: str) -> None:
    assert not is_temp_name(name)


def test_temp_names_are_never_checkpoints(corpus: Corpus, tmp_path: Path) -> None:
    run = corpus.copy("tf2", tmp_path / "tf2")
    real = _by_prefix(scan_run(run))
    index = run / (Path(corpus.saves["tf2"][0]["prefix"]).name + ".index")
    data = run / _data_files(run / Path(corpus.saves["tf2"][0]["prefix"]).name)[0]
    # What TF1 Saver, TF2 CheckpointManager and atomic_write_string_to_file leave mid-write,
    # with real contents so only the name can tell them apart.
    shutil.copy(index, run / "x.index.tempstate123")
    shutil.copy(data, run / "model.ckpt-7.data-00000-of-00001.tempstate5566")
    shutil.copy(index, run / "model.ckpt-7.index.tempstate77")
    (run / "model.ckpt-7.meta.tmp99").write_bytes(b"\0" * 64)
    (run / "checkpoint.tmp1234").write_text('model_checkpoint_path: "ckpt-5"\n')
    temp_dir = run / "ckpt-5_temp"
    temp_dir.mkdir()
    shutil.copy(index, temp_dir / "part-00000-of-00001.index")
    shutil.copy(data, temp_dir / "part-00000-of-00001.data-00000-of-00001")
    (temp_dir / "events.out.tfevents.1.host").write_bytes(b"")
    (run / "model.01-0.50.keras.tmp3").write_bytes(b"PK")
    mtime = max(p.stat().st_mtime for p in run.iterdir())

    found = _by_prefix(scan_run(run, TEMPLATE, now=mtime + STALE + 1, stale_after=STALE))
    assert sorted(found) == sorted(real)
    assert all(f.state == COMPLETE for f in found.values())
    assert not any(is_temp_name(n) for f in found.values() for n in f.files)
    assert all(temp_dir not in p.parents for p in event_files(run))


def test_garbage_index_of_plausible_size_is_corrupt(corpus: Corpus, tmp_path: Path) -> None:
    run = corpus.copy("tf2", tmp_path / "tf2")
    names = [Path(rec["prefix"]).name for rec in corpus.saves["tf2"]]
    rng = random.Random(1234)
    # (1) pure garbage, exactly as long as the real index
    first = run / (names[0] + ".index")
    garbage = b"\xa5" + rng.randbytes(first.stat().st_size - 1)
    first.write_bytes(garbage)
    # (2) the real header bytes and footer (magic intact) around a garbage body
    second = run / (names[1] + ".index")
    real = second.read_bytes()
    second.write_bytes(real[:16] + rng.randbytes(len(real) - 16 - 48) + real[-48:])
    assert second.read_bytes()[-8:] == sst.TABLE_MAGIC.to_bytes(8, "little")  # footer intact

    found = _by_prefix(scan_run(run, now=_fresh(second), stale_after=STALE))
    for name in names[:2]:
        f = found[str(run / name)]
        assert f.state == CORRUPT, f
        assert (f.reason or "").startswith("index:")
    assert found[str(run / names[2])].state == COMPLETE
    with pytest.raises(tb.BundleError):
        tb.read_header(garbage)


def test_index_block_checksum_mismatch_is_corrupt(corpus: Corpus, tmp_path: Path) -> None:
    """One flipped bit in a tensor name: TensorFlow refuses it ("block checksum mismatch")."""
    run = corpus.copy("tf2", tmp_path / "tf2")
    name = Path(corpus.saves["tf2"][0]["prefix"]).name
    index = run / (name + ".index")
    data = bytearray(index.read_bytes())
    at = data.find(b"model/b1")
    assert at > 0
    data[at + 6] ^= 0x01  # "model/b1" -> "model/b0": still a well-formed table
    index.write_bytes(bytes(data))
    f = _by_prefix(scan_run(run, now=_fresh(index)))[str(run / name)]
    assert f.state == CORRUPT and "checksum" in (f.reason or "")


@pytest.mark.parametrize("which", ["keras", "keras_weights"])
def test_truncated_keras_file_is_incomplete_then_corrupt(
    corpus: Corpus, tmp_path: Path, which: str
) -> None:
    run = corpus.copy("keras", tmp_path / "keras")
    rec = corpus.saves["keras"][-1]
    path = run / Path(rec["files"][0 if which == "keras" else 1]).name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    found = _by_prefix(scan_run(run, TEMPLATE, now=_fresh(path), stale_after=STALE))
    f = found[str(path)]
    assert (f.format, f.state) == (which, INCOMPLETE)
    assert f.reason and f.step == rec["step"] and f.size == len(data) // 2
    assert all(g.state == COMPLETE for p, g in found.items() if p != str(path))

    f = _by_prefix(scan_run(run, TEMPLATE, now=_stale(path), stale_after=STALE))[str(path)]
    assert f.state == CORRUPT and f.reason


def test_symlinked_files_are_corrupt_and_not_followed(
    corpus: Corpus, tmp_path: Path, open_spy: _OpenSpy
) -> None:
    run = corpus.copy("tf2", tmp_path / "tf2")
    name = Path(corpus.saves["tf2"][0]["prefix"]).name
    outside = tmp_path / "outside"
    outside.mkdir()
    index = run / (name + ".index")
    os.replace(index, outside / index.name)
    index.symlink_to(outside / index.name)
    keras_run = corpus.copy("keras", tmp_path / "keras")
    for p in keras_run.iterdir():
        os.replace(p, run / p.name)
    keras_file = run / Path(corpus.saves["keras"][0]["files"][0]).name
    os.replace(keras_file, outside / keras_file.name)
    keras_file.symlink_to(outside / keras_file.name)
    dangling = run / "ckpt-99.index"
    dangling.symlink_to(outside / "nowhere.index")
    shutil.copy(run / _data_files(run / name)[0], run / "ckpt-99.data-00000-of-00001")

    found = _by_prefix(scan_run(run, TEMPLATE))
    for path in (run / name, keras_file, run / "ckpt-99"):
        f = found[str(path)]
        assert f.state == CORRUPT and "symlink" in (f.reason or ""), f
    assert not any(p.parent == outside for p in open_spy.paths), open_spy.paths
    assert index not in open_spy.paths and keras_file not in open_spy.paths
    assert dangling not in open_spy.paths
    complete = [f for f in found.values() if f.state == COMPLETE]
    assert len(complete) == len(found) - 3


def test_known_signature_fast_path(corpus: Corpus, tmp_path: Path, open_spy: _OpenSpy) -> None:
    run = corpus.copy("tf1", tmp_path / "run")
    for p in corpus.copy("keras", tmp_path / "keras").iterdir():
        os.replace(p, run / p.name)
    first = scan_run(run, TEMPLATE)
    assert len(first) == len(corpus.saves["tf1"]) + 2 * len(corpus.saves["keras"])
    assert all(f.state == COMPLETE for f in first)
    opened_first = set(open_spy.paths)
    # Every index and Keras file was read once, and the data shard holding each TF
    # checkpoint's global_step (its step).
    tf1 = [f for f in first if f.format == "tf1"]
    assert len(open_spy.paths) == len(opened_first) == len(first) + len(tf1)

    known = {f.prefix: f.signature for f in first}
    open_spy.paths.clear()
    second = scan_run(run, TEMPLATE, known)
    assert open_spy.paths == []
    assert sorted(second, key=lambda f: f.prefix) == sorted(first, key=lambda f: f.prefix)

    # A changed index (new mtime) is read again; the others still are not.
    target = run / (Path(corpus.saves["tf1"][0]["prefix"]).name + ".index")
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    open_spy.paths.clear()
    third = _by_prefix(scan_run(run, TEMPLATE, known))
    assert open_spy.paths == [target, run / _data_files(target.with_suffix(""))[0]]
    assert third[str(target)[: -len(".index")]].state == COMPLETE


def test_known_signature_of_a_partial_index_does_not_make_it_complete(
    corpus: Corpus, tmp_path: Path
) -> None:
    run = corpus.copy("tf2", tmp_path / "tf2")
    name = Path(corpus.saves["tf2"][0]["prefix"]).name
    index = run / (name + ".index")
    index.write_bytes(index.read_bytes()[:100])
    partial = _by_prefix(scan_run(run, now=_fresh(index)))[str(run / name)]
    assert partial.state == INCOMPLETE
    again = _by_prefix(scan_run(run, known={partial.prefix: partial.signature}, now=_fresh(index)))
    assert again[str(run / name)].state == INCOMPLETE


def test_files_vanishing_during_the_scan(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer deleting an old checkpoint between listdir and stat: not a corrupt checkpoint."""
    run = corpus.copy("tf2", tmp_path / "tf2")
    name = Path(corpus.saves["tf2"][0]["prefix"]).name
    (run / (name + ".index")).unlink()
    real_stat = formats.tf.stat_entry
    monkeypatch.setattr(
        formats.tf, "stat_entry", lambda e: None if e.name.startswith(name + ".") else real_stat(e)
    )
    found = _by_prefix(scan_run(run))
    assert str(run / name) not in found
    assert len(found) == len(corpus.saves["tf2"]) - 1


def test_missing_or_empty_run_dir(tmp_path: Path) -> None:
    # A directory that cannot be listed raises (an empty result would mean "every checkpoint
    # is gone"); the caller decides between gone and unreadable.
    with pytest.raises(FileNotFoundError):
        scan_run(tmp_path / "absent")
    assert scan_run(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        event_files(tmp_path / "absent")
    assert event_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["tf1", "tf2"])
def test_event_files_found_at_the_root_and_in_eval(corpus: Corpus, kind: str) -> None:
    run = corpus.run_dir(kind)
    files = event_files(run)
    expected = sorted([*run.glob("events.out.tfevents.*"), *run.glob("eval/events.out.tfevents.*")])
    assert files == expected
    assert {p.parent for p in files} == {run, run / "eval"}
