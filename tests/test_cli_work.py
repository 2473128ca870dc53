"""`ckptd evaluate`/`freeze` as a user meets them: exit status, retry backoff, the hand-off to a
running daemon's warm worker, and what `status`, `ls` and `show` say about real checkpoints."""

from __future__ import annotations

import json
import sqlite3
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ckptd.api import handoff
from ckptd.api.status import DaemonStatus
from ckptd.api.status import status as read_status
from ckptd.store import evaluation_reads, evaluations, requests
from ckptd.store.handle import Store
from tests.conftest import Corpus, ckptd, query, wait_for, write_config

# A command evaluator (no TensorFlow worker): fails for the steps listed in a file, else scores.
SCRIPT = """
import json, sys
prefix, step, failing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if str(step) in open(failing).read().split():
    sys.exit(f"cannot evaluate step {step}")
print(json.dumps({"eval/score": step / 100}))
"""


def _command_config(tmp_path: Path, root: Path, failing: str = "") -> tuple[Path, Path]:
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(SCRIPT))
    fails = tmp_path / "failing"
    fails.write_text(failing)
    argv = [sys.executable, str(script), "{checkpoint}", "{step}", str(fails)]
    db = tmp_path / "ckptd.db"
    section = (
        '\n[watch.evaluate]\nevaluator = "command"\non_new = false\nmax_attempts = 3\n'
        f'retry_backoff = "10m"\ncommand = {json.dumps(argv)}\n'
    )
    return write_config(tmp_path / "c.toml", root, db=db, extra=section), db


@pytest.fixture
def recorded(tmp_path: Path, golden: Corpus) -> Path:
    """The golden tf2 run, recorded (no daemon left running)."""
    root = tmp_path / "runs"
    golden.copy("tf2", root / "tf2")
    conf, _db = _command_config(tmp_path, root, failing="10")
    assert ckptd("run", "--once", config=conf).returncode == 0
    return conf


@pytest.mark.slow
def test_a_failed_evaluation_exits_1_and_waits_to_retry(recorded: Path) -> None:
    db = recorded.parent / "ckptd.db"
    # `run --once` tried every checkpoint once: step 10 failed and waits out its backoff.
    # A checkpoint named by RUN@STEP is evaluated now, and its failure is exit status 1.
    result = ckptd("evaluate", "tf2@10", "--json", config=recorded)
    assert result.returncode == 1, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["status"] == "pending" and "cannot evaluate step 10" in row["error"]
    retry_at = datetime.fromisoformat(row["retry_at"])
    assert timedelta(minutes=9) < retry_at - datetime.now(UTC) <= timedelta(minutes=10)
    assert query(
        db,
        "select attempts from evaluations e join checkpoints c on "
        "c.id = e.checkpoint_id where c.step = 10",
    ) == [(1,)]  # requeued: attempt 1

    # The run: nothing to do now, but it says what waits and until when (not "nothing to
    # evaluate"), and exits 0 (nothing failed in this call).
    result = ckptd("evaluate", "tf2", config=recorded)
    assert result.returncode == 0, result.stderr
    assert "nothing to evaluate" not in result.stdout
    assert "tf2@10" in result.stdout and "waiting, retry at" in result.stdout
    assert "cannot evaluate step 10" in result.stdout
    assert "`ckptd evaluate tf2@10` evaluates one now" in result.stdout
    waiting = json.loads(ckptd("evaluate", "tf2", "--json", config=recorded).stdout)
    assert [(w["checkpoint"], w["status"]) for w in waiting] == [("tf2@10", "waiting")]

    # Fixed: asked by name, it is evaluated now, in spite of the backoff.
    (recorded.parent / "failing").write_text("")
    result = ckptd("evaluate", "tf2@10", "--json", config=recorded)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["metrics"] == {"eval/score": 0.1}


