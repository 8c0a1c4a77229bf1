"""Temperature scaling inside a Keras model, so an exported classifier outputs calibrated probabilities.

``TemperatureScaling(T)`` maps a row of probabilities ``p`` to
``softmax(log(max(p, 1e-12)) / T)``: the function ``analysis.calibration``
fits ``T`` for (on the validation probabilities the model outputs) and
applies with ``apply_temperature``, computed here in float32. It works on the
model's probabilities rather than its logits on purpose: that is what ``T``
was fitted on, and a checkpoint trained on cached features composes its head
differently, so the softmax's input is not reachable the same way in every
model. ``with_temperature(model, T)`` wraps a classifier with it.

The layer is registered (package ``trainables``), so a ``.keras`` file that
holds it loads once this module is imported.
"""

from __future__ import annotations

import keras
from keras import ops

LOG_FLOOR = 1e-12  # as analysis.calibration.apply_temperature: log(0) would be a logit of -inf


@keras.saving.register_keras_serializable(package="trainables")
class TemperatureScaling(keras.layers.Layer):
    """Probabilities in, probabilities out: ``softmax(log(clip(p, 1e-12, 1)) / temperature)`` per row."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = temperature

    def call(self, probs):
        p = ops.cast(probs, "float32")
        logits = ops.log(ops.clip(p, LOG_FLOOR, 1.0)) / self.temperature
        return ops.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` (raw RGB in, probabilities out) followed by ``TemperatureScaling(temperature)``."""
    inputs = keras.Input(shape=model.input_shape[1:], name="image", dtype="float32")
    outputs = TemperatureScaling(temperature, name="temperature_scaling", dtype="float32")(model(inputs))
    return keras.Model(inputs, outputs, name=f"{model.name}_calibrated")


@keras.saving.register_keras_serializable(package="trainables")
class DihedralView(keras.layers.Layer):
    """One symmetry of the square, on a batch (N, H, W, C) with H == W: rotated by ``turns`` x 90 degrees
    (``numpy.rot90(x, turns, axes=(1, 2))``), then mirrored left-right when ``mirror``. Test-time augmentation
    views (``analysis.final_model.tta_views``) as a layer, so an exported graph averages the same views."""

    def __init__(self, turns: int = 0, mirror: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.turns, self.mirror = int(turns) % 4, bool(mirror)

    def call(self, images):
        x = images
        if self.turns == 1:  # numpy.rot90, k = 1: flip the second axis, then swap the two
            x = ops.transpose(ops.flip(x, axis=2), (0, 2, 1, 3))
        elif self.turns == 2:
            x = ops.flip(ops.flip(x, axis=1), axis=2)
        elif self.turns == 3:  # k = 3: swap, then flip the second axis
            x = ops.flip(ops.transpose(x, (0, 2, 1, 3)), axis=2)
        return ops.flip(x, axis=2) if self.mirror else x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "turns": self.turns, "mirror": self.mirror}
