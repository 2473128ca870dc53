"""User functions named in requests ('package.module:function'), imported in the worker."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from ckptd.worker.protocol import BAD_REQUEST, WorkerFailure


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
