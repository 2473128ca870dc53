"""The ``checkpoint`` state file: parsed from REAL TensorFlow output, and rewritten so that real
TensorFlow (``latest_checkpoint``, ``get_checkpoint_state``, a restarted ``CheckpointManager``)
still reads it after a prune.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import text_encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.io import statefile
from ckptd.io.statefile import CheckpointState, parse, render, without, write_atomic
from tests.conftest import ENV, Corpus

# Paths with everything a text proto string must escape, and unicode (incl. line separators).
_CHARS = st.one_of(
    st.sampled_from(list("\"'\\\n\r\t\0\x7f\x85\u2028\u00e9\u00c3\u00a9/.-_ ")),
    st.characters(blacklist_categories=("Cs",)),
)
PATHS = st.text(_CHARS, max_size=40)
STAMPS = st.floats(allow_nan=False, allow_infinity=False, width=64)


def _remove_checkpoint(prefix: Path) -> None:
    for p in prefix.parent.glob(prefix.name + ".*"):
        p.unlink()


# ------------------------------------------------------------------ real files


def test_parse_real_tf1_state(corpus: Corpus) -> None:
    run = corpus.run_dir("tf1")
    state = statefile.read(run)
    assert state is not None
    newest = corpus.saves["tf1"][-1]["prefix"]
    # TF1 Saver writes absolute paths and no timestamps (with max_to_keep=None it lists only
    # the newest checkpoint).
    assert state.model_checkpoint_path == newest
    assert state.all_model_checkpoint_paths[-1] == newest
    assert set(state.all_model_checkpoint_paths) <= {rec["prefix"] for rec in corpus.saves["tf1"]}
    assert all(Path(p).is_absolute() for p in state.all_model_checkpoint_paths)
    assert state.all_model_checkpoint_timestamps == []
    assert state.resolve(run, state.model_checkpoint_path) == Path(newest)


@pytest.mark.parametrize("kind", ["tf2", "sharded"])
def test_parse_real_tf2_state(corpus: Corpus, kind: str) -> None:
    run = corpus.run_dir(kind)
    state = statefile.read(run)
    assert state is not None
    saves = corpus.saves[kind]
    # CheckpointManager: relative paths, every kept checkpoint, one timestamp each.
    assert state.all_model_checkpoint_paths == [Path(rec["prefix"]).name for rec in saves]
    assert state.model_checkpoint_path == Path(saves[-1]["prefix"]).name
    assert [state.resolve(run, p) for p in state.all_model_checkpoint_paths] == [
        Path(rec["prefix"]) for rec in saves
    ]
    stamps = state.all_model_checkpoint_timestamps
    assert len(stamps) == len(saves) and stamps == sorted(stamps)
    for stamp, rec in zip(stamps, saves, strict=True):
        # Taken by the manager during the save; the trainer stamped the save right after.
        assert stamp <= rec["saved_at"] and rec["saved_at"] - stamp < 60
    assert state.last_preserved_timestamp is not None
    assert state.last_preserved_timestamp <= stamps[0]
    assert parse(render(state)) == state


def test_read_absent_state_file(tmp_path: Path) -> None:
    assert statefile.read(tmp_path) is None


# ------------------------------------------------------------------ text format


@settings(max_examples=300, deadline=None)
@given(
    current=PATHS,
    paths=st.lists(PATHS, max_size=5),
    stamps=st.lists(STAMPS, max_size=5),
    preserved=st.none() | STAMPS,
)
def test_render_parse_round_trip(
    current: str, paths: list[str], stamps: list[float], preserved: float | None
) -> None:
    state = CheckpointState(current, paths, stamps, preserved)
    text = render(state)
    assert parse(text) == state
    assert text.endswith("\n") and text.count("\n") == 1 + len(paths) + len(stamps) + (
        preserved is not None
    ), "one field per line, whatever the paths contain"


@settings(max_examples=300, deadline=None)
@given(PATHS)
def test_strings_agree_with_protobuf_text_format(path: str) -> None:
    """protobuf's text_format escaping is what TensorFlow writes, and its parser what TF reads."""
    # What text_format.MessageToString prints: octal UTF-8 bytes (TF's default), or raw UTF-8.
    for escaped in (
        text_encoding.CEscape(path.encode("utf-8"), as_utf8=False),
        text_encoding.CEscape(path, as_utf8=True),
    ):
        assert parse(f'model_checkpoint_path: "{escaped}"\n').model_checkpoint_path == path
    line = render(CheckpointState(path)).splitlines()[0]
    quoted = line.removeprefix("model_checkpoint_path: ")
    assert quoted[0] == quoted[-1] == '"'
    assert text_encoding.CUnescape(quoted[1:-1]).decode("utf-8") == path
    # Byte for byte what TensorFlow itself would write for this path.
    assert quoted[1:-1] == text_encoding.CEscape(path.encode("utf-8"), as_utf8=False)


