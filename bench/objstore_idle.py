"""What watching an idle bucket costs: LIST/GET requests per minute for 100 idle runs.

One SeaweedFS S3 server holds 100 runs of real TensorFlow output (tests/golden/tf2: three
checkpoints, the state file, two event files each). Each watcher in turn polls the same tree for
a fixed window, through a proxy that counts the requests on the wire (``_objstore.py``):

- ckptd: a real ``ckptd run`` with ``poll_interval`` 1 s (and its default, 10 s), after its
  first poll has recorded every checkpoint;
- TensorBoard-style: every pass walks the tree (one delimiter listing per directory, as
  ``tf.io.gfile.walk`` does) and reads every event file from its offset (a ranged GET each,
  grown or not), at TensorBoard's default ``reload_interval`` of 5 s and at 1 s;
- TF-Serving-style: each run a model base path listed every 1 s (Serving's default
  ``file_system_poll_wait_seconds``), the version directories Serving looks for.

Usage: .venv/bin/python bench/objstore_idle.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import (
    ENV,
    PY,
    RUN_CWD,
    Daemon,
    fmt,
    fmt_ratio,
    kill_group,
    print_table,
    query,
    ratio,
    save_result,
    summary_row,
    wait_for,
)
from _objstore import CountingProxy, golden_run, object_config, seaweedfs, unavailable

RUNS = 100

# The anchors, one process each, polling until killed. argv: endpoint, bucket/prefix, interval.
TENSORBOARD = textwrap.dedent(
    """
    import sys, time
    import s3fs
    endpoint, root, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False,
                           skip_instance_cache=True)
    offsets = {}
    while True:
        t0 = time.monotonic()
        todo = [root]
        while todo:  # tf.io.gfile.walk: one listing per directory
            d = todo.pop()
            for e in fs.ls(d, detail=True, refresh=True):
                if e["type"] == "directory":
                    todo.append(e["name"])
                elif "tfevents" in e["name"]:
                    offsets.setdefault(e["name"], 0)
        for name, offset in offsets.items():  # the event loader reads on from its offset
            try:
                data = fs.cat_file(name, start=offset)
                offsets[name] = offset + len(data)
            except Exception:
                pass  # nothing past the end (416): read again next pass
        print(time.time(), flush=True)  # a pass done
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    """
)
SERVING = textwrap.dedent(
    """
    import sys, time
    import s3fs
    endpoint, root, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False,
                           skip_instance_cache=True)
    models = [e["name"] for e in fs.ls(root, detail=True, refresh=True)
              if e["type"] == "directory"]
    while True:
        t0 = time.monotonic()
        for base in models:  # one model per run: its base path listed for versions
            fs.ls(base, detail=True, refresh=True)
        print(time.time(), flush=True)  # a pass done
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    """
)


def upload_tree(server: Any, bucket: str, runs: int) -> int:
    """``runs`` copies of the golden run under ``bucket/runs/``; the objects written."""
    fs = server.filesystem()
    src = golden_run()
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    batch = {
        f"{bucket}/runs/run{i:03d}/{rel}": data for i in range(runs) for rel, data in files.items()
    }
    fs.pipe(batch)
    return len(batch)


def measure(proxy: CountingProxy, window: float) -> dict[str, float]:
    before = proxy.snapshot()
    time.sleep(window)
    after = proxy.snapshot()
    per_min = {k: (after[k] - before[k]) * 60.0 / window for k in set(after) | set(before)}
    per_min["total"] = sum(per_min.values())
    return per_min


def anchor(
    code: str, proxy: CountingProxy, root: str, interval: float, window: float, env: dict[str, str]
) -> dict[str, float]:
    proc = subprocess.Popen(
        [PY, "-c", code, proxy.endpoint, root, str(interval)],
        env=env,
        cwd=RUN_CWD,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(min(window, 2 * interval + 2))  # its first pass (start-up) not counted
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "anchor exited")
        t0 = time.time()
        result = measure(proxy, window)
        t1 = time.time()
    finally:
        kill_group(proc)
    out = proc.stdout.read().decode() if proc.stdout else ""
    done = [float(x) for x in out.split()]
    # Passes finished in the window: an anchor polls serially, so when a pass takes longer
    # than its interval its rate is bounded by the server's latency, not by the interval.
    result["passes"] = sum(t0 <= x <= t1 for x in done) * 60.0 / window
    return result


def ckptd_idle(
    tmp: Path, proxy: CountingProxy, url: str, interval: str, window: float, checkpoints: int
) -> dict[str, float]:
    db = tmp / f"ckptd-{interval}.db"
    config = object_config(
        tmp / f"ckptd-{interval}.toml", url, db=db, endpoint=proxy.endpoint, interval=interval
    )
    daemon = Daemon(config, tmp / f"ckptd-{interval}.log").start()
    try:
        daemon.wait_running(db, timeout=120)
        wait_for(
            lambda: query(db, "select count(*) from checkpoints")[0][0] >= checkpoints,
            timeout=300,
            what="ckptd to record every checkpoint",
        )
        time.sleep(2)  # the poll in flight when the last was recorded
        return measure(proxy, window)
    finally:
        daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 s windows instead of 120 s")
    args = ap.parse_args()
    if why := unavailable():
        print(f"SeaweedFS unavailable: {why}")
        return 1
    window = 30.0 if args.quick else 120.0
    with tempfile.TemporaryDirectory(prefix="ckptd-objidle-") as t, seaweedfs(Path(t) / "s3") as s3:
        tmp = Path(t)
        env = {**ENV, **s3.env}
        env.pop("AWS_ENDPOINT_URL", None)  # everyone goes through the counting proxy
        ENV.clear()
        ENV.update(env)  # (the Daemon helper starts ckptd with ENV)
        url = s3.make_bucket("idle")
        objects = upload_tree(s3, "idle", RUNS)
        checkpoints = RUNS * 3
        print(f"{RUNS} runs, {objects} objects uploaded; {window:.0f} s windows", flush=True)
        proxy = CountingProxy(s3.endpoint).start()
        try:
            results: dict[str, dict[str, float]] = {}
            for label, interval in (("ckptd, poll 1 s", "1s"), ("ckptd, poll 10 s", "10s")):
                results[label] = ckptd_idle(
                    tmp, proxy, f"{url}/runs", interval, window, checkpoints
                )
                print(f"  {label}: {results[label]['total']:.0f} requests/min", flush=True)
            for label, code, interval in (
                ("TensorBoard-style, 5 s", TENSORBOARD, 5.0),
                ("TensorBoard-style, 1 s", TENSORBOARD, 1.0),
                ("TF-Serving-style, 1 s", SERVING, 1.0),
            ):
                results[label] = anchor(code, proxy, "idle/runs", interval, window, env)
                print(f"  {label}: {results[label]['total']:.0f} requests/min", flush=True)
        finally:
            proxy.stop()
    base = results["ckptd, poll 1 s"]["total"]
    rows = [
        [
            label,
            fmt(r.get("LIST", 0.0)),
            fmt(r.get("GET", 0.0) + r.get("HEAD", 0.0)),
            fmt(r["total"]),
            fmt_ratio(ratio(r["total"], base)),
            fmt(r["passes"]) if "passes" in r else "-",
        ]
        for label, r in results.items()
    ]
    print(f"\nidle cost of {RUNS} runs ({objects} objects), requests per minute, at the server:")
    print_table(
        ["watcher", "LIST/min", "GET+HEAD/min", "total/min", "x ckptd (1 s)", "passes/min"], rows
    )
    print(
        "(an anchor polls serially, so where it made fewer passes than its interval allows, its\n"
        " rate was bounded by the server's latency and its ratio is a lower bound)"
    )
    summary = [
        summary_row(
            f"idle requests/min, {RUNS} runs: ckptd (1 s) vs {anchor_label}",
            base,
            results[anchor_label]["total"],
            unit="req/min",
            target="fewer than the anchor",
            ok=base < results[anchor_label]["total"],
            ratio_value=ratio(results[anchor_label]["total"], base),
            ratio_label="anchor / ckptd",
        )
        for anchor_label in ("TensorBoard-style, 5 s", "TF-Serving-style, 1 s")
    ]
    save_result(
        "objstore_idle",
        {
            "runs": RUNS,
            "objects": objects,
            "window_s": window,
            "results": results,
            "summary": summary,
            "quick": args.quick,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
