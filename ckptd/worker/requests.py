"""The worker's typed requests (ping, evaluate, export, verify): their fields, and how each is
written to and read from its wire dict (``protocol.py`` frames the lines)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ckptd.worker.protocol import BAD_REQUEST, WorkerFailure


def is_entry_point(spec: str) -> bool:
    """'package.module:function' (a user function), as opposed to a file path."""
    return re.fullmatch(r"[\w.]+:[\w.]+", spec) is not None


class _Fields:
    """Typed reads of one wire request's fields; a missing or mistyped field is a bad_request.

    None counts as absent everywhere (senders write None for "not set")."""

    def __init__(self, wire: dict[str, Any]) -> None:
        self.wire = wire
        self.op = wire.get("op")

    def bad(self, message: str) -> WorkerFailure:
        return WorkerFailure(BAD_REQUEST, f"{self.op}: {message}")

    def _get(self, key: str, types: type | tuple[type, ...], required: bool) -> Any:
        value = self.wire.get(key)
        if value is None:
            if required:
                raise self.bad(f"missing field {key!r}")
            return None
        if not isinstance(value, types):
            raise self.bad(f"field {key!r} has type {type(value).__name__}")
        return value

    def text(self, key: str) -> str:
        return str(self._get(key, str, True))

    def opt_text(self, key: str) -> str | None:
        return self._get(key, str, False)

    def path(self, key: str) -> str:
        return os.path.abspath(os.path.expanduser(self.text(key)))

    def opt_path(self, key: str) -> str | None:
        value = self.opt_text(key)
        return value and os.path.abspath(os.path.expanduser(value))

    def opt_model(self, key: str) -> str | None:
        """A Keras architecture: a ``.keras`` file (made absolute) or ``module:function``."""
        value = self.opt_text(key)
        if value and is_entry_point(value):
            return value
        return value and os.path.abspath(os.path.expanduser(value))

    def opt_names(self, key: str) -> dict[str, str] | None:
        """A {str: str} mapping (feed, fetch, inputs, outputs); {} counts as absent."""
        value: dict[Any, Any] | None = self._get(key, dict, False)
        if not value:
            return None
        bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise self.bad(f"field {key!r} must map names to strings: {bad}")
        return dict(value)

    def names(self, key: str) -> dict[str, str]:
        value = self.opt_names(key)
        if value is None:
            raise self.bad(f"missing field {key!r}")
        return value

    def opt_mapping(self, key: str) -> dict[str, Any] | None:
        return self._get(key, dict, False)

    def opt_strings(self, key: str) -> list[str] | None:
        value: list[Any] | None = self._get(key, list, False)
        if value is not None and not all(isinstance(v, str) for v in value):
            raise self.bad(f"field {key!r} must be a list of strings")
        return value

    def flag(self, key: str) -> bool:
        return bool(self._get(key, bool, False))

    def opt_int(self, key: str) -> int | None:
        return self._get(key, int, False)

    def number(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), False)
        return default if value is None else float(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.opt_text(key) or default
        if value is None:
            raise self.bad(f"missing field {key!r}")
        if value not in choices:
            raise self.bad(f"{key} {value!r} is not one of {', '.join(choices)}")
        return value


@dataclass(frozen=True, kw_only=True)
class Request:
    """Base of the request kinds: ``op`` names the kind on the wire."""

    op: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The request as its JSON object (without the id); unset (None) fields are left out."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"op": self.op, **{k: v for k, v in fields.items() if v is not None}}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        """The typed request of a wire dict (a request without fields ignores them all)."""
        return cls()


@dataclass(frozen=True, kw_only=True)
class PingRequest(Request):
    op: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True)
class CheckpointRequest(Request):
    """A request about one checkpoint of a run."""

    checkpoint: str
    run: str | None = None  # the run directory (warm-cache key); default the checkpoint's dir

    def run_dir(self) -> str:
        return os.path.realpath(self.run or os.path.dirname(self.checkpoint))


EVALUATORS = ("meta_graph", "keras", "python")
CHECKPOINT_KINDS = ("tf1", "tf2", "keras")
EXPORT_FORMATS = ("saved_model", "frozen_graph")


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(CheckpointRequest):
    """Metrics of one checkpoint, by a meta graph, a Keras model or a user function."""

    op: ClassVar[str] = "evaluate"
    evaluator: str  # one of EVALUATORS
    step: int | None = None  # passed to a python evaluator
    data: str | None = None  # .npz of the held-out set (meta_graph, keras)
    feed: dict[str, str] | None = None  # tensor (keras: x, y, sample_weight) -> array name
    fetch: dict[str, str] | None = None  # metric name -> tensor (meta_graph)
    use_ema: bool = False  # restore ExponentialMovingAverage shadow values (meta_graph)
    batch_size: int | None = None
    meta: str | None = None  # meta graph to build from; default <checkpoint>.meta
    # The architecture of a weights-only checkpoint: a .keras file or 'module:function'
    model: str | None = None
    function: str | None = None  # 'package.module:function' (python)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        f = _Fields(wire)
        evaluator = f.choice("evaluator", EVALUATORS)
        graph = evaluator == "meta_graph"
        request = cls(
            evaluator=evaluator,
            function=f.text("function") if evaluator == "python" else f.opt_text("function"),
            checkpoint=f.path("checkpoint"),
            run=f.opt_path("run"),
            step=f.opt_int("step"),
            data=f.opt_path("data") if evaluator == "python" else f.path("data"),
            feed=f.names("feed") if graph else f.opt_names("feed"),
            fetch=f.names("fetch") if graph else f.opt_names("fetch"),
            use_ema=f.flag("use_ema"),
            batch_size=f.opt_int("batch_size"),
            meta=f.opt_path("meta"),
            model=f.opt_model("model"),
        )
        if request.batch_size is not None and request.batch_size < 1:
            raise f.bad(f"batch_size must be >= 1, got {request.batch_size}")
        return request


@dataclass(frozen=True, kw_only=True)
class ExportRequest(CheckpointRequest):
    """Write one format of a checkpoint's export into ``out_dir`` (which may hold the other)."""

    op: ClassVar[str] = "export"
    format: str  # one of EXPORT_FORMATS
    out_dir: str
    kind: str = "tf1"  # one of CHECKPOINT_KINDS
    inputs: dict[str, str] | None = None  # signature input name -> tensor (tf1 saved_model)
    outputs: dict[str, str] | None = None  # signature output name -> tensor (tf1)
    builder: str | None = None  # 'package.module:function' returning a tf.Module (tf2)
    model: str | None = None  # keras: the architecture of a weights-only checkpoint
    use_ema: bool = False  # tf1 only

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        f = _Fields(wire)
        fmt = f.choice("format", EXPORT_FORMATS)
        kind = f.choice("kind", CHECKPOINT_KINDS, "tf1")
        tf1 = kind == "tf1"
        request = cls(
            format=fmt,
            kind=kind,
            checkpoint=f.path("checkpoint"),
            out_dir=f.path("out_dir"),
            use_ema=f.flag("use_ema"),
            run=f.opt_path("run"),
            builder=f.text("builder") if kind == "tf2" else f.opt_text("builder"),
            inputs=f.names("inputs") if tf1 and fmt == "saved_model" else f.opt_names("inputs"),
            outputs=f.names("outputs") if tf1 else f.opt_names("outputs"),
            model=f.opt_model("model"),
        )
        if request.use_ema and not tf1:
            raise f.bad("use_ema applies to tf1 meta graphs only")
        if fmt == "frozen_graph" and not tf1:
            raise f.bad(f"frozen_graph needs a tf1 meta graph, not kind {kind!r}")
        return request


