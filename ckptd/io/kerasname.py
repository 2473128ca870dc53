"""Keras ModelCheckpoint file names: the template parser, light enough for the config to import.

The config validates ``keras_template`` with this very parser, so a template that passes
``config check`` is one every scan can use.
"""

from __future__ import annotations

import math
import re


class KerasTemplate:
    """Turns a ModelCheckpoint filename template into a parser for epoch and metrics.

    ``model.{epoch:02d}-{val_loss:.2f}.keras`` parses ``model.03-0.41.keras`` as step 3,
    ``val_loss = 0.41``.
    """

    _FIELD = re.compile(r"\{(\w+)(?::([^}]*))?\}")
    _NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"

    def __init__(self, template: str) -> None:
        pattern, pos = "", 0
        fields: list[str] = []
        for m in self._FIELD.finditer(template):
            pattern += re.escape(template[pos : m.start()])
            name, spec = m.group(1), m.group(2) or ""
            fields.append(name)
            group = r"\d+" if spec.endswith("d") or name in ("epoch", "batch") else self._NUMBER
            # Each field is atomic: it takes the longest number there and is never re-split, so
            # a long hostile file name costs linear time (nested choices between fields
            # backtracked polynomially). A template that needs a re-split is refused by the
            # config's format-and-parse-back check. A field used twice is captured once.
            inner = f"(?:{group})" if name in fields[:-1] else f"(?P<{name}>{group})"
            pattern += f"(?>{inner})"
            pos = m.end()
        pattern += re.escape(template[pos:])
        self.regex = re.compile(pattern + "$")

    def parse(self, filename: str) -> tuple[int | None, dict[str, float]] | None:
        m = self.regex.match(filename)
        if not m:
            return None
        step = None
        metrics = {}
        for name, text in m.groupdict().items():
            if name in ("epoch", "batch"):
                step = int(text)
            else:
                try:
                    metrics[name] = float(text)
                except ValueError:
                    metrics[name] = math.nan
        return step, metrics