def test_parse_what_tensorflow_writes_for_unusual_paths() -> None:
    # As python protobuf's text_format (TensorFlow's writer) prints them.
    text = textwrap.dedent(
        r"""
        model_checkpoint_path: "/runs/caf\303\251/it\'s \"q\"/ckpt-2"
        all_model_checkpoint_paths: "back\\slash/ckpt-1"
        all_model_checkpoint_paths: "/runs/caf\303\251/it\'s \"q\"/ckpt-2"
        all_model_checkpoint_timestamps: 1700000000.5
        all_model_checkpoint_timestamps: 1.7e9
        last_preserved_timestamp: 1699999999.25
        """
    )
    state = parse(text)
    assert state == CheckpointState(
        '/runs/café/it\'s "q"/ckpt-2',
        ["back\\slash/ckpt-1", '/runs/café/it\'s "q"/ckpt-2'],
        [1700000000.5, 1.7e9],
        1699999999.25,
    )


def test_parse_ignores_malformed_lines() -> None:
    text = (
        'model_checkpoint_path: "ckpt-3"\n'
        "# a comment\n"
        "all_model_checkpoint_paths: unquoted\n"
        'all_model_checkpoint_paths: "ckpt-3"\n'
        "all_model_checkpoint_timestamps: -\n"
        "all_model_checkpoint_timestamps: 1.2.3\n"
        "all_model_checkpoint_timestamps: 5e\n"
        "all_model_checkpoint_timestamps: 1700000000.0\n"
        "last_preserved_timestamp: e\n"
    )
    assert parse(text) == CheckpointState("ckpt-3", ["ckpt-3"], [1700000000.0], None)


# ------------------------------------------------------------------ without()


def test_without_relative_with_timestamps(tmp_path: Path) -> None:
    state = CheckpointState(
        "ckpt-4", ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"], [1.0, 2.0, 3.0, 4.0], 0.5
    )
    out = without(state, tmp_path, {tmp_path / "ckpt-2", tmp_path / "ckpt-9"})
    assert out == CheckpointState("ckpt-4", ["ckpt-1", "ckpt-3", "ckpt-4"], [1.0, 3.0, 4.0], 0.5)
    # Dropping the newest moves model_checkpoint_path to the newest remaining entry.
    out = without(state, tmp_path, {tmp_path / "ckpt-4", tmp_path / "ckpt-1"})
    assert out == CheckpointState("ckpt-3", ["ckpt-2", "ckpt-3"], [2.0, 3.0], 0.5)
    assert state.all_model_checkpoint_paths == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]  # untouched
    # Everything removed: nothing left to point at.
    out = without(state, tmp_path, {tmp_path / f"ckpt-{i}" for i in range(1, 5)})
    assert out == CheckpointState("", [], [], 0.5)


def test_without_absolute_paths(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"model.ckpt-{i}") for i in (10, 20, 30)]
    state = CheckpointState(paths[-1], list(paths))
    out = without(state, tmp_path / "elsewhere", {Path(paths[0])})
    assert out == CheckpointState(paths[-1], paths[1:])
    out = without(state, tmp_path, {Path(paths[2])})
    assert out == CheckpointState(paths[1], paths[:2])
    # Absolute entries are matched by their full path: the same names in another directory
    # (e.g. a copied run whose state still names the original) are not these checkpoints.
    other = tmp_path / "copy"
    assert without(state, other, {other / Path(p).name for p in paths}) == state


def test_without_misaligned_timestamps_drops_them(tmp_path: Path) -> None:
    state = CheckpointState("b", ["a", "b"], [1.0])
    assert without(state, tmp_path, {tmp_path / "a"}) == CheckpointState("b", ["b"], [])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 8),
    data=st.data(),
)
def test_without_property(n: int, data: st.DataObject) -> None:
    run = Path("/runs/r")
    paths = [f"ckpt-{i}" for i in range(n)]
    stamps = [1000.0 + i for i in range(n)]
    current = data.draw(st.sampled_from(paths)) if paths else ""
    removed_idx = data.draw(st.sets(st.integers(0, max(n - 1, 0)))) if n else set()
    removed = {run / paths[i] for i in removed_idx}
    out = without(CheckpointState(current, paths, stamps, 1.0), run, removed)
    keep = [i for i in range(n) if i not in removed_idx]
    assert out.all_model_checkpoint_paths == [paths[i] for i in keep]
    assert out.all_model_checkpoint_timestamps == [stamps[i] for i in keep]
    assert out.last_preserved_timestamp == 1.0
    if current and run / current not in removed:
        assert out.model_checkpoint_path == current
    else:
        assert out.model_checkpoint_path == (paths[keep[-1]] if keep else "")