@pytest.mark.slow
def test_a_checkpoint_no_longer_complete_is_no_evaluation_work(
    recorded: Path, golden: Corpus
) -> None:
    """`status` counted pruned or deleted checkpoints as pending evaluations, and the evaluator
    would claim them."""
    db = recorded.parent / "ckptd.db"
    run = recorded.parent / "runs" / "tf2"
    ((evaluation_id,),) = query(
        db,
        "select e.id from evaluations e join checkpoints c on c.id = e.checkpoint_id "
        "where c.step = 10",
    )
    store = Store.open(f"sqlite:///{db}")
    try:
        assert read_status(store).evaluations == {"done": 2, "pending": 1}
        for f in run.glob("ckpt-10.*"):
            f.unlink()
        assert ckptd("run", "--once", config=recorded).returncode == 0
        assert query(db, "select state from checkpoints where step = 10") == [("gone",)]
        assert read_status(store).evaluations == {"done": 2}
        assert evaluation_reads.pending_count(store) == 0
        # Due at once, yet not claimable: its checkpoint is gone.
        with sqlite3.connect(db) as con:
            con.execute("update evaluations set next_attempt_at = null")
        assert evaluations.claim(store, evaluation_id, ttl=timedelta(minutes=1)) is None
    finally:
        store.close()
    result = ckptd("evaluate", "tf2@10", config=recorded)
    assert result.returncode == 1
    assert "tf2@10 is gone" in result.stderr and "only complete checkpoints" in result.stderr


@pytest.mark.slow
def test_ls_shows_the_best_metric_first_and_names_every_column(
    tmp_path: Path, golden: Corpus
) -> None:
    root = tmp_path / "runs"
    golden.copy("tf1", root / "mnist")
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db", best=False)
    conf.write_text(conf.read_text() + '\n[watch.best]\nmetric = "loss"\nmode = "min"\n')
    assert ckptd("run", "--once", config=conf).returncode == 0
    header = ckptd("ls", config=conf).stdout.splitlines()[0].split()
    assert header[5] == "loss", header  # right after run, step, format, state, size
    assert "marks" in header
    best = [line for line in ckptd("ls", config=conf).stdout.splitlines() if "★ best" in line]
    assert len(best) == 1


@pytest.mark.slow
def test_show_lists_the_weights_of_keras_files(tmp_path: Path, golden: Corpus) -> None:
    pytest.importorskip("h5py", reason="h5py (installed with TensorFlow) reads the weights")
    root = tmp_path / "runs"
    run = golden.copy("keras", root / "keras")
    conf = write_config(tmp_path / "c.toml", root, db=tmp_path / "ckptd.db", best=False)
    assert ckptd("run", "--once", config=conf).returncode == 0
    expected = {
        "layers/dense/vars/0": ("float32", [64, 32]),
        "layers/dense/vars/1": ("float32", [32]),
        "layers/dense_1/vars/0": ("float32", [32, 10]),
        "layers/dense_1/vars/1": ("float32", [10]),
    }
    for name in ("model.02-0.26.keras", "weights.02.weights.h5"):
        result = ckptd("show", str(run / name), "--json", config=conf)
        assert result.returncode == 0, result.stderr
        shown = {
            v["name"]: (v["dtype"], v["shape"]) for v in json.loads(result.stdout)["variables"]
        }
        assert expected.items() <= shown.items(), shown
        assert shown["optimizer/vars/0"] == ("int64", [])  # the iteration count
    # By the name `ls` shows (a recorded Keras checkpoint), as a table.
    prefix = json.loads(ckptd("ls", "--json", config=conf).stdout)[0]["path"]
    result = ckptd("show", prefix, config=conf)
    assert result.returncode == 0 and "layers/dense/vars/0" in result.stdout, result.stderr


