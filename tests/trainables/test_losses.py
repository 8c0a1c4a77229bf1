"""Label smoothing: the loss is Keras's smoothed cross-entropy on class indices, and training obeys it."""

import warnings

import numpy as np
import pytest

from trainables.hparams import DEFAULTS, hparam_problem
from trainables.losses import SmoothedSparseCrossentropy, loss_for
from trainables.train import TrialSettings, fit_classifier


def test_the_loss_is_cross_entropy_against_the_smoothed_targets():
    s, classes = 0.2, 3
    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]], dtype=np.float32)
    target = np.eye(classes)[y] * (1 - s) + s / classes
    expected = float(np.mean(-(target * np.log(p)).sum(axis=1)))
    assert float(SmoothedSparseCrossentropy(s)(y, p)) == pytest.approx(expected, rel=1e-5)
    assert float(SmoothedSparseCrossentropy(s)(y[:, None], p)) == pytest.approx(expected, rel=1e-5)  # (n, 1) labels


def test_no_smoothing_is_the_plain_loss_keras_always_had():
    assert loss_for(0) == loss_for(0.0) == "sparse_categorical_crossentropy"
    assert isinstance(loss_for(0.1), SmoothedSparseCrossentropy)


def test_a_compiled_model_with_it_saves_and_loads():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss=loss_for(0.3))
    path = __import__("tempfile").mkdtemp() + "/m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, SmoothedSparseCrossentropy) and loaded.loss.label_smoothing == 0.3


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", None])
def test_a_bad_value_is_named_with_the_fix(value):
    problem = hparam_problem("label_smoothing", value)
    assert problem and "label_smoothing" in problem and repr(value) in problem and "[0, 1)" in problem
    assert hparam_problem("label_smoothing", 0.1) is None and DEFAULTS["label_smoothing"] == 0.0


def mean_confidence(label_smoothing, monkeypatch, tmp_path):
    """A head trained to convergence on separable cached features: its mean top probability on train."""
    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 24)
    x = (rng.integers(0, 120, (48, 32, 32, 3)) + 130 * y[:, None, None, None]).astype(np.uint8)
    data = {"x_train": x, "y_train": y, "x_val": x[::4], "y_val": y[::4]}
    config = {**DEFAULTS, "backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
              "learning_rate": 0.05, "dropout": 0.0, "batch_size": 8, "label_smoothing": label_smoothing}
    settings = TrialSettings(max_epochs=25, metric="val_balanced_accuracy", mode="max",
                             class_names=("benign", "malignant"), positive=1, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tune.report outside a Tuner warns and returns
        model = fit_classifier(config, data, settings)
    return float(model.predict(x, verbose=0).max(axis=1).mean())


def test_training_with_smoothing_stops_short_of_certainty(monkeypatch, tmp_path):
    # With s = 0.6 over 2 classes the best the loss allows is 0.7 on the true class; plain training goes to ~1.
    plain = mean_confidence(0.0, monkeypatch, tmp_path)
    smoothed = mean_confidence(0.6, monkeypatch, tmp_path)
    assert plain > 0.9, plain
    assert 0.6 < smoothed < 0.8, smoothed