# ------------------------------------------------------------------ write_atomic


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "old"\n')
    state = CheckpointState("ckpt-2", ["ckpt-1", "ckpt-2"], [1.5, 2.5], 1.0)
    write_atomic(tmp_path, state)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert statefile.read(tmp_path) == state
    assert (tmp_path / "checkpoint").read_text(encoding="utf-8") == render(state)


def test_write_atomic_does_not_follow_a_symlinked_state_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").symlink_to(target)
    write_atomic(run, CheckpointState("ckpt-1", ["ckpt-1"]))
    assert target.read_text() == "precious\n"
    assert not (run / "checkpoint").is_symlink()
    assert statefile.read(run) == CheckpointState("ckpt-1", ["ckpt-1"])


def test_write_atomic_failure_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()  # rename onto a directory fails
    with pytest.raises(OSError):
        write_atomic(tmp_path, CheckpointState("ckpt-1", ["ckpt-1"]))
    assert os.listdir(tmp_path) == ["checkpoint"]


# ------------------------------------------------------------------ real TensorFlow reads it

TF_CHECK = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    out = {}
    for d in sys.argv[1:]:
        st = tf.train.get_checkpoint_state(d)
        entry = {
            "latest": tf.train.latest_checkpoint(d),
            "model": st.model_checkpoint_path,
            "all": list(st.all_model_checkpoint_paths),
            "stamps": list(st.all_model_checkpoint_timestamps),
        }
        if st.all_model_checkpoint_timestamps:
            manager = tf.train.CheckpointManager(tf.train.Checkpoint(), d, max_to_keep=None)
            entry["manager"] = list(manager.checkpoints)
        out[d] = entry
    json.dump(out, sys.stdout)
    """
)


@pytest.mark.tf
def test_tensorflow_reads_the_rewritten_state(corpus: Corpus, tmp_path: Path) -> None:
    # TF2: prune the middle checkpoint (relative paths, timestamps must stay aligned).
    tf2 = corpus.copy("tf2", tmp_path / "tf2")
    names = [Path(rec["prefix"]).name for rec in corpus.saves["tf2"]]
    state2 = statefile.read(tf2)
    assert state2 is not None and state2.all_model_checkpoint_paths == names
    _remove_checkpoint(tf2 / names[1])
    new2 = without(state2, tf2, {tf2 / names[1]})
    write_atomic(tf2, new2)

    # TF1: absolute paths, as a Saver with max_to_keep >= 3 lists them; prune the newest.
    tf1 = corpus.copy("tf1", tmp_path / "tf1")
    prefixes1 = [str(tf1 / Path(rec["prefix"]).name) for rec in corpus.saves["tf1"]]
    write_atomic(tf1, CheckpointState(prefixes1[-1], list(prefixes1)))
    _remove_checkpoint(Path(prefixes1[-1]))
    new1 = without(statefile.read(tf1) or CheckpointState(), tf1, {Path(prefixes1[-1])})
    write_atomic(tf1, new1)

    # Paths only a correct escaper gets right (absolute, so TF reports them unchanged).
    odd = tmp_path / "odd"
    odd.mkdir()
    odd_paths = [
        str(odd / 'it\'s "quoted"' / "ckpt-1"),
        str(odd / "back\\slash\ttab" / "ckpt-2"),
        str(odd / "café ünï\u2028côdé" / "ckpt-3"),
    ]
    odd_state = CheckpointState(odd_paths[-1], list(odd_paths), [1.0, 2.0, 3.0], 0.5)
    write_atomic(odd, odd_state)

    for d in (tf1, tf2, odd):
        assert not [n for n in os.listdir(d) if n.startswith("checkpoint.")], "temp file left"

    proc = subprocess.run(
        [sys.executable, "-c", TF_CHECK, str(tf1), str(tf2), str(odd)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)

    remaining2 = [str(tf2 / n) for n in (names[0], names[2])]
    assert got[str(tf2)]["latest"] == remaining2[-1]
    assert got[str(tf2)]["all"] == remaining2
    assert got[str(tf2)]["stamps"] == pytest.approx(new2.all_model_checkpoint_timestamps)
    assert got[str(tf2)]["stamps"] == pytest.approx(
        [state2.all_model_checkpoint_timestamps[i] for i in (0, 2)]
    )
    assert got[str(tf2)]["manager"] == remaining2  # a restarted CheckpointManager agrees

    assert got[str(tf1)]["latest"] == prefixes1[-2]
    assert got[str(tf1)]["model"] == prefixes1[-2]
    assert got[str(tf1)]["all"] == prefixes1[:-1]

    assert got[str(odd)]["model"] == odd_paths[-1]
    assert got[str(odd)]["all"] == odd_paths
    assert got[str(odd)]["stamps"] == [1.0, 2.0, 3.0]
    assert got[str(odd)]["manager"] == odd_paths
    assert got[str(odd)]["latest"] is None  # nothing on disk under those prefixes
