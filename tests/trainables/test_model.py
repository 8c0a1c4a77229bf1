"""The head, unfreezing, and augmentation that acts only in training."""

import keras
import numpy as np
import pytest

from trainables.hparams import DEFAULTS, resolve_hparams
from trainables.model import apply_unfreeze, build_model
from trainables.train import phases

SHAPE = (32, 32, 3)


def hp(**changes):
    return {**DEFAULTS, "backbone": "mobilenet_v2", **changes}


@pytest.mark.parametrize("depth", [0, 1, 30, "all"])
def test_unfreeze_depth_freezes_exactly_the_bottom_layers(depth):
    model, backbone = build_model(hp(), input_shape=SHAPE, num_classes=2)
    apply_unfreeze(backbone, depth, pretrained=False)
    flags = [layer.trainable for layer in backbone.layers]
    if depth == "all":
        assert all(flags)
    elif depth == 0:
        assert not any(flags) and not backbone.trainable_weights
    else:
        assert flags[-depth:] == [True] * depth
        assert not any(flags[:-depth])
        trainable = {id(w) for w in backbone.trainable_weights}
        top = {id(w) for layer in backbone.layers[-depth:] for w in layer.trainable_weights}
        assert trainable == top
    # The head always trains.
    assert any(w.path.startswith("probabilities") for w in model.trainable_weights)


def test_unfreeze_deeper_than_the_backbone_is_refused_not_run_as_all():
    _, backbone = build_model(hp(backbone="cnn_s3", pooling="flatten"), input_shape=SHAPE, num_classes=2)
    apply_unfreeze(backbone, 5, pretrained=False)  # every layer below the input: allowed
    assert len(backbone.trainable_weights) == len(backbone.weights) > 0
    with pytest.raises(ValueError, match="unfreeze 100000 is deeper than backbone 'cnn_s3', which has 5 layers; "
                                         "use at most 5, or 'all'"):
        apply_unfreeze(backbone, 100000, pretrained=False)


def test_pretrained_backbone_keeps_batchnorm_in_inference_mode():
    # efficientnet_lite0's ImageNet weights ship with pip, so this runs offline.
    model, backbone = build_model(hp(backbone="efficientnet_lite0", weights="imagenet"), input_shape=(64, 64, 3), num_classes=2)
    apply_unfreeze(backbone, 30, pretrained=True)
    top = backbone.layers[-30:]
    assert all(layer.trainable for layer in top if not isinstance(layer, keras.layers.BatchNormalization))
    assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    bn = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)][-1]
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    learning = [keras.ops.convert_to_numpy(w).copy() for w in backbone.trainable_weights]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, size=(8, 64, 64, 3)).astype("float32")
    model.fit(x, np.array([0, 1] * 4), epochs=1, verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before)
    after = [keras.ops.convert_to_numpy(w) for w in backbone.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(after, learning))  # the unfrozen layers learn


def test_scratch_backbone_updates_batchnorm_statistics():
    model, backbone = build_model(hp(backbone="cnn_s2", pooling="flatten"), input_shape=SHAPE, num_classes=2)
    bn = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, size=(8, *SHAPE)).astype("float32")
    model.fit(x, np.array([0, 1] * 4), epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean), before)


@pytest.mark.parametrize("policy", ["light", "heavy"])
def test_augmentation_only_in_training(policy):
    model, _ = build_model(hp(backbone="cnn_s3", augment=policy, dropout=0.0), input_shape=SHAPE, num_classes=3, seed=1)
    x = np.random.default_rng(0).uniform(0, 255, size=(4, *SHAPE)).astype("float32")
    a = keras.ops.convert_to_numpy(model(x, training=False))
    b = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Without augmentation layers, the same weights give the same eval output.
    clean, _ = build_model(hp(backbone="cnn_s3", augment="none", dropout=0.0), input_shape=SHAPE, num_classes=3)
    clean.set_weights(model.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clean(x, training=False)), a, rtol=1e-5, atol=1e-6)
    # In training the augmentation changes what the network sees.
    augmented = model.get_layer(f"augment_{policy}")
    seen = keras.ops.convert_to_numpy(augmented(x, training=True))
    assert not np.allclose(seen, x)


def test_head_layers_follow_the_hyperparameters():
    model, _ = build_model(hp(backbone="cnn_s3", head_units=16, dropout=0.3), input_shape=SHAPE, num_classes=7)
    head = model.get_layer("head")
    assert head.get_layer("head_dense").units == 16
    assert model.output_shape == (None, 7)
    assert any(isinstance(layer, keras.layers.Dropout) and layer.rate == 0.3 for layer in head.layers)


def test_frozen_pretrained_blocks_skip_stochastic_depth():
    model, backbone = build_model(hp(backbone="efficientnet_lite0", weights="imagenet"), input_shape=(32, 32, 3),
                                  num_classes=2)
    drops = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Dropout)]
    apply_unfreeze(backbone, 0, pretrained=True)
    assert drops and all(layer.rate == 0 for layer in drops)  # a frozen backbone computes what it does at inference
    apply_unfreeze(backbone, 30, pretrained=True)
    assert drops[-1].rate > 0 and drops[0].rate == 0  # the unfrozen top block keeps its drop rate
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    apply_unfreeze(backbone, 0, pretrained=True)
    np.testing.assert_allclose(backbone(x, training=True), backbone(x, training=False), atol=1e-5)


def test_two_phase_schedule():
    assert phases(resolve_hparams({"weights": "imagenet", "unfreeze": 30, "warmup_epochs": 2, "learning_rate": 1e-3,
                                   "fine_tune_lr": 1e-5}), 10) == [(0, 2, 1e-3, 0), (2, 10, 1e-5, 30)]
    assert phases(resolve_hparams({"weights": "imagenet", "unfreeze": 0, "warmup_epochs": 2, "learning_rate": 1e-3}), 5) == [
        (0, 5, 1e-3, 0)
    ]
    # Training from scratch has nothing to warm up for.
    assert phases(resolve_hparams({"weights": None, "unfreeze": "all", "warmup_epochs": 2, "learning_rate": 1e-3}), 5) == [
        (0, 5, 1e-3, "all")
    ]


def test_a_nan_loss_ends_the_trial_as_diverged():
    import math
    import warnings

    from search.results import trial_status
    from trainables.train import ReportEpoch, TrialSettings

    model, _ = build_model(hp(backbone="cnn_s3"), input_shape=SHAPE, num_classes=2)
    settings = TrialSettings(max_epochs=5, metric="val_balanced_accuracy", mode="max", class_names=("a", "b"))
    report = ReportEpoch(np.zeros((4, *SHAPE), "uint8"), np.array([0, 1, 0, 1]), settings, hp(backbone="cnn_s3"),
                         0.0, model=model)
    report.set_model(model)
    report.on_epoch_begin(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tune.report outside a Tuner
        report.on_epoch_end(0, {"loss": math.nan})
    assert report.stopped and model.stop_training
    assert trial_status(1, 5, diverged=True) == "diverged"
    assert trial_status(1, 5) == "stopped" and trial_status(5, 5) == "finished"


def test_checkpoints_are_verified_before_they_are_reported(tmp_path):
    from trainables.checkpoint import verify_checkpoint

    model, _ = build_model(hp(backbone="cnn_s3"), input_shape=SHAPE, num_classes=2)
    model.save(tmp_path / "model.keras")
    verify_checkpoint(tmp_path / "model.keras")
    data = (tmp_path / "model.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        verify_checkpoint(tmp_path / "cut.keras")
