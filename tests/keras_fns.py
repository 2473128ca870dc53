"""Keras architecture builders the worker imports by name in tests (`tests.keras_fns:NAME`)."""

from __future__ import annotations

from typing import Any


def tour_model() -> Any:
    """The README Keras tour's model, compiled as its job compiles it (``keras_model`` =
    "tests.keras_fns:tour_model")."""
    import keras

    model = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    return model


def not_a_model() -> Any:
    return {"layers": 2}
