"""A weights directory of official Keras files: found, loaded, and never a network call."""

import inspect
import socket

import keras
import numpy as np
import pytest
from keras.src.applications import densenet, efficientnet, mobilenet_v2, resnet, vgg16

from fixtures.weights import write_official_file
from trainables import WeightsUnavailableError, create_backbone
from trainables.weights import WEIGHTS_DIR_ENV, find_weights, hash_matches, pack_weights, unpack_weights, weights_file


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Keras cache, and any attempt to open a connection fails the test."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def random_weights_like(name, size, seed):
    keras.utils.set_random_seed(seed)
    model = create_backbone(name, input_shape=(size, size, 3), weights=None)
    for w in model.weights:  # move every weight, BN statistics included, so a non-load is visible
        w.assign(w.numpy() + np.random.default_rng(seed).normal(0, 0.01, w.shape).astype(w.dtype))
    return model


def test_file_in_weights_dir_is_loaded_without_network(offline, tmp_path):
    wanted = weights_file("mobilenet_v2", image_size=96)
    assert wanted.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    source = random_weights_like("mobilenet_v2", 96, seed=3)
    write_official_file(source, tmp_path / wanted.filename)

    loaded = create_backbone("mobilenet_v2", input_shape=(96, 96, 3), weights="imagenet", weights_dir=tmp_path)

    assert len(loaded.weights) == len(source.weights)
    for got, expected in zip(loaded.weights, source.weights):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_weights_dir_from_environment(offline, tmp_path, monkeypatch):
    wanted = weights_file("mobilenet_v2", image_size=128)
    write_official_file(random_weights_like("mobilenet_v2", 128, seed=4), tmp_path / wanted.filename)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert find_weights("mobilenet_v2", image_size=128) == tmp_path / wanted.filename


def test_efficientnet_from_a_file_sees_the_same_inputs_as_keras_imagenet(offline, tmp_path):
    # Keras adds its last ImageNet input scaling only for weights="imagenet"; a file must get the same.
    source = random_weights_like("efficientnet_b0", 32, seed=5)
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    stored_mean, stored_variance, count = norm.get_weights()  # the official file stores the std as "variance"
    norm.set_weights([mean.reshape(stored_mean.shape), std.reshape(stored_variance.shape), count])
    write_official_file(source, tmp_path / "efficientnetb0_notop.h5")

    model = create_backbone("efficientnet_b0", input_shape=(32, 32, 3), weights="imagenet", weights_dir=tmp_path)

    stem_input = keras.Model(model.input, model.get_layer("stem_conv_pad").input)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(stem_input.predict(x, verbose=0), (x / 255 - mean) / std, rtol=1e-4, atol=1e-4)


def test_missing_file_names_file_url_and_fix(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _refuse_connection)  # downloads fail as on an air-gapped node
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("densenet121", input_shape=(32, 32, 3), weights="imagenet", weights_dir=tmp_path)
    message = str(info.value)
    assert "'densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5'" in message
    assert str(tmp_path) in message
    assert densenet.DENSENET121_WEIGHT_PATH_NO_TOP in message
    assert "--weights-dir" in message and "python -m search.weights download" in message


def _refuse_connection(*args, **kwargs):
    raise OSError("network unreachable (test)")


def test_weights_dir_that_is_not_a_folder(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="is not a folder.*search.weights download"):
        find_weights("vgg16", image_size=224, weights_dir=tmp_path / "nope")


@pytest.mark.parametrize(
    "name, size, top, url, file_hash",
    [
        ("vgg16", 224, False, vgg16.WEIGHTS_PATH_NO_TOP, "6d6bbae143d832006294945121d1f1fc"),
        ("vgg16", 224, True, vgg16.WEIGHTS_PATH, "64373286793e3c8b2b4e3219cbf3544b"),
        ("resnet50", 224, False, resnet.BASE_WEIGHTS_PATH + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
         resnet.WEIGHTS_HASHES["resnet50"][1]),
        ("densenet121", 224, False, densenet.DENSENET121_WEIGHT_PATH_NO_TOP, "30ee3e1110167f948a6b9946edeeb738"),
        ("efficientnet_b0", 224, False, efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5",
         efficientnet.WEIGHTS_HASHES["b0"][1]),
        ("efficientnet_b1", 224, True, efficientnet.BASE_WEIGHTS_PATH + "efficientnetb1.h5",
         efficientnet.WEIGHTS_HASHES["b1"][0]),
        ("mobilenet_v2", 160, False,
         mobilenet_v2.BASE_WEIGHT_PATH + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5", None),
        ("mobilenet_v2", 100, False,  # not a trained size: Keras falls back to 224
         mobilenet_v2.BASE_WEIGHT_PATH + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", None),
    ],
)
def test_table_matches_installed_keras(name, size, top, url, file_hash):
    wanted = weights_file(name, image_size=size, include_top=top)
    assert wanted.url == url and wanted.filename == url.rsplit("/", 1)[1]
    if file_hash is not None:
        assert wanted.file_hash == file_hash
    if wanted.file_hash is not None:  # hashes that Keras writes inline in the application's code
        module = {"vgg16": vgg16, "densenet121": densenet}.get(name)
        if module is not None:
            assert wanted.file_hash in inspect.getsource(module)


def test_backbones_without_a_file():
    assert weights_file("efficientnet_lite0") is None and weights_file("cnn_s3") is None


def test_hash_matches_md5_and_sha256(tmp_path):
    path = tmp_path / "f.h5"
    path.write_bytes(b"weights")
    assert hash_matches(path, "6b4d8b21b0bc9e5bd0d1e1a3d0c07fbf") is False
    import hashlib

    assert hash_matches(path, hashlib.md5(b"weights").hexdigest())
    assert hash_matches(path, hashlib.sha256(b"weights").hexdigest())


def test_pack_and_unpack_round_trip(tmp_path):
    source = tmp_path / "src" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    source.parent.mkdir()
    source.write_bytes(bytes(range(256)) * 10)
    node = unpack_weights(pack_weights([source]), tmp_path / "node")
    assert (node / source.name).read_bytes() == source.read_bytes()
    assert not list(node.glob(".*.tmp"))