@dataclass(frozen=True, kw_only=True)
class VerifyRequest(CheckpointRequest):
    """Feed the same inputs to an export and to its checkpoint; compare the outputs."""

    op: ClassVar[str] = "verify"
    export_dir: str
    formats: list[str] | None = None  # default: the formats export_dir holds
    kind: str | None = None  # default: keras for .keras/.h5, tf2 with a builder, else tf1
    inputs: dict[str, str] | None = None
    outputs: dict[str, str] | None = None
    builder: str | None = None
    model: str | None = None
    data: str | None = None  # .npz whose first rows are fed; default generated inputs
    feed: dict[str, Any] | None = None  # input -> array name in data, or literal values
    tolerance: float = 1e-5  # largest accepted |export - checkpoint| of any output
    use_ema: bool = False

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        f = _Fields(wire)
        formats = f.opt_strings("formats")
        for fmt in formats or ():
            if fmt not in EXPORT_FORMATS:
                raise f.bad(f"unknown format {fmt!r}")
        checkpoint = f.path("checkpoint")
        builder = f.opt_text("builder")
        kind = f.choice("kind", CHECKPOINT_KINDS, _default_kind(checkpoint, builder))
        return cls(
            export_dir=f.path("export_dir"),
            checkpoint=checkpoint,
            formats=formats,
            kind=kind,
            inputs=f.opt_names("inputs"),
            outputs=f.opt_names("outputs"),
            # As for export: a tf2 checkpoint is rebuilt by its builder, nothing else.
            builder=f.text("builder") if kind == "tf2" else builder,
            model=f.opt_model("model"),
            data=f.opt_path("data"),
            feed=f.opt_mapping("feed"),
            tolerance=f.number("tolerance", 1e-5),
            use_ema=f.flag("use_ema"),
            run=f.opt_path("run"),
        )

    def checkpoint_kind(self) -> str:
        return self.kind or _default_kind(self.checkpoint, self.builder)


def _default_kind(checkpoint: str, builder: str | None) -> str:
    return "keras" if checkpoint.endswith((".keras", ".h5")) else "tf2" if builder else "tf1"


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls for cls in (PingRequest, EvaluateRequest, ExportRequest, VerifyRequest)
}


def parse_request(wire: dict[str, Any]) -> Request:
    """The typed request of a decoded line; anything malformed is a bad_request."""
    op = wire.get("op")
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise WorkerFailure(
            BAD_REQUEST, f"unknown op {op!r}; expected one of {', '.join(REQUESTS)}"
        )
    return cls.from_wire(wire)
