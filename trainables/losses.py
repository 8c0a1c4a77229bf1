"""The training loss: sparse cross-entropy, optionally with label smoothing.

Keras 3's ``SparseCategoricalCrossentropy`` has no ``label_smoothing`` (only the
one-hot ``CategoricalCrossentropy`` has), and our labels are class indices
everywhere (arrays, caches, folds). ``SmoothedSparseCrossentropy`` one-hots them
inside the loss and applies Keras's own smoothing: the target of the true class
becomes ``1 - s + s / C``, every other class ``s / C``.

``loss_for(0)`` is the plain string Keras has always been given, so a study
that does not search smoothing trains exactly as before.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["SmoothedSparseCrossentropy", "loss_for"]


@keras.saving.register_keras_serializable(package="trainables")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of class-index labels against probabilities, with label smoothing ``label_smoothing``."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        label_smoothing = float(label_smoothing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def loss_for(label_smoothing: float):
    """What ``model.compile(loss=...)`` gets for a trial with this ``label_smoothing``."""
    return "sparse_categorical_crossentropy" if not label_smoothing else SmoothedSparseCrossentropy(label_smoothing)
