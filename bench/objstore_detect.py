"""How fast and how completely a checkpoint uploaded to S3 is noticed: ckptd polling at 1 s vs a
TensorBoard-style full re-list loop at 1 s.

One SeaweedFS S3 server, one run. A real ``ckptd run`` watches ``s3://bucket/runs`` with
``poll_interval = "1s"``; beside it, the anchor re-lists the whole tree every second and reports
each new ``.index`` (TensorFlow's ``checkpoints_iterator`` cannot read ``s3://`` in this
TensorFlow build: its S3 filesystem was moved out to tensorflow-io). An uploader writes real TF
checkpoints (tests/golden/tf2) in TensorFlow's object order — data shard, index, state file —
one every ``--every`` seconds.

Per checkpoint: ckptd latency = ``checkpoints.recorded_at`` − the time the index upload returned;
anchor latency = the time its listing showed the index − the same. One host, one clock.

Usage: .venv/bin/python bench/objstore_detect.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import (
    ENV,
    PY,
    RUN_CWD,
    Daemon,
    db_epoch,
    fmt,
    fmt_ratio,
    kill_group,
    percentile,
    print_table,
    query,
    ratio,
    save_result,
    summary_row,
)
from _objstore import golden_run, object_config, seaweedfs, unavailable

# The anchor: list the whole tree every second (no delimiter: one paged listing), print each
# new .index with the time the listing showed it.
RELIST = textwrap.dedent(
    """
    import json, sys, time
    import s3fs
    endpoint, root = sys.argv[1], sys.argv[2]
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False,
                           skip_instance_cache=True)
    seen = set()
    while True:
        t0 = time.monotonic()
        for name in fs.find(root):
            if name.endswith(".index") and name not in seen:
                seen.add(name)
                print(json.dumps({"key": name, "at": time.time()}), flush=True)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    """
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 checkpoints instead of 40")
    ap.add_argument("--every", type=float, default=1.5, help="seconds between uploads")
    args = ap.parse_args()
    if why := unavailable():
        print(f"SeaweedFS unavailable: {why}")
        return 1
    count = 10 if args.quick else 40
    src = golden_run()
    saves = [("ckpt-10", "ckpt-10"), ("ckpt-20", "ckpt-20"), ("ckpt-30", "ckpt-30")]
    with (
        tempfile.TemporaryDirectory(prefix="ckptd-objdetect-") as t,
        seaweedfs(Path(t) / "s3") as s3,
    ):
        tmp = Path(t)
        env = {**ENV, **s3.env}
        ENV.clear()
        ENV.update(env)
        url = s3.make_bucket("detect")
        fs = s3.filesystem()
        fs.pipe_file("detect/runs/r/.keep", b"")  # the run exists before the first save
        db = tmp / "ckptd.db"
        config = object_config(
            tmp / "ckptd.toml", f"{url}/runs", db=db, endpoint=s3.endpoint, interval="1s"
        )
        daemon = Daemon(config, tmp / "ckptd.log").start()
        relist = subprocess.Popen(
            [PY, "-c", RELIST, s3.endpoint, "detect/runs"],
            env=env,
            cwd=RUN_CWD,
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        saved_at: dict[str, float] = {}
        try:
            daemon.wait_running(db, timeout=120)
            time.sleep(2)
            for i in range(count):
                src_prefix = saves[i % 3][0]
                name = f"ckpt-{100 + i}"
                fs.pipe_file(
                    f"detect/runs/r/{name}.data-00000-of-00001",
                    (src / f"{src_prefix}.data-00000-of-00001").read_bytes(),
                )
                fs.pipe_file(
                    f"detect/runs/r/{name}.index", (src / f"{src_prefix}.index").read_bytes()
                )
                saved_at[name] = time.time()
                state = f'model_checkpoint_path: "{name}"\n'.encode()
                fs.pipe_file("detect/runs/r/checkpoint", state)
                time.sleep(args.every)
            time.sleep(5)  # the last polls
        finally:
            kill_group(relist)
            daemon.stop()
        rows = query(db, "select prefix, recorded_at from checkpoints")
        recorded = {p.rsplit("/", 1)[1]: db_epoch(at) for p, at in rows}
        out = relist.stdout.read() if relist.stdout else ""
        anchor_seen = {}
        for line in out.splitlines():
            rec = json.loads(line)
            anchor_seen[rec["key"].rsplit("/", 1)[1].removesuffix(".index")] = rec["at"]
    ck = [recorded[n] - s for n, s in saved_at.items() if recorded.get(n) is not None]
    an = [anchor_seen[n] - s for n, s in saved_at.items() if n in anchor_seen]
    res = {
        "ckptd": {
            "recorded_pct": 100.0 * len(ck) / count,
            "p50_ms": _ms(percentile(ck, 50)),
            "p99_ms": _ms(percentile(ck, 99)),
        },
        "anchor": {
            "recorded_pct": 100.0 * len(an) / count,
            "p50_ms": _ms(percentile(an, 50)),
            "p99_ms": _ms(percentile(an, 99)),
        },
    }
    print(f"\n{count} checkpoints uploaded to S3 (SeaweedFS), one every {args.every:g} s:")
    print_table(
        ["watcher (1 s interval)", "recorded %", "p50 ms", "p99 ms"],
        [
            [
                "ckptd",
                fmt(res["ckptd"]["recorded_pct"]),
                fmt(res["ckptd"]["p50_ms"]),
                fmt(res["ckptd"]["p99_ms"]),
            ],
            [
                "TensorBoard-style re-list",
                fmt(res["anchor"]["recorded_pct"]),
                fmt(res["anchor"]["p50_ms"]),
                fmt(res["anchor"]["p99_ms"]),
            ],
        ],
    )
    p50 = ratio(res["anchor"]["p50_ms"], res["ckptd"]["p50_ms"])
    print(f"p50 anchor / ckptd: {fmt_ratio(p50)} (ckptd's latency includes recording it)")
    summary = [
        summary_row(
            "S3 detection p50 (1 s poll) vs re-list",
            res["ckptd"]["p50_ms"],
            res["anchor"]["p50_ms"],
            unit="ms",
            target="under the interval",
            ok=(res["ckptd"]["p50_ms"] or 1e9) < 1000,
            ratio_value=p50,
            ratio_label="anchor / ckptd",
        ),
        summary_row(
            "S3 checkpoints recorded",
            res["ckptd"]["recorded_pct"],
            res["anchor"]["recorded_pct"],
            unit="%",
            target="100%",
            ok=res["ckptd"]["recorded_pct"] == 100.0,
        ),
    ]
    save_result(
        "objstore_detect",
        {
            "count": count,
            "every_s": args.every,
            "results": res,
            "summary": summary,
            "quick": args.quick,
        },
    )
    return 0


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


if __name__ == "__main__":
    sys.exit(main())
