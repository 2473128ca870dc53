"""Backfill from an object store: how fast ckptd records a bucket's existing checkpoints.

Server: SeaweedFS on loopback (tests/objservers.py through bench/_objstore.py, as bench/_pg.py
loads tests/pg.py), started for this benchmark and stopped at its end. Both sides reach it
through ``_objstore.CountingProxy``, which counts their requests on the wire.

Corpus: ONE real TF1 run (``python -m ckptd.worker.train tf1``, 100 saves, ``--save-every 1``)
uploaded R times under ``s3://bench/runs/run-NNN/`` (100 checkpoints per run, 10,000 for the
default 100 runs): its ``.data``/``.meta``/``.index`` objects in TensorFlow's order, its real
event files (``eval/`` too) and a ``checkpoint`` state file listing every checkpoint.

ckptd: ``python -m ckptd --config X run --once`` on a fresh SQLite database with
``path = "s3://bench/runs"``, timed from spawn to exit (interpreter start, imports, schema,
listing, index reads, event files, commit); then every checkpoint must be complete.

Anchor (same bucket, same objects): a TensorBoard-style walk in a fresh Python with the same
fsspec client: one delimiter listing per directory of the tree (``tf.io.gfile.walk``, as
TensorBoard finds runs), then a GET of every checkpoint's ``.index`` (the least a reader must
read to know a checkpoint is whole) and of every event file whole (TensorBoard reads them).
TensorFlow 2.6+ has no ``s3://`` of its own, so TensorFlow itself cannot be the anchor here.

Usage: .venv/bin/python bench/objstore_backfill.py [--quick] [--runs R]
One run of each side; the load average printed at the end says how quiet the machine was.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import (
    ENV,
    PY,
    check,
    ckptd_cmd,
    fmt,
    fmt_ratio,
    print_table,
    query,
    ratio,
    save_result,
    summary_row,
    timed_run,
    train,
)
from _objstore import CountingProxy, object_config, seaweedfs, unavailable

STEPS = 100  # checkpoints per run
RUNS = 100
QUICK_RUNS = 10
BUCKET = "bench"
TARGET_VS_ANCHOR = 1.0  # at least as fast as a walk that only lists and reads


ANCHOR = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import s3fs
    fs = s3fs.S3FileSystem(endpoint_url=sys.argv[1], use_listings_cache=False,
                           skip_instance_cache=True)
    t1 = time.perf_counter()
    root = sys.argv[2]
    lists = gets = checkpoints = nbytes = 0
    pending = [root]
    while pending:  # gfile.walk: one delimiter listing per directory
        d = pending.pop()
        lists += 1
        for e in fs.ls(d, detail=True, refresh=True):
            name = e["name"].rstrip("/")
            if e["type"] == "directory":
                pending.append(name)
            elif name.endswith(".index") or ".tfevents." in name:
                nbytes += len(fs.cat_file(name))
                gets += 1
                checkpoints += name.endswith(".index")
    t2 = time.perf_counter()
    print(json.dumps({"checkpoints": checkpoints, "lists": lists, "gets": gets,
                      "bytes": nbytes, "import_s": t1 - t0, "work_s": t2 - t1}))
    """
)


def build_source(work: Path) -> tuple[Path, list[dict[str, Any]]]:
    src = work / "source"
    saves = train("tf1", src, "--steps", str(STEPS), "--save-every", "1", "--no-npz")
    if len(saves) != STEPS:
        raise RuntimeError(f"expected {STEPS} saves, got {len(saves)}")
    return src, saves


def upload(fs: Any, src: Path, runs: int) -> dict[str, Any]:
    """Every run's objects, in TensorFlow's order within a checkpoint (data, meta, index),
    then event files and the state file; many PUTs in flight at once (fsspec's batching)."""
    ckpt = sorted(p.name for p in src.iterdir() if p.name.startswith("model.ckpt-"))
    order = {"data": 0, "meta": 1, "index": 2}

    def rank(name: str) -> tuple[int, int]:
        step = int(re.search(r"model\.ckpt-(\d+)", name).group(1))  # type: ignore[union-attr]
        kind = "data" if ".data-" in name else name.rsplit(".", 1)[-1]
        return step, order.get(kind, 3)

    ckpt.sort(key=rank)
    blobs = {name: (src / name).read_bytes() for name in ckpt}
    events = {p.name: p.read_bytes() for p in src.glob("events.out.tfevents.*")}
    events |= {f"eval/{p.name}": p.read_bytes() for p in (src / "eval").glob("events.*")}
    t0 = time.perf_counter()
    objects = 0
    for r in range(runs):
        base = f"{BUCKET}/runs/run-{r:03d}"
        names = [f"model.ckpt-{s}" for s in sorted({rank(n)[0] for n in ckpt})]
        state = f'model_checkpoint_path: "{names[-1]}"\n'
        state += "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in names)
        fs.pipe({f"{base}/{n}": blobs[n] for n in ckpt})
        fs.pipe({f"{base}/{n}": data for n, data in events.items()})
        fs.pipe_file(f"{base}/checkpoint", state.encode())
        objects += len(ckpt) + len(events) + 1
    return {"objects": objects, "upload_s": time.perf_counter() - t0}


