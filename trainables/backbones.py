"""Backbone registry: ``create_backbone(name, ...)`` is the one way to get a backbone.

Every backbone takes raw RGB pixels in [0, 255] and preprocesses inside the
model, so an exported model needs nothing around it.  A backbone is a Keras
model without its classifier top; the head lives in ``trainables.model``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Callable

import keras
from keras import layers

from trainables.preprocess import Preprocess
from trainables.weights import find_weights, weights_file

Builder = Callable[..., keras.Model]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Builder  # build(inputs, preprocessed, *, weights, include_top, name) -> Model
    preprocess: str  # a Preprocess mode; "none" when the model normalises itself
    imagenet: bool  # whether ImageNet weights exist for it
    layers: int  # layers below the input, as built without weights: the deepest ``unfreeze`` that means anything
    min_size: int = 32


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, preprocess: str, layers: int, imagenet: bool = True, min_size: int = 32):
    """Decorator: register ``build`` under ``name``.

    ``layers`` is how many layers the built backbone has below its input
    (``len(model.layers) - 1``, the same at every input size): studies are
    checked against it before Ray starts, without building the model there.
    tests/trainables/test_backbones.py checks it against the built model.
    """

    def wrap(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = BackboneSpec(name, build, preprocess, imagenet, layers, min_size)
        return build

    return wrap


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone``, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_name_message("backbone", name, _REGISTRY)) from None


def unknown_name_message(what: str, name: object, valid) -> str:
    """``unknown backbone 'mobilenetv2'; did you mean 'mobilenet_v2'?`` with the valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}{hint} Valid: {', '.join(valid)}"


def create_backbone(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    weights: str | None = None,
    include_top: bool = False,
    weights_dir: str | None = None,
) -> keras.Model:
    """Build backbone ``name`` taking raw [0, 255] RGB of ``input_shape``.

    ``weights`` is ``None`` (random init), ``"imagenet"``, or a path to a weights file.
    ImageNet weights come from ``weights_dir`` (or ``$MEDSEARCH_WEIGHTS_DIR``), else
    Keras's cache, else a download; see ``trainables.weights``.
    """
    spec = get_backbone_spec(name)
    if weights not in (None, "imagenet") and not str(weights).endswith((".h5", ".keras", ".weights.h5")):
        raise ValueError(f"weights must be None, 'imagenet' or a weights file path, got {weights!r}")
    if weights is not None and not spec.imagenet:
        raise ValueError(f"backbone {name!r} has no pretrained weights; use weights=None")
    if min(input_shape[:2]) < spec.min_size:
        raise ValueError(f"backbone {name!r} needs images of at least {spec.min_size} px, got {input_shape}")
    if weights == "imagenet" and weights_file(name) is not None:
        rows = input_shape[0] if input_shape[0] == input_shape[1] else 0  # Keras's rule: non-square uses 224
        weights = str(find_weights(name, image_size=rows, include_top=include_top, weights_dir=weights_dir))
    inputs = keras.Input(shape=input_shape, name="rgb_0_255")
    x = Preprocess(spec.preprocess, name="preprocess")(inputs) if spec.preprocess != "none" else inputs
    return spec.build(inputs, x, weights=weights, include_top=include_top, name=name)


def _keras_app(app: Callable, **extra) -> Builder:
    def build(inputs, x, *, weights, include_top, name):
        model = app(include_top=include_top, weights=weights, input_tensor=x, **extra)
        return keras.Model(inputs, model.output, name=name)

    return build


register_backbone("mobilenet_v2", preprocess="tf", layers=154)(_keras_app(keras.applications.MobileNetV2))
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
register_backbone("efficientnet_b0", preprocess="none", layers=236)(_efficientnet(keras.applications.EfficientNetB0))
register_backbone("efficientnet_b1", preprocess="none", layers=338)(_efficientnet(keras.applications.EfficientNetB1))
register_backbone("vgg16", preprocess="caffe", layers=19)(_keras_app(keras.applications.VGG16))
register_backbone("resnet50", preprocess="caffe", layers=175)(_keras_app(keras.applications.ResNet50))
register_backbone("densenet121", preprocess="torch", layers=427)(_keras_app(keras.applications.DenseNet121))


def _no_top(features: Callable) -> Builder:
    """Adapter for the reference studies' CNNs, which have no ImageNet top."""

    def build(inputs, x, *, weights, include_top, name):
        if include_top:
            raise ValueError(f"backbone {name!r} has no classifier top; use include_top=False")
        return keras.Model(inputs, features(x), name=name)

    return build


@register_backbone("cnn_s2", preprocess="unit", layers=12, imagenet=False, min_size=16)
@_no_top
def _cnn_s2(x):
    """S2's custom CNN up to Flatten: Conv32-BN-Pool, Conv64-BN-Pool-Drop.3, Conv128-BN-Pool-Drop.4."""
    for filters, dropout in ((32, 0.0), (64, 0.3), (128, 0.4)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    return x


@register_backbone("cnn_s3", preprocess="unit", layers=5, imagenet=False, min_size=16)
@_no_top
def _cnn_s3(x):
    """S3's baseline CNN up to Flatten: Conv32-Pool-Conv64-Pool."""
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    return x


from trainables.efficientnet_lite import build_efficientnet_lite  # noqa: E402


def _lite(variant: str) -> Builder:
    return functools.partial(build_efficientnet_lite, variant=variant)


register_backbone("efficientnet_lite0", preprocess="none", layers=150)(_lite("efficientnet_lite0"))
register_backbone("efficientnet_lite1", preprocess="none", layers=200)(_lite("efficientnet_lite1"))
register_backbone("efficientnet_lite2", preprocess="none", layers=200)(_lite("efficientnet_lite2"))
