"""User functions named in requests ('package.module:function'), imported in the worker, and
the Keras architecture (a file or such a function) of a weights-only checkpoint."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from ckptd.worker.files import require_checkpoint
from ckptd.worker.protocol import BAD_REQUEST, WorkerFailure
from ckptd.worker.requests import is_entry_point


def import_function(spec: str, what: str) -> tuple[Callable[..., Any], bool]:
    """'pkg.mod:fn' -> (fn, module was already imported)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise WorkerFailure(
            BAD_REQUEST, f"{what} {spec!r} is not of the form 'package.module:function'"
        )
    warm = module_name in sys.modules
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerFailure(
            BAD_REQUEST, f"{what} {spec!r}: cannot import {module_name}: {exc}"
        ) from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise WorkerFailure(BAD_REQUEST, f"{what} {spec!r}: {module_name} has no {attr}") from None
    if not callable(obj):
        raise WorkerFailure(BAD_REQUEST, f"{what} {spec!r} is not callable")
    return obj, warm


def keras_architecture(spec: str) -> Any:
    """A fresh Keras model from ``spec``: a ``.keras`` file, or a ``module:function`` called
    with no arguments that returns one (compiled, for the keras evaluator)."""
    import keras

    if not is_entry_point(spec):
        require_checkpoint(spec)
        return keras.saving.load_model(spec)
    build, _ = import_function(spec, "keras_model")
    model = build()
    if not isinstance(model, keras.Model):
        raise WorkerFailure(
            BAD_REQUEST, f"keras_model {spec} returned {type(model).__name__}, not a keras.Model"
        )
    return model