def test_show_without_h5py_lists_the_archive_and_says_so(
    golden: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.api.listing import Unreadable, show

    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ModuleNotFoundError
    keras = golden.run_dir("keras")
    shown = show(str(keras / "model.01-0.53.keras"), lambda: pytest.fail("no database needed"))
    assert {t.name for t in shown.tensors} == {"metadata.json", "config.json", "model.weights.h5"}
    assert shown.note and "h5py is not installed" in shown.note
    with pytest.raises(Unreadable, match="h5py is not installed"):
        show(str(keras / "weights.01.weights.h5"), lambda: pytest.fail("no database needed"))


@pytest.mark.slow
def test_a_request_the_daemon_does_not_take_up_is_withdrawn_with_advice(
    recorded: Path,
) -> None:
    db = recorded.parent / "ckptd.db"
    store = Store.open(f"sqlite:///{db}")
    try:
        ((run_id,),) = query(db, "select id from runs")
        request_id = requests.submit(store, requests.EVALUATE, run_id, None, {})
        now = datetime.now(UTC)
        daemon = DaemonStatus(
            True, False, "elsewhere", 4242, "0", "c.toml", now, now, None, [], {}, True, [], None
        )
        t0 = time.monotonic()
        with pytest.raises(handoff.HandoffFailed, match="--no-daemon") as failed:
            handoff.wait(store, store, request_id, daemon, pickup_timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert "pid 4242 on elsewhere" in str(failed.value)
        req = requests.get(store, request_id)
        assert req is not None and req.status == requests.CANCELLED
        assert requests.claim_next(store, ttl=timedelta(minutes=1)) is None  # withdrawn
    finally:
        store.close()


# ------------------------------------------------------------------ with a real daemon

EVALUATE_AND_FREEZE = """
[watch.evaluate]
evaluator = "python"
function = "tests.daemon_eval_fns:step_score"
on_new = false
every = "1h"

[watch.freeze]
format = ["saved_model"]
export_dir = "{export}"
inputs = {{ "x" = "x:0" }}
outputs = {{ "y" = "y:0" }}
every = "1h"
keep = 3
"""


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_and_freeze_are_done_by_the_running_daemon(
    tmp_path: Path, corpus: Corpus, daemon_factory
) -> None:
    root = tmp_path / "runs"
    corpus.copy("tf1", root / "mnist")
    db = tmp_path / "ckptd.db"
    export = tmp_path / "export"
    conf = write_config(
        tmp_path / "c.toml", root, db=db, extra=EVALUATE_AND_FREEZE.format(export=export)
    )
    d = daemon_factory(conf)
    assert d.proc is not None
    wait_for(lambda: query(db, "select count(*) from checkpoints")[0][0] == 3, timeout=60)
    # The daemon exports the best at start (its freeze job runs at once): its worker is warm.
    wait_for(lambda: query(db, "select count(*) from exports where status = 'published'"), 180)

    # (Its backlog job has evaluated them at start: --again has them evaluated afresh.)
    result = ckptd("evaluate", "mnist", "--again", "--json", config=conf, timeout=180)
    assert result.returncode == 0, result.stderr + d.log()
    outcomes = json.loads(result.stdout)
    assert [o["status"] for o in outcomes] == ["done"] * 3
    # Evaluated by the daemon (its claim, its worker), not by a worker of the CLI's.
    holders = {
        json.loads(detail)["by"]
        for (detail,) in query(db, "select detail from actions where kind = 'evaluated'")
    }
    assert {h.split(":")[1] for h in holders} == {str(d.proc.pid)}, holders
    (worker_pid,) = {int(o["metrics"]["eval/pid"]) for o in outcomes}
    assert _ppid(worker_pid) == d.proc.pid
    assert "evaluate of mnist requested by `ckptd evaluate`" in d.log()

    steps = sorted(s["step"] for s in corpus.saves["tf1"])
    result = ckptd("freeze", f"mnist@{steps[0]}", "--force", "--json", config=conf, timeout=180)
    assert result.returncode == 0, result.stderr + d.log()
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "published", outcome
    assert (Path(outcome["path"]) / "saved_model.pb").exists()
    assert f"freeze of mnist@{steps[0]} requested by `ckptd freeze`" in d.log()
    assert d.stop() == 0

    # No daemon: the CLI does the work itself, as before.
    result = ckptd("evaluate", f"mnist@{steps[1]}", "--json", config=conf, timeout=180)
    assert result.returncode == 0, result.stderr
    (again,) = json.loads(result.stdout)
    assert again["status"] == "done" and int(again["metrics"]["eval/pid"]) != worker_pid
    assert "done by the running daemon" not in result.stderr
