"""The golden corpus (tests/golden) against the TensorFlow of this environment.

The fast tier reads files TensorFlow wrote once and that are checked in; the test marked ``tf``
trains the same runs now and checks that ckptd's readers make the same of both, so that a
TensorFlow release that changes a format is noticed. If it fails: fix the readers for the new
format, then run tests/golden/regenerate.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptd.io import statefile
from ckptd.io.eventfiles import metric_prefix, read_scalars
from ckptd.io.formats import COMPLETE, event_files, scan_run
from ckptd.io.formats import tensorbundle as tb
from tests.conftest import CORPUS, GOLDEN, Corpus

TEMPLATE = "model.{epoch:02d}-{val_loss:.2f}.keras"


def parsed(corpus: Corpus, kind: str) -> dict[str, Any]:
    """What ckptd reads from one run, without what differs between two trainings of it
    (event file names hold the time; Keras names and metric values hold the losses)."""
    run = corpus.run_dir(kind)
    found = sorted(scan_run(run, TEMPLATE), key=lambda f: (f.format, f.step or 0))
    checkpoints = [
        (f.format, f.step, f.state, f.has_meta, sorted(f.metrics), len(f.files)) for f in found
    ]
    bundles = {
        Path(f.prefix).name: (
            sorted(f.files),
            [
                (t.name, t.dtype, t.shape, t.shard)
                for t in tb.list_tensors((run / f"{Path(f.prefix).name}.index").read_bytes())
            ],
        )
        for f in found
        if f.format in ("tf1", "tf2")
    }
    events = {}
    for path in event_files(run):
        prefix = metric_prefix(run, path)
        result = read_scalars(path, 0, prefix, root=run)
        events[prefix] = (
            [(s.name, s.step) for s in result.scalars],
            result.error,
            result.skipped,
            result.skip_reason,
        )
    state = statefile.read(run)
    states = state and (
        Path(state.model_checkpoint_path).name,
        [Path(p).name for p in state.all_model_checkpoint_paths],
        len(state.all_model_checkpoint_timestamps),
    )
    return {"checkpoints": checkpoints, "bundles": bundles, "events": events, "state": states}


@pytest.mark.parametrize("kind", list(CORPUS))
def test_golden_runs_are_what_the_trainer_reported(golden: Corpus, kind: str) -> None:
    """Every save the manifest records is found complete, with the mtimes in the write order."""
    found = {f.prefix: f for f in scan_run(golden.run_dir(kind), TEMPLATE)}
    saves = golden.saves[kind]
    assert saves and {rec["prefix"] for rec in saves} <= set(found)
    assert all(f.state == COMPLETE for f in found.values())
    mtimes = [found[rec["prefix"]].mtime for rec in saves]
    assert mtimes == sorted(mtimes)
    assert all(rec["prefix"] in golden.variables for rec in saves if kind != "keras")


@pytest.mark.tf
def test_tensorflow_of_today_writes_what_the_golden_corpus_holds(
    golden: Corpus, trained: Corpus
) -> None:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    for kind in CORPUS:
        assert parsed(trained, kind) == parsed(golden, kind), (
            f"{kind}: TensorFlow {manifest['tensorflow']} wrote the golden corpus; "
            "today's writes parse differently"
        )
        assert [(r["step"], sorted(r["metrics"])) for r in trained.saves[kind]] == [
            (r["step"], sorted(r["metrics"])) for r in golden.saves[kind]
        ]

    def by_name(variables: dict[str, Any]) -> dict[str, Any]:
        return {"/".join(p.split("/")[-2:]): v for p, v in variables.items()}  # kind/prefix

    assert by_name(trained.variables) == by_name(golden.variables)
