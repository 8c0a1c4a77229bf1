"""In-model preprocessing, so every backbone takes raw [0, 255] RGB."""

from __future__ import annotations

import keras
from keras import ops

# ImageNet statistics as the Keras applications use them.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

MODES = ("tf", "caffe", "torch", "unit")


@keras.saving.register_keras_serializable(package="trainables")
class Preprocess(keras.layers.Layer):
    """Map raw RGB in [0, 255] to what a backbone's weights expect.

    - ``tf``: scale to [-1, 1] (MobileNetV2)
    - ``caffe``: RGB to BGR, minus the ImageNet mean (VGG16, ResNet50)
    - ``torch``: scale to [0, 1], then ImageNet mean/std (DenseNet121)
    - ``unit``: scale to [0, 1] (the reference studies' small CNNs)
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, self.compute_dtype)
        mean = ops.convert_to_tensor(_TORCH_MEAN, self.compute_dtype)
        std = ops.convert_to_tensor(_TORCH_STD, self.compute_dtype)
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
