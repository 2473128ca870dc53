"""The TensorFlow worker process, driven for real over its line protocol.

One `python -m ckptd.worker serve` process serves the whole module (each TF import costs ~4 s
here); a minimal local helper writes a request line and reads a response line.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.worker import protocol, requests
from tests.conftest import ENV, PY, REPO, Corpus

pytestmark = pytest.mark.tf

FEED = {"x:0": "x", "y_:0": "y"}
FETCH = {"eval/accuracy": "accuracy:0", "eval/loss": "loss:0"}
ACCURACY_STEP = 1 / 512  # one held-out sample


class Worker:
    """A real worker subprocess; stderr goes to a log file so a full pipe can never block it."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [PY, "-m", "ckptd.worker", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=ENV,
            cwd=REPO,
            start_new_session=True,
        )
        self._buf = b""
        self._ids = 0
        self.lines: list[str] = []  # every line read from stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def send(self, raw: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(raw)
        self.proc.stdin.flush()

    def readline(self, timeout: float = 180) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no response within {timeout} s; worker log:\n{self.log()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise AssertionError(f"worker closed stdout; log:\n{self.log()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        self.lines.append(line.decode())
        return line.decode()

    def request(self, req: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
        self._ids += 1
        rid = f"t{self._ids}"
        self.send((json.dumps({"id": rid, **req}) + "\n").encode())
        response = json.loads(self.readline(timeout))
        assert response["id"] == rid, response
        if response["ok"]:
            assert set(response) == {"id", "ok", "result"}
        else:
            assert set(response) == {"id", "ok", "kind", "error"}
            assert response["kind"] in protocol.KINDS and "\n" not in response["error"]
        return response

    def ok(self, req: dict[str, Any]) -> dict[str, Any]:
        response = self.request(req)
        assert response["ok"], response
        result = response["result"]
        assert isinstance(result["seconds"], float)
        return result

    def fail(self, req: dict[str, Any], kind: str) -> str:
        response = self.request(req)
        assert not response["ok"] and response["kind"] == kind, response
        return response["error"]

    def close(self, timeout: float = 60) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF: the worker exits on its own
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    assert w.close() == 0, w.log()  # clean exit at EOF of stdin
    assert all(json.loads(line) for line in w.lines)  # stdout carried protocol lines only


def evaluate(prefix: Path, **extra: Any) -> dict[str, Any]:
    run = prefix.parent
    req = {"op": "evaluate", "evaluator": "meta_graph", "checkpoint": str(prefix)}
    return {**req, "data": str(run / "heldout.npz"), "feed": FEED, "fetch": FETCH, **extra}


def python_eval(function: str, checkpoint: Path | str, **extra: Any) -> dict[str, Any]:
    req = {"op": "evaluate", "evaluator": "python", "function": f"tests.eval_fns:{function}"}
    return {**req, "checkpoint": str(checkpoint), **extra}


def tf1_copy(corpus: Corpus, dest: Path) -> list[tuple[dict[str, Any], Path]]:
    """A private copy of the tf1 run (a fresh warm-cache key): [(save record, prefix)]."""
    run = corpus.copy("tf1", dest)
    return [(save, run / Path(save["prefix"]).name) for save in corpus.saves["tf1"]]


# ------------------------------------------------------------------ protocol basics


def test_protocol_module_round_trip_without_tensorflow() -> None:
    line = protocol.encode({"id": 1, "ok": True, "result": {"m": float("nan"), "s": "a\nb"}})
    assert "\n" not in line
    assert math.isnan(protocol.decode(line)["result"]["m"])
    with pytest.raises(protocol.WorkerFailure) as err:
        protocol.decode("[1, 2]")
    assert err.value.kind == "bad_request"
    with pytest.raises(ValueError):
        protocol.WorkerFailure("exploded", "no such kind")
    assert protocol.failure(3, "tf_error", "line one\n  line two")["error"] == "line one line two"
    probe = (
        "import sys, ckptd.worker.protocol, ckptd.worker.client, ckptd.worker.__main__\n"
        "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'keras'))]\n"
    )
    subprocess.run([PY, "-c", probe], check=True, env=ENV, cwd=REPO)


def _refused(wire: dict[str, Any]) -> str:
    with pytest.raises(protocol.WorkerFailure) as err:
        requests.parse_request(wire)
    assert err.value.kind == "bad_request"
    return err.value.message


def test_typed_requests_round_trip_and_are_checked_without_tensorflow(tmp_path: Path) -> None:
    run = tmp_path / "run"
    evaluate_req = requests.EvaluateRequest(
        evaluator="meta_graph",
        checkpoint=str(run / "model.ckpt-10"),
        data=str(run / "heldout.npz"),
        feed=FEED,
        fetch=FETCH,
        use_ema=True,
    )
    wire = json.loads(protocol.request_line(7, evaluate_req))
    assert wire["id"] == 7 and wire["op"] == "evaluate"
    assert "batch_size" not in wire and "run" not in wire  # unset fields stay off the wire
    assert requests.parse_request(wire) == evaluate_req
    assert evaluate_req.run_dir() == str(run)
    export_req = requests.ExportRequest(
        format="frozen_graph", checkpoint="/r/m", out_dir="/o", outputs={"y": "y:0"}
    )
    assert requests.parse_request(export_req.to_wire()) == export_req
    verify_req = requests.VerifyRequest(export_dir="/o", checkpoint="/r/m.keras")
    parsed = requests.parse_request(verify_req.to_wire())
    assert isinstance(parsed, requests.VerifyRequest) and parsed.kind == "keras"
    assert verify_req.checkpoint_kind() == "keras"
    home = requests.parse_request({**export_req.to_wire(), "checkpoint": "~/m"})
    assert isinstance(home, requests.ExportRequest)
    assert home.checkpoint == os.path.expanduser("~/m")

    assert "'use_ema' has type str" in _refused({**wire, "use_ema": "yes"})
    assert "batch_size must be >= 1" in _refused({**wire, "batch_size": 0})
    assert "must map names to strings" in _refused({**wire, "fetch": {"a": 1}})
    assert "'outputs'" in _refused({**export_req.to_wire(), "outputs": {}})
    assert "'builder'" in _refused({**export_req.to_wire(), "format": "saved_model", "kind": "tf2"})
    # verify rebuilds a tf2 checkpoint by its builder too: refused without it, as export is.
    assert "verify: missing field 'builder'" in _refused({**verify_req.to_wire(), "kind": "tf2"})
    assert "tf1" in _refused({**export_req.to_wire(), "kind": "keras"})
    assert "'onnx'" in _refused({**verify_req.to_wire(), "formats": ["onnx"]})
    assert "kind 'tf3'" in _refused({**verify_req.to_wire(), "kind": "tf3"})


def test_responses_are_read_by_the_shared_protocol() -> None:
    from ckptd.worker import client

    assert client.WorkerError is protocol.WorkerFailure  # one error type on both sides
    ok_line = protocol.encode(protocol.ok(3, {"metrics": {"a": 1.0}})).encode()
    assert protocol.read_response(ok_line, 3) == {"metrics": {"a": 1.0}}
    cases = [
        (b"Traceback (most recent", 3, "crashed", "garbage"),
        (ok_line, 4, "crashed", "answered request 3 instead of 4"),
        (
            protocol.encode(protocol.failure(3, "not_found", "gone")).encode(),
            3,
            "not_found",
            "gone",
        ),
        (b'{"id":3,"ok":false,"kind":"exploded","error":"x"}', 3, "tf_error", "x"),
    ]
    for line, request_id, kind, text in cases:
        with pytest.raises(protocol.WorkerFailure) as err:
            protocol.read_response(line, request_id)
        assert err.value.kind == kind and text in err.value.message, line
    assert "stopping" in protocol.KINDS


def test_ping(worker: Worker) -> None:
    result = worker.ok({"op": "ping"})
    assert result["pid"] == worker.proc.pid
    assert result["tf_version"].startswith("2.")


def test_malformed_requests_are_answered_and_the_worker_keeps_serving(worker: Worker) -> None:
    worker.send(b"this is not json\n")
    response = json.loads(worker.readline())
    assert response["id"] is None and response["kind"] == "bad_request"
    worker.send(b"\n[1, 2]\n")  # blank lines are skipped; a non-object is refused
    assert json.loads(worker.readline())["kind"] == "bad_request"
    assert "unknown op" in worker.fail({"op": "train"}, "bad_request")
    assert "'evaluator'" in worker.fail({"op": "evaluate", "checkpoint": "/x"}, "bad_request")
    bad_eval = {"op": "evaluate", "evaluator": "meta_graph", "checkpoint": "/x", "data": "/y"}
    assert "'feed'" in worker.fail({**bad_eval, "use_ema": "yes"}, "bad_request")
    assert worker.ok({"op": "ping"})["pid"] == worker.proc.pid


def test_missing_files_are_not_found_and_the_worker_keeps_serving(
    worker: Worker, corpus: Corpus, tmp_path: Path
) -> None:
    saves = tf1_copy(corpus, tmp_path / "tf1")
    missing = saves[0][1].with_name("model.ckpt-999")
    error = worker.fail(evaluate(missing), "not_found")
    assert str(missing) in error and ".index" in error
    assert worker.ok({"op": "ping"})["pid"] == worker.proc.pid

    prefix = saves[1][1]
    no_data = evaluate(prefix, data=str(tmp_path / "nope.npz"))
    assert str(tmp_path / "nope.npz") in worker.fail(no_data, "not_found")
    Path(f"{prefix}.meta").unlink()  # fresh run copy: cold path needs the meta graph
    assert f"{prefix}.meta" in worker.fail(evaluate(prefix), "not_found")
    next(Path(prefix.parent).glob(f"{saves[2][1].name}.data-*")).unlink()
    assert "no data files" in worker.fail(evaluate(saves[2][1]), "not_found")
    assert worker.ok(evaluate(saves[0][1]))["warm"] is False


# ------------------------------------------------------------------ meta_graph evaluator


def test_meta_graph_evaluation_matches_the_trainer_and_is_warm(
    worker: Worker, corpus: Corpus, tmp_path: Path
) -> None:
    saves = tf1_copy(corpus, tmp_path / "tf1")
    assert len(saves) == 3
    timings = []
    for i, (save, prefix) in enumerate(saves):
        result = worker.ok(evaluate(prefix))
        # The trainer evaluates the live RAW variables on the same heldout set (train_tf1).
        assert result["metrics"] == pytest.approx(save["metrics"], rel=1e-5), save["step"]
        assert result["warm"] is (i > 0)
        assert result["rows"] == 512
        timings.append(result["seconds"])
    print(f"meta_graph evaluate seconds: cold {timings[0]:.4f}, warm {timings[1:]}")

    # Batched evaluation: per-batch metrics averaged with batch-size weights.
    save, prefix = saves[-1]
    batched = worker.ok(evaluate(prefix, batch_size=100))  # 5 x 100 + 12
    assert batched["warm"] is True
    assert batched["metrics"] == pytest.approx(save["metrics"], rel=1e-5)

    # Fetch by op name and by collection ('pred_network' holds the softmax: not a scalar).
    by_name = worker.ok(evaluate(prefix, fetch={"acc": "accuracy"}))
    assert by_name["metrics"]["acc"] == pytest.approx(save["metrics"]["eval/accuracy"])
    error = worker.fail(evaluate(prefix, fetch={"p": "collection:pred_network"}), "bad_request")
    assert "scalar" in error and "(512, 10)" in error
    assert "nope:0" in worker.fail(evaluate(prefix, fetch={"a": "nope:0"}), "bad_request")


def test_ema_restore_uses_the_shadow_values(worker: Worker, corpus: Corpus, tmp_path: Path) -> None:
    for i, (save, prefix) in enumerate(tf1_copy(corpus, tmp_path / "tf1")):
        ema = worker.ok(evaluate(prefix, use_ema=True))
        assert ema["warm"] is (i > 0)
        assert ema["ema_variables"] == 4  # the trainable variables; the rest restore normally
        oracle = worker.ok(python_eval("numpy_oracle", prefix, run=str(prefix.parent)))["metrics"]
        # The hand-made model reproduces the trainer's own (raw) numbers ...
        assert oracle["raw/accuracy"] == pytest.approx(save["metrics"]["eval/accuracy"], abs=1e-9)
        assert oracle["raw/loss"] == pytest.approx(save["metrics"]["eval/loss"], rel=1e-5)
        # ... and the worker's EMA evaluation equals the numpy one on the shadow values.
        assert ema["metrics"]["eval/loss"] == pytest.approx(oracle["ema/loss"], rel=1e-5)
        assert ema["metrics"]["eval/accuracy"] == pytest.approx(
            oracle["ema/accuracy"], abs=ACCURACY_STEP + 1e-9
        )
        assert abs(oracle["ema/loss"] - oracle["raw/loss"]) > 1e-3  # the test can tell them apart
        # A raw evaluation in the same worker is still raw (separate cache entry).
        raw = worker.ok(evaluate(prefix))
        assert raw["metrics"] == pytest.approx(save["metrics"], rel=1e-5)


def test_a_changed_architecture_rebuilds_the_graph(
    worker: Worker, corpus: Corpus, tmp_path: Path
) -> None:
    saves = tf1_copy(corpus, tmp_path / "tf1")
    worker.ok(evaluate(saves[0][1]))
    assert worker.ok(evaluate(saves[1][1]))["warm"] is True
    wide = saves[0][1].with_name("model.ckpt-40")
    written = worker.ok(python_eval("write_wide_tf1", wide, run=str(wide.parent)))["metrics"]
    result = worker.ok(evaluate(wide))
    assert result["warm"] is False  # its .meta differs from the cached graph's: rebuilt
    assert result["metrics"]["eval/accuracy"] == pytest.approx(written["accuracy"])
    assert worker.ok(evaluate(wide))["warm"] is True
    back = worker.ok(evaluate(saves[2][1]))  # and back to the old architecture
    assert back["warm"] is False
    assert back["metrics"] == pytest.approx(saves[2][0]["metrics"], rel=1e-5)


# ------------------------------------------------------------------ keras / python evaluators


def test_keras_evaluator(worker: Worker, corpus: Corpus) -> None:
    run = corpus.run_dir("keras")
    for i, save in enumerate(corpus.saves["keras"]):
        req = {"op": "evaluate", "evaluator": "keras", "checkpoint": save["prefix"]}
        result = worker.ok({**req, "data": str(run / "heldout.npz"), "feed": {"x": "x", "y": "y"}})
        assert set(result["metrics"]) == {"loss", "accuracy"}
        # ModelCheckpoint saved after the epoch's validation on the same heldout set.
        assert result["metrics"]["accuracy"] == pytest.approx(save["metrics"]["val_accuracy"])
        assert result["metrics"]["loss"] == pytest.approx(save["metrics"]["val_loss"], rel=1e-5)
        assert result["warm"] is (i > 0)  # load_weights into the run's cached model


def test_keras_model_builder_must_return_a_model(
    worker: Worker, corpus: Corpus, tmp_path: Path
) -> None:
    """A weights-only checkpoint takes its architecture from ``model`` (the watch's
    keras_model); a builder returning something else is a bad request that says so."""
    weights = next(corpus.run_dir("keras").glob("*.weights.h5"))
    shutil.copy(weights, tmp_path / weights.name)  # a run of its own: no warm model to reuse
    req = {
        "op": "evaluate",
        "evaluator": "keras",
        "checkpoint": str(tmp_path / weights.name),
        "data": str(corpus.run_dir("keras") / "heldout.npz"),
        "model": "tests.keras_fns:not_a_model",
    }
    error = worker.fail(req, "bad_request")
    assert "keras_model tests.keras_fns:not_a_model returned dict, not a keras.Model" in error


def test_python_evaluator(worker: Worker, corpus: Corpus) -> None:
    prefix = corpus.saves["tf1"][0]["prefix"]
    result = worker.ok(python_eval("constant_metrics", prefix, step=10))
    metrics = result["metrics"]
    assert math.isnan(metrics.pop("nan"))  # NaN survives the protocol (ranks worst later)
    assert metrics == {
        "eval/accuracy": 0.5,
        "count": 3.0,
        "np32": 0.25,
        "np0d": 7.0,
        "step_seen": 10.0,
        "run_is_dir": 1.0,
        "checkpoint_is_abs": 1.0,
    }
    error = worker.fail(python_eval("garbage_value", prefix), "bad_request")
    assert "tests.eval_fns:garbage_value" in error and "'eval/accuracy'" in error
    assert "returned list" in worker.fail(python_eval("garbage_type", prefix), "bad_request")
    assert "evaluator exploded" in worker.fail(python_eval("raises", prefix), "tf_error")
    assert "SystemExit" in worker.fail(python_eval("exits", prefix), "tf_error")
    no_module = {**python_eval("x", prefix), "function": "tests.no_such_module:fn"}
    assert "cannot import" in worker.fail(no_module, "bad_request")
    no_colon = {**python_eval("x", prefix), "function": "tests.eval_fns.constant_metrics"}
    assert "module:function" in worker.fail(no_colon, "bad_request")
    # Whatever user code writes to stdout / fd 1 stays off the protocol stream.
    assert worker.ok(python_eval("noisy", prefix))["metrics"] == {"quiet": 1.0}
    assert worker.ok({"op": "ping"})["pid"] == worker.proc.pid


# ------------------------------------------------------------------ export + verify


@pytest.fixture(scope="module")
def tf1_export(
    worker: Worker, trained: Corpus, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, Any]]:
    """SavedModel then frozen graph of the last tf1 checkpoint, into ONE directory."""
    prefix = Path(trained.saves["tf1"][-1]["prefix"])
    out = tmp_path_factory.mktemp("exports") / ".tmp-30"
    base = {"op": "export", "checkpoint": str(prefix), "kind": "tf1", "out_dir": str(out)}
    io = {"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}}
    saved = worker.ok({**base, "format": "saved_model", **io})
    frozen = worker.ok(
        {**base, "format": "frozen_graph", "inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}}
    )
    return prefix, out, {"saved_model": saved, "frozen_graph": frozen}


def test_tf1_export_writes_both_formats_into_one_dir(
    tf1_export: tuple[Path, Path, dict[str, Any]],
) -> None:
    _, out, results = tf1_export
    assert "saved_model.pb" in results["saved_model"]["files"]
    assert "variables/variables.index" in results["saved_model"]["files"]
    assert results["frozen_graph"]["files"] == ["frozen.pb"]
    for result in results.values():
        assert all((out / f).is_file() for f in result["files"])
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
    print(f"export seconds: { {k: round(v['seconds'], 3) for k, v in results.items()} }")


def test_tf1_export_verifies(worker: Worker, tf1_export: tuple[Path, Path, dict[str, Any]]) -> None:
    prefix, out, _ = tf1_export
    req = {
        "op": "verify",
        "export_dir": str(out),
        "formats": ["saved_model", "frozen_graph"],
        "checkpoint": str(prefix),
        "inputs": {"x": "x:0"},
        "outputs": {"y": "y:0"},
        "tolerance": 1e-5,
    }
    with_data = worker.ok({**req, "data": str(prefix.parent / "heldout.npz")})
    assert with_data["verified"] is True
    assert with_data["samples"] == 32
    assert with_data["max_abs_diff"] <= 1e-6
    for fmt in ("saved_model", "frozen_graph"):
        assert with_data["details"][fmt]["verified"] is True
        assert with_data["details"][fmt]["outputs"]["y"] <= 1e-6
    assert with_data["details"]["saved_model"]["signature"] == "serving_default"

    random = worker.ok({**req, "formats": None})  # formats detected, inputs generated
    assert random["verified"] is True and random["samples"] == 4
    assert random["details"]["inputs"]["x"] == {
        "shape": [4, 64],
        "dtype": "float32",
        "source": "random",
    }

    # An export of step 30 does not verify against the step-10 checkpoint.
    older = prefix.with_name("model.ckpt-10")
    mismatch = worker.ok({**req, "checkpoint": str(older)})
    assert mismatch["verified"] is False and mismatch["max_abs_diff"] > 1e-3
    print(f"verify seconds: {with_data['seconds']:.3f} (data), {random['seconds']:.3f} (random)")


def test_tf1_exports_compute_what_the_checkpoint_computes(
    worker: Worker, tf1_export: tuple[Path, Path, dict[str, Any]]
) -> None:
    """Explicitly: SavedModel and frozen.pb outputs vs softmax(MLP) in numpy on the raw weights."""
    prefix, out, _ = tf1_export
    got = worker.ok(python_eval("export_outputs", prefix, run=str(out)))["metrics"]
    assert got["rows"] == 32
    assert got["saved_model_vs_numpy"] < 1e-5
    assert got["frozen_vs_numpy"] < 1e-5
    assert got["saved_model_vs_frozen"] < 1e-6
    assert got["frozen_placeholders"] == 1  # only x: y_ and the training ops were pruned
    assert got["frozen_variable_ops"] == 0  # every variable is a constant now


def test_saved_model_cli_shows_the_signature(
    tf1_export: tuple[Path, Path, dict[str, Any]],
) -> None:
    _, out, _ = tf1_export
    cli = Path(PY).with_name("saved_model_cli")
    cmd = [str(cli)] if cli.exists() else [PY, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(
        [*cmd, "show", "--all", "--dir", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "signature_def['serving_default']" in proc.stdout
    assert "inputs['x']" in proc.stdout and "outputs['y']" in proc.stdout
    assert "tensorflow/serving/predict" in proc.stdout


def test_export_refusals(
    worker: Worker, corpus: Corpus, tf1_export: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    prefix, out, _ = tf1_export
    base = {"op": "export", "checkpoint": str(prefix), "kind": "tf1", "out_dir": str(out)}
    io = {"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}}
    again = worker.fail({**base, "format": "saved_model", **io}, "bad_request")
    assert "saved_model.pb" in again and str(out) in again
    keras_file = corpus.saves["keras"][-1]["prefix"]
    frozen_keras = {**base, "format": "frozen_graph", "kind": "keras", "checkpoint": keras_file}
    assert "tf1" in worker.fail({**frozen_keras, **io}, "bad_request")
    tf2 = {**base, "format": "saved_model", "kind": "tf2", "out_dir": str(tmp_path / "tf2")}
    tf2["checkpoint"] = corpus.saves["tf2"][-1]["prefix"]
    assert "'builder'" in worker.fail(tf2, "bad_request")
    missing = {**base, "checkpoint": str(prefix.with_name("model.ckpt-7")), "format": "saved_model"}
    assert "model.ckpt-7" in worker.fail({**missing, **io}, "not_found")
    assert str(tmp_path) in worker.fail(
        {"op": "verify", "export_dir": str(tmp_path / "none"), "checkpoint": str(prefix)},
        "not_found",
    )


def test_keras_export_is_a_loadable_saved_model(
    worker: Worker, corpus: Corpus, tmp_path: Path
) -> None:
    save = corpus.saves["keras"][-1]
    out = tmp_path / "keras-export"
    req = {"op": "export", "format": "saved_model", "kind": "keras", "out_dir": str(out)}
    result = worker.ok({**req, "checkpoint": save["prefix"]})  # Keras prints: off the protocol
    assert "saved_model.pb" in result["files"] and (out / "saved_model.pb").is_file()
    verify = {"op": "verify", "export_dir": str(out), "checkpoint": save["prefix"]}
    data = str(corpus.run_dir("keras") / "heldout.npz")
    checked = worker.ok({**verify, "data": data, "inputs": {"x": "x"}, "outputs": {"y": "y"}})
    assert checked["verified"] is True and checked["samples"] == 32
    assert checked["details"]["saved_model"]["signature"] == "serving_default"
    other = corpus.saves["keras"][0]["prefix"]
    assert worker.ok({**verify, "checkpoint": other})["verified"] is False
    # As the daemon asks: no input/output names, the keras evaluator's feed, explicit kind.
    daemon_style = {
        **verify,
        "kind": "keras",
        "formats": ["saved_model"],
        "inputs": {},
        "outputs": {},
        "data": data,
        "feed": {"x": "x", "y": "y"},
        "tolerance": 1e-5,
        "use_ema": False,
    }
    checked = worker.ok(daemon_style)
    assert checked["verified"] is True
    (source,) = [i["source"] for i in checked["details"]["inputs"].values()]
    assert source == f"{data}:x"


def test_tf2_export_with_a_builder(worker: Worker, corpus: Corpus, tmp_path: Path) -> None:
    prefix = corpus.saves["tf2"][-1]["prefix"]
    out = tmp_path / "tf2-export"
    req = {"op": "export", "format": "saved_model", "kind": "tf2", "out_dir": str(out)}
    builder = "tests.eval_fns:build_tf2"
    result = worker.ok({**req, "checkpoint": prefix, "builder": builder})
    assert "saved_model.pb" in result["files"]
    verify = {"op": "verify", "export_dir": str(out), "kind": "tf2", "builder": builder}
    checked = worker.ok({**verify, "checkpoint": prefix})
    assert checked["verified"] is True and checked["max_abs_diff"] <= 1e-6
    assert checked["details"]["saved_model"]["outputs"].keys() == {"probs"}
    first = corpus.saves["tf2"][0]["prefix"]
    assert worker.ok({**verify, "checkpoint": first})["verified"] is False


# ------------------------------------------------------------------ once mode


def test_once_writes_the_result_atomically(corpus: Corpus, tmp_path: Path) -> None:
    save = corpus.saves["tf1"][1]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"id": "once-1", **evaluate(Path(save["prefix"]))}))
    result = tmp_path / "result.json"
    result.write_text("stale")
    proc = subprocess.run(
        [PY, "-m", "ckptd.worker", "once", str(request), str(result)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""  # nothing but the result file
    response = json.loads(result.read_text())
    assert response["id"] == "once-1" and response["ok"] is True
    assert response["result"]["metrics"] == pytest.approx(save["metrics"], rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["request.json", "result.json"]

    request.write_text("{not json")
    proc = subprocess.run(
        [PY, "-m", "ckptd.worker", "once", str(request), str(result)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1
    response = json.loads(result.read_text())
    assert response["ok"] is False and response["kind"] == "bad_request"
    assert str(request) in response["error"]
    assert not (tmp_path / "result.json.tmp").exists()


def test_client_typed_methods(corpus: Corpus, tmp_path: Path) -> None:
    from ckptd.worker.client import WorkerClient

    save, prefix = tf1_copy(corpus, tmp_path / "tf1")[-1]
    client = WorkerClient()
    try:
        result = client.evaluate(
            requests.EvaluateRequest(
                evaluator="meta_graph",
                checkpoint=str(prefix),
                data=str(prefix.parent / "heldout.npz"),
                feed=FEED,
                fetch=FETCH,
            ),
            timeout=180,
        )
        assert result["metrics"] == pytest.approx(save["metrics"], rel=1e-5)
        assert result["rows"] == 512 and result["warm"] is False
        out = tmp_path / "export"
        io = {"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}}
        exported = client.export(
            requests.ExportRequest(
                format="frozen_graph", checkpoint=str(prefix), out_dir=str(out), **io
            ),
            timeout=180,
        )
        assert exported["files"] == ["frozen.pb"] and exported["out_dir"] == str(out)
        verified = client.verify(
            requests.VerifyRequest(export_dir=str(out), checkpoint=str(prefix), **io),
            timeout=180,
        )
        assert verified["verified"] is True and verified["formats"] == ["frozen_graph"]
        with pytest.raises(protocol.WorkerFailure) as err:
            client.verify(
                requests.VerifyRequest(export_dir=str(tmp_path / "none"), checkpoint=str(prefix)),
                timeout=180,
            )
        assert err.value.kind == "not_found" and str(tmp_path / "none") in str(err.value)
        assert client.started == 1 and client.pid() is not None  # not_found keeps it warm
    finally:
        client.close()


def test_terminate_wins_against_a_worker_being_started(tmp_path: Path) -> None:
    """Shutdown while an evaluation is between 'running' and its worker's start (a race a
    SIGTERM test found): the new worker is stopped at once and the call says "stopping"."""
    from ckptd.worker.client import WorkerClient

    client = WorkerClient()
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = client._spawn

    stopper = threading.Thread(target=client.terminate)  # the shutdown, in another thread

    def spawn_then_terminate() -> subprocess.Popen[bytes]:
        proc = real_spawn()
        spawned.append(proc)
        stopper.start()  # lands mid-spawn: sees no worker yet, then waits for the call
        deadline = time.monotonic() + 10
        while not client._stopping and time.monotonic() < deadline:
            time.sleep(0.01)
        return proc

    client._spawn = spawn_then_terminate  # type: ignore[method-assign]
    with pytest.raises(protocol.WorkerFailure) as err:
        client.call({"op": "ping"}, timeout=60)
    assert err.value.kind == "stopping"
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert spawned and spawned[0].wait(timeout=10) is not None, "the new worker was not stopped"
    with pytest.raises(protocol.WorkerFailure) as again:  # and nothing new starts afterwards
        client.call({"op": "ping"}, timeout=60)
    assert again.value.kind == "stopping" and client.started == 1


def test_worker_busy_in_a_hung_job_exits_when_its_daemon_is_killed(tmp_path: Path) -> None:
    """The daemon is SIGKILLed while its worker runs a job that never returns: the worker sees
    its parent gone and exits, even though its stderr pipe died with the daemon (EPIPE)."""
    parent_code = textwrap.dedent(
        f"""
        import json, subprocess, sys, time
        w = subprocess.Popen([{PY!r}, "-m", "ckptd.worker", "serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        req = {{"id": 1, "op": "evaluate", "evaluator": "python",
               "function": "tests.daemon_eval_fns:hang", "checkpoint": "x", "run": "r"}}
        w.stdin.write((json.dumps(req) + "\\n").encode()); w.stdin.flush()
        print(w.pid, flush=True)
        time.sleep(3600)
        """
    )
    parent = subprocess.Popen(
        [PY, "-c", parent_code], stdout=subprocess.PIPE, env=ENV, cwd=REPO, text=True
    )
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    time.sleep(8)  # the worker imports TensorFlow, then sits in the hung job
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker_pid}/stat") as fh:  # a zombie (pid 1 may not reap) is gone
            if fh.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.2)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        raise AssertionError("the worker outlived its killed daemon by 60 s")
