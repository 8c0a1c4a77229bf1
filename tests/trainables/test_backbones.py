"""Every registered backbone builds, takes raw [0, 255] RGB and runs a forward pass."""

import keras
import numpy as np
import pytest

from trainables import WeightsUnavailableError, create_backbone, list_backbones
from trainables.backbones import get_backbone_spec
from trainables.preprocess import Preprocess

SMALL = (32, 32, 3)


@pytest.mark.parametrize("name", list_backbones())
def test_forward_pass_and_layer_count_at_small_size(name):
    spec = get_backbone_spec(name)
    shape = SMALL if spec.min_size <= 32 else (64, 64, 3)
    model = create_backbone(name, input_shape=shape, weights=None)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, *shape)).astype("float32")
    features = keras.ops.convert_to_numpy(model(x, training=False))
    assert features.ndim == 4 and features.shape[0] == 2
    assert np.isfinite(features).all()
    assert model.input_shape == (None, *shape)
    # The registry's count is what studies' unfreeze depths are checked against before Ray starts.
    below_input = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert spec.layers == len(below_input) == len(model.layers) - 1


def test_registry_covers_the_reference_studies():
    expected = {"mobilenet_v2", "efficientnet_b0", "efficientnet_b1", "vgg16", "resnet50", "densenet121", "cnn_s2", "cnn_s3"}
    assert expected <= set(list_backbones())


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(ValueError, match="unknown backbone 'resnet_50'; did you mean 'resnet50'"):
        create_backbone("resnet_50", input_shape=SMALL)


def test_small_cnns_have_no_pretrained_weights():
    with pytest.raises(ValueError, match="has no pretrained weights"):
        create_backbone("cnn_s2", input_shape=SMALL, weights="imagenet")


def test_imagenet_download_failure_is_clear(monkeypatch, tmp_path):
    # A dead proxy makes every download fail, online or not; an empty KERAS_HOME has no cached file.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="(?s)backbone 'vgg16' need the file .*download failed.*--weights-dir"):
        create_backbone("vgg16", input_shape=(32, 32, 3), weights="imagenet")


@pytest.mark.parametrize(
    "mode, reference",
    [
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
    ],
)
def test_in_model_preprocessing_matches_keras(mode, reference):
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(Preprocess(mode)(x))
    np.testing.assert_allclose(ours, reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_a_backbone_registered_with_its_builder_builds_and_is_valid_in_studies(monkeypatch):
    """The built-ins name their builders by import path; a user's backbone passes the function itself."""
    from trainables import backbones, register_backbone
    from trainables.hparams import hparam_problem

    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))  # leave the real registry as it was

    @register_backbone("tiny_conv", preprocess="unit", layers=2, imagenet=False, min_size=8)
    def tiny_conv(inputs, x, *, weights, include_top, name):
        return keras.Model(inputs, keras.layers.Conv2D(4, 3)(x), name=name)

    model = create_backbone("tiny_conv", input_shape=(8, 8, 3))
    assert len(model.layers) - 1 == get_backbone_spec("tiny_conv").layers  # the Preprocess and the Conv2D
    assert hparam_problem("backbone", "tiny_conv") is None
    assert "did you mean 'tiny_conv'" in hparam_problem("backbone", "tiny_cnv")
