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
