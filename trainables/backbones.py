"""Backbone registry: ``create_backbone(name, ...)`` is the one way to get a backbone.

Every backbone takes raw RGB pixels in [0, 255] and preprocesses inside the
model, so an exported model needs nothing around it.  A backbone is a Keras
model without its classifier top; the head lives in ``trainables.model``.

The registry imports no Keras: a built-in backbone's builder is named by its
import path (in ``trainables.backbone_builders``) and imported on the first
``create_backbone``, so listing names and checking a study's backbones and
unfreeze depths stay cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Callable

from trainables.checks import unknown_name_message
from trainables.weights import find_weights, weights_file

if TYPE_CHECKING:
    import keras

Builder = Callable[..., "keras.Model"]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Builder | str  # build(inputs, preprocessed, *, weights, include_top, name) -> Model, or "module:function"
    preprocess: str  # a Preprocess mode; "none" when the model normalises itself
    imagenet: bool  # whether ImageNet weights exist for it
    layers: int  # layers below the input, as built without weights: the deepest ``unfreeze`` that means anything
    min_size: int = 32

    def builder(self) -> Builder:
        """The build function, imported now if it was registered by import path."""
        if callable(self.build):
            return self.build
        module, _, attribute = self.build.partition(":")
        return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, preprocess: str, layers: int, imagenet: bool = True, min_size: int = 32):
    """Decorator: register ``build`` under ``name``. ``build`` may also be a ``"module:function"`` string,
    imported on the first ``create_backbone``, so that registering imports nothing.

    ``layers`` is how many layers the built backbone has below its input
    (``len(model.layers) - 1``, the same at every input size): studies are
    checked against it before Ray starts, without building the model there.
    tests/trainables/test_backbones.py checks it against the built model.
    """

    def wrap(build: Builder | str) -> Builder | str:
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
    import keras

    from trainables.preprocess import Preprocess

    inputs = keras.Input(shape=input_shape, name="rgb_0_255")
    x = Preprocess(spec.preprocess, name="preprocess")(inputs) if spec.preprocess != "none" else inputs
    return spec.builder()(inputs, x, weights=weights, include_top=include_top, name=name)


_BUILT_IN = "trainables.backbone_builders:"  # + the function named like the backbone
register_backbone("mobilenet_v2", preprocess="tf", layers=154)(_BUILT_IN + "mobilenet_v2")
register_backbone("efficientnet_b0", preprocess="none", layers=236)(_BUILT_IN + "efficientnet_b0")
register_backbone("efficientnet_b1", preprocess="none", layers=338)(_BUILT_IN + "efficientnet_b1")
register_backbone("vgg16", preprocess="caffe", layers=19)(_BUILT_IN + "vgg16")
register_backbone("resnet50", preprocess="caffe", layers=175)(_BUILT_IN + "resnet50")
register_backbone("densenet121", preprocess="torch", layers=427)(_BUILT_IN + "densenet121")
# The reference studies' small CNNs: no ImageNet weights, and they take images down to 16 px.
register_backbone("cnn_s2", preprocess="unit", layers=12, imagenet=False, min_size=16)(_BUILT_IN + "cnn_s2")
register_backbone("cnn_s3", preprocess="unit", layers=5, imagenet=False, min_size=16)(_BUILT_IN + "cnn_s3")
register_backbone("efficientnet_lite0", preprocess="none", layers=150)(_BUILT_IN + "efficientnet_lite0")
register_backbone("efficientnet_lite1", preprocess="none", layers=200)(_BUILT_IN + "efficientnet_lite1")
register_backbone("efficientnet_lite2", preprocess="none", layers=200)(_BUILT_IN + "efficientnet_lite2")
