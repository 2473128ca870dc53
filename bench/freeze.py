"""Freeze/export: ckptd's verified, atomically published export of one checkpoint vs the plain
freeze script everybody writes.

Corpus: ONE real TF1 checkpoint (``python -m ckptd.worker.train tf1 --steps 20 --save-every 20``:
``model.ckpt-20`` with its ``.meta``, and ``heldout.npz``), recorded in a fresh database by
``ckptd run --once``.

ckptd, in this process: ``Freezer(Store(engine), WorkerClient()).freeze_run(run, watch, checkpoint,
force=True)`` — the export-intent row, the worker's ``export`` request(s) into a hidden temp dir
(fsync'd), its ``verify`` request (the export loaded and run on the first rows of heldout.npz,
compared with the checkpoint's own outputs), the rename to ``export_dir/<run>/20/``, and the
commits. Timed as a whole, for format ``["saved_model", "frozen_graph"]``, ``["frozen_graph"]``
and ``["saved_model"]``, each

  * cold: a new WorkerClient, so the time includes spawning the worker and ``import tensorflow``;
  * warm: a new WorkerClient already started (one ``ping``: TensorFlow imported, no graph cached
    yet), then ``freeze_run``; and "warm, repeated": the same export again (the graph is cached).

Anchor (same checkpoint): the plain script — ``import tensorflow``, ``import_meta_graph``,
``restore``, then ``convert_variables_to_constants`` + write ``frozen.pb`` and/or the
``SavedModelBuilder`` with a predict signature — run as a fresh process (spawn → its result line,
printed once the export is written; and spawn → exit), and its own in-process time after
``import tensorflow`` (measured inside the script). It neither verifies nor fsyncs nor publishes
atomically; ckptd does all three. Compared: cold ckptd vs the fresh process up to its result
(ckptd's worker stays alive, so neither side pays TensorFlow's teardown); warm ckptd vs the
script's in-process time.

Usage: .venv/bin/python bench/freeze.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import (
    ENV,
    PY,
    RUN_CWD,
    check,
    ckptd_cmd,
    fmt,
    fmt_ratio,
    median,
    print_table,
    ratio,
    save_result,
    summary_row,
    timed_run,
    train,
    write_config,
)
from _inproc import RecordingClient, open_store, prepare_process, runs, watch_for

from ckptd.api.freeze import Freezer
from ckptd.store import reads
from ckptd.store.db import session_scope
from ckptd.store.handle import Store

STEP = 20
TARGET_VS_ANCHOR = 1.2  # ckptd / plain script, verification included
FORMATS = {
    "saved_model+frozen_graph": ("saved_model", "frozen_graph"),
    "frozen_graph": ("frozen_graph",),
    "saved_model": ("saved_model",),
}

SECTIONS = textwrap.dedent(
    """
    [watch.evaluate]
    evaluator = "meta_graph"
    data = "{data}"
    feed = {{ "x:0" = "x", "y_:0" = "y" }}
    fetch = {{ "eval/accuracy" = "accuracy:0" }}
    on_new = false

    [watch.freeze]
    format = {formats}
    export_dir = "{export_dir}"
    inputs = {{ x = "x:0" }}
    outputs = {{ y = "y:0" }}
    keep = 100
    """
)

# The plain freeze / SavedModel script (what ckptd replaces), one fresh process per export.
ANCHOR = textwrap.dedent(
    """
    import json, os, sys, time
    t0 = time.perf_counter()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    t1 = time.perf_counter()
    v1 = tf.compat.v1
    prefix, out, formats = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    os.makedirs(out)
    graph = tf.Graph()
    with graph.as_default():
        saver = v1.train.import_meta_graph(prefix + ".meta", clear_devices=True)
        sess = v1.Session(graph=graph)
        saver.restore(sess, prefix)
        if "frozen_graph" in formats:
            frozen = v1.graph_util.convert_variables_to_constants(
                sess, graph.as_graph_def(), ["y"])
            with open(os.path.join(out, "frozen.pb"), "wb") as f:
                f.write(frozen.SerializeToString())
        if "saved_model" in formats:
            builder = v1.saved_model.Builder(os.path.join(out, "saved_model"))
            signature = v1.saved_model.predict_signature_def(
                inputs={"x": graph.get_tensor_by_name("x:0")},
                outputs={"y": graph.get_tensor_by_name("y:0")})
            builder.add_meta_graph_and_variables(
                sess, [v1.saved_model.tag_constants.SERVING],
                signature_def_map={"serving_default": signature}, strip_default_attrs=True)
            builder.save()
        sess.close()
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1}), flush=True)
    """
)


def setup(work: Path) -> dict[str, Any]:
    root = work / "runs"
    run_dir = root / "mnist"
    saves = train("tf1", run_dir, "--steps", str(STEP), "--save-every", str(STEP))
    if len(saves) != 1:
        raise RuntimeError(f"expected 1 save, got {len(saves)}")
    db = work / "ckptd.db"
    record = write_config(work / "record.toml", root, db=db, runs="*")
    wall, proc = timed_run(ckptd_cmd(record, "run", "--once"))
    check(proc, "ckptd run --once")
    return {
        "root": root,
        "db": db,
        "npz": run_dir / "heldout.npz",
        "prefix": saves[0]["prefix"],
        "record_s": wall,
    }


def freezer_case(
    work: Path, corpus: dict[str, Any], name: str, formats: tuple[str, ...], reps: int
) -> dict[str, Any]:
    """Cold and warm ckptd exports with one format set."""
    export_dir = work / "exports" / name
    config = write_config(work / f"{name}.toml", corpus["root"], db=corpus["db"], runs="*")
    with config.open("a") as fh:
        fh.write(
            SECTIONS.format(
                data=corpus["npz"], formats=json.dumps(list(formats)), export_dir=export_dir
            )
        )
    cfg, engine = open_store(config)
    (run,) = runs(engine)
    watch = watch_for(cfg, run)
    with session_scope(engine) as s:
        (checkpoint,) = reads.checkpoints(s, run_id=run.id)

    def export(client: RecordingClient) -> tuple[float, Any]:
        freezer = Freezer(Store(engine), client)
        t0 = time.perf_counter()
        outcome = freezer.freeze_run(run, watch, checkpoint, force=True)
        wall = time.perf_counter() - t0
        if outcome.status != "published" or not outcome.verified:
            raise RuntimeError(f"freeze {name}: {outcome}")
        return wall, outcome

    cold, warm_first, warm_repeat, ping, verify_ms = [], [], [], [], []
    calls: list[list[dict[str, Any]]] = []
    warm_calls: list[list[dict[str, Any]]] = []
    outcome = None
    try:
        for _ in range(reps):
            client = RecordingClient()
            try:
                wall, outcome = export(client)
                cold.append(wall)
                calls.append(client.calls)
            finally:
                client.close()
            client = RecordingClient()
            try:
                ping.append(client.ping())
                client.calls.clear()
                wall, outcome = export(client)
                warm_first.append(wall)
                verify_ms += [c["wall_s"] * 1000 for c in client.calls if c["op"] == "verify"]
                warm_calls.append(list(client.calls))
                for _ in range(2):
                    wall, outcome = export(client)
                    warm_repeat.append(wall)
            finally:
                client.close()
    finally:
        engine.dispose()
    assert outcome is not None and outcome.path is not None
    published = sorted(p.name for p in Path(outcome.path).iterdir())
    expected = {"frozen.pb"} if "frozen_graph" in formats else set()
    if "saved_model" in formats:
        expected |= {"saved_model.pb", "variables"}
    if not expected <= set(published):
        raise RuntimeError(f"{outcome.path} holds {published}, expected {sorted(expected)}")
    leftovers = [p.name for p in Path(outcome.path).parent.iterdir() if p.name.startswith(".")]
    return {
        "formats": list(formats),
        "cold_s": cold,
        "warm_first_s": warm_first,
        "warm_repeat_s": warm_repeat,
        "ping_s": ping,
        "verify_warm_ms": verify_ms,
        "cold_calls": calls,
        "warm_calls": warm_calls,
        "published": outcome.path,
        "published_files": published,
        "temp_dirs_left": leftovers,
        "verified": outcome.verified,
    }


def anchor_case(work: Path, corpus: dict[str, Any], name: str, reps: int) -> dict[str, Any]:
    """The plain script as a fresh process: spawn → its result line (export written), and
    spawn → exit (TensorFlow's teardown included)."""
    script = work / "plain_freeze.py"
    script.write_text(ANCHOR)
    done, walls, inproc, imports = [], [], [], []
    for i in range(reps):
        out = work / "anchor" / f"{name}-{i}"
        cmd = [PY, str(script), corpus["prefix"], str(out), name.replace("+", ",")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=RUN_CWD, text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        t_done = time.perf_counter() - t0
        _rest, err = proc.communicate(timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not line.startswith("{"):
            raise RuntimeError(f"plain {name} script exited {proc.returncode}:\n{err[-3000:]}")
        rec = json.loads(line)
        done.append(t_done)
        walls.append(wall)
        inproc.append(rec["work_s"])
        imports.append(rec["import_s"])
    return {"done_s": done, "wall_s": walls, "work_s": inproc, "import_s": imports}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition instead of three")
    args = ap.parse_args()
    prepare_process()
    reps = 1 if args.quick else 3

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-freeze-") as tmp:
        work = Path(tmp)
        print(f"training one real TF1 checkpoint (step {STEP}) and recording it …", flush=True)
        corpus = setup(work)
        for name, formats in FORMATS.items():
            print(f"{name}: ckptd cold + warm, plain script × {reps} …", flush=True)
            # Interleaved per format set, so drift in machine load hits both sides alike.
            c = freezer_case(work, corpus, name, formats, reps)
            a = anchor_case(work, corpus, name, reps)
            results[name] = {"ckptd": c, "anchor": a}

    print()
    print(
        f"Exporting one TF1 checkpoint (medians of {reps}); ckptd includes verification, fsync, "
        "atomic publish and its database rows; the plain script does none of these"
    )
    print()
    rows = []
    summary = []
    met_all = True
    for name, r in results.items():
        c, a = r["ckptd"], r["anchor"]
        cold, a_done = median(c["cold_s"]), median(a["done_s"])
        a_wall = median(a["wall_s"])
        warm, a_work = median(c["warm_first_s"]), median(a["work_s"])
        rep = median(c["warm_repeat_s"])
        r_cold, r_warm = ratio(cold, a_done), ratio(warm, a_work)
        r["medians"] = {
            "cold_s": cold,
            "anchor_done_s": a_done,
            "anchor_wall_s": a_wall,
            "warm_first_s": warm,
            "anchor_work_s": a_work,
            "warm_repeat_s": rep,
            "verify_warm_ms": median(c["verify_warm_ms"]),
            "ratio_cold": r_cold,
            "ratio_warm": r_warm,
        }
        rows += [
            [
                f"{name}: cold (s)",
                fmt(cold, 3),
                fmt(a_done, 3) + " fresh process → written",
                fmt_ratio(r_cold),
            ],
            [
                f"{name}: cold (s), anchor to exit",
                fmt(cold, 3),
                fmt(a_wall, 3) + " fresh process → exit",
                fmt_ratio(ratio(cold, a_wall)),
            ],
            [
                f"{name}: warm worker (s)",
                fmt(warm, 3),
                fmt(a_work, 3) + " in-process, after import",
                fmt_ratio(r_warm),
            ],
            [
                f"{name}: warm, repeated (s)",
                fmt(rep, 3),
                "",
                fmt_ratio(ratio(rep, a_work)),
            ],
            [
                f"{name}:   of which verify, warm (ms)",
                fmt(median(c["verify_warm_ms"]), 0),
                "(no verification)",
                "",
            ],
        ]
        for label, value, anchor, rv, how in (
            ("cold vs fresh process", cold, a_done, r_cold, "cold"),
            ("warm vs in-process", warm, a_work, r_warm, "warm"),
        ):
            ok = rv is not None and rv <= TARGET_VS_ANCHOR
            met_all = met_all and ok
            summary.append(
                summary_row(
                    f"freeze {name}: {label}",
                    value,
                    anchor,
                    unit="s",
                    target=f"<= {TARGET_VS_ANCHOR}x plain script",
                    ok=ok,
                    ratio_value=rv,
                    ratio_label="ckptd/anchor",
                )
            )
            r["medians"][f"met_{how}"] = ok
    print_table(["", "ckptd freeze_run", "anchor: plain script", "ckptd/anchor"], rows)
    print()
    imports = [x for r in results.values() for x in r["anchor"]["import_s"]]
    pings = [x for r in results.values() for x in r["ckptd"]["ping_s"]]
    print(
        f"start-up: the plain script's `import tensorflow` {statistics.median(imports):.2f} s "
        f"(median); ckptd worker spawn → first answer (ping) {statistics.median(pings):.2f} s."
    )
    for name, r in results.items():
        c = r["ckptd"]
        print(
            f"checks {name}: verified {fmt(c['verified'])}; published {c['published_files']}; "
            f"temp dirs left: {c['temp_dirs_left'] or 'none'}"
        )
        for how in ("cold", "warm"):
            parts = ", ".join(
                f"{x['op']}{'/' + x['format'] if x['format'] else ''} {x['wall_s']:.3f} s "
                f"(worker {x['worker_s']:.3f} s)"
                for x in c[f"{how}_calls"][-1]
            )
            print(f"  last {how} export's worker requests: {parts}")
    print()
    print(
        f"Target: within {TARGET_VS_ANCHOR}× of the plain script, verification included: "
        f"{fmt(met_all)} ("
        + "; ".join(
            f"{n} cold {fmt_ratio(r['medians']['ratio_cold'])}, warm "
            f"{fmt_ratio(r['medians']['ratio_warm'])}"
            for n, r in results.items()
        )
        + ")."
    )
    print(
        "Notes: cold = ckptd spawns its worker inside the timed call (Python start, import "
        "tensorflow) vs the plain script's spawn → its result line (export written; the ratio), "
        "and → exit; warm = the worker already runs "
        "(TensorFlow imported, nothing cached) vs the script's time after `import tensorflow`. "
        "ckptd's worker exports SavedModel from a fresh graph (the builder adds ops) and verifies "
        "by loading what it wrote; the plain script restores once and trusts its output."
    )
    save_result(
        "freeze",
        {
            "quick": args.quick,
            "repetitions": reps,
            "record_s": corpus["record_s"],
            "results": results,
            "target_met": met_all,
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