def run_ckptd(work: Path, n: int, proxy: CountingProxy) -> dict[str, Any]:
    db = work / "ckptd.db"
    config = object_config(
        work / "ckptd.toml", f"s3://{BUCKET}/runs", db=db, endpoint=proxy.endpoint, interval="10s"
    )
    before = proxy.snapshot()
    wall, proc = timed_run(ckptd_cmd(config, "run", "--once"), timeout=3600)
    check(proc, "ckptd run --once")
    requests = proxy.snapshot() - before
    complete = query(db, "select count(*) from checkpoints where state = 'complete'")[0][0]
    return {
        "wall_s": wall,
        "complete": complete,
        "expected": n,
        "rate": n / wall,
        "requests": dict(requests),
    }


def run_anchor(proxy: CountingProxy) -> dict[str, Any]:
    before = proxy.snapshot()
    wall, proc = timed_run([PY, "-c", ANCHOR, proxy.endpoint, f"{BUCKET}/runs"], timeout=3600)
    check(proc, "anchor walk")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out["rate"] = out["checkpoints"] / wall
    out["requests"] = dict(proxy.snapshot() - before)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs")
    ap.add_argument("--runs", type=int, help=f"runs of {STEPS} checkpoints (default {RUNS})")
    args = ap.parse_args()
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    n = runs * STEPS
    why = unavailable()
    if why is not None:
        print(f"SeaweedFS unavailable: {why}")
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="ckptd-objbackfill-") as t,
        seaweedfs(Path(t) / "s3") as s3,
    ):
        work = Path(t)
        env = {**ENV, **s3.env}
        env.pop("AWS_ENDPOINT_URL", None)  # everyone goes through the counting proxy
        ENV.clear()
        ENV.update(env)  # (timed_run starts processes with ENV)
        s3.make_bucket(BUCKET)
        src, _saves = build_source(work)
        corpus = upload(s3.filesystem(), src, runs)
        print(f"uploaded {corpus['objects']} objects in {corpus['upload_s']:.1f} s", flush=True)
        proxy = CountingProxy(s3.endpoint).start()
        try:
            ours = run_ckptd(work, n, proxy)
            anchor = run_anchor(proxy)
        finally:
            proxy.stop()
    if ours["complete"] != n or anchor["checkpoints"] != n:
        print(f"objstore_backfill: FAILED: {ours['complete']} / {anchor['checkpoints']} of {n}")
        return 1
    r = ratio(ours["rate"], anchor["rate"])
    print_table(
        ["", "checkpoints", "wall s", "checkpoints/s", "requests"],
        [
            [
                label,
                str(n),
                fmt(r["wall_s"], 2),
                fmt(r["rate"], 1),
                str(sum(r["requests"].values())),
            ]
            for label, r in (("ckptd run --once", ours), ("TensorBoard-style walk", anchor))
        ],
    )
    print(f"ckptd vs the walk: {fmt_ratio(r)} (higher is faster), one run each")
    save_result(
        "objstore_backfill",
        {
            "quick": args.quick,
            "runs": runs,
            "checkpoints": n,
            "corpus": corpus,
            "ckptd": ours,
            "anchor": anchor,
            "summary": [
                summary_row(
                    f"S3 backfill, {n} checkpoints in {runs} runs",
                    ours["rate"],
                    anchor["rate"],
                    unit="ckpt/s",
                    target=f">= {TARGET_VS_ANCHOR}x the walk",
                    ok=r is not None and r >= TARGET_VS_ANCHOR,
                    ratio_value=r,
                    ratio_label="x faster",
                )
            ],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
