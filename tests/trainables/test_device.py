"""A trial's TensorFlow set-up: precision policy per trial (workers are reused), and where it ran."""

import keras
import numpy as np

from trainables.hparams import DEFAULTS
from trainables.model import build_model
from trainables.train import setup_tensorflow


def test_auto_precision_is_float32_without_a_gpu_and_reports_the_device():
    device = setup_tensorflow(1, seed=0)
    assert device["gpu"] == "none" and device["precision"] == "float32"
    assert device["node_id"] == "local"  # outside Ray
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_trains_with_float32_probabilities_and_is_reset_for_the_next_trial():
    device = setup_tensorflow(1, seed=0, mixed_precision=True)
    assert device["precision"] == "mixed_float16"
    hp = {**DEFAULTS, "backbone": "cnn_s3", "pooling": "flatten"}
    model, _ = build_model(hp, input_shape=(32, 32, 3), num_classes=2, seed=0)
    assert any(layer.compute_dtype == "float16" for layer in model.layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3)).astype("uint8")
    history = model.fit(x, np.arange(16) % 2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(x, verbose=0).dtype == np.float32  # the softmax stays float32 for stable metrics

    setup_tensorflow(1, seed=0)  # the same worker's next trial, on a CPU: back to float32
    assert keras.mixed_precision.global_policy().name == "float32"
