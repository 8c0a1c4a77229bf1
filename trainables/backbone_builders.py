"""The built-in backbones' Keras builders, one per registered name (``trainables.backbones``).

Imported on the first ``create_backbone``: the registry names each builder here by
its import path, so listing and checking backbones needs no Keras.
Every builder is ``build(inputs, preprocessed, *, weights, include_top, name) -> keras.Model``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import keras
from keras import layers

from trainables.efficientnet_lite import build_efficientnet_lite

Builder = Callable[..., keras.Model]


def _keras_app(app: Callable, **extra) -> Builder:
    def build(inputs, x, *, weights, include_top, name):
        model = app(include_top=include_top, weights=weights, input_tensor=x, **extra)
        return keras.Model(inputs, model.output, name=name)

    return build


def _efficientnet(app: Callable) -> Builder:
    """Keras's EfficientNet, which normalises its own inputs.

    Keras adds the last step of its ImageNet input scaling only for
    ``weights="imagenet"`` (tensorflow/tensorflow#49930), not for a weights file.
    For a file, the same per-channel affine map is put in front, so both
    give the network ``(x / 255 - mean) / std``.
    """
    keras_build = _keras_app(app)

    def build(inputs, x, *, weights, include_top, name):
        if weights not in (None, "imagenet"):
            inv_sqrt_std = [1.0 / math.sqrt(s) for s in _IMAGENET_STD]
            offset = [255.0 * m * (1.0 - k) for m, k in zip(_IMAGENET_MEAN, inv_sqrt_std)]
            x = layers.Rescaling(inv_sqrt_std, offset, name="imagenet_std")(x)
        return keras_build(inputs, x, weights=weights, include_top=include_top, name=name)

    return build


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
mobilenet_v2 = _keras_app(keras.applications.MobileNetV2)
efficientnet_b0 = _efficientnet(keras.applications.EfficientNetB0)
efficientnet_b1 = _efficientnet(keras.applications.EfficientNetB1)
vgg16 = _keras_app(keras.applications.VGG16)
resnet50 = _keras_app(keras.applications.ResNet50)
densenet121 = _keras_app(keras.applications.DenseNet121)


def _no_top(features: Callable) -> Builder:
    """Adapter for the reference studies' CNNs, which have no ImageNet top."""

    def build(inputs, x, *, weights, include_top, name):
        if include_top:
            raise ValueError(f"backbone {name!r} has no classifier top; use include_top=False")
        return keras.Model(inputs, features(x), name=name)

    return build


@_no_top
def cnn_s2(x):
    """S2's custom CNN up to Flatten: Conv32-BN-Pool, Conv64-BN-Pool-Drop.3, Conv128-BN-Pool-Drop.4."""
    for filters, dropout in ((32, 0.0), (64, 0.3), (128, 0.4)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    return x


@_no_top
def cnn_s3(x):
    """S3's baseline CNN up to Flatten: Conv32-Pool-Conv64-Pool."""
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    return x


efficientnet_lite0 = functools.partial(build_efficientnet_lite, variant="efficientnet_lite0")
efficientnet_lite1 = functools.partial(build_efficientnet_lite, variant="efficientnet_lite1")
efficientnet_lite2 = functools.partial(build_efficientnet_lite, variant="efficientnet_lite2")
