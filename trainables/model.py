"""``build_model(hp)``: backbone + augmentation + head, and which layers train."""

from __future__ import annotations

import keras
from keras import layers

from trainables.augment import make_augmentation
from trainables.backbones import create_backbone

POOLINGS = ("avg", "flatten")


def build_model(
    hp: dict,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights_dir: str | None = None,
    seed: int | None = None,
) -> tuple[keras.Model, keras.Model]:
    """Return ``(model, backbone)`` for the hyperparameters ``hp``.

    The model maps raw [0, 255] RGB to class probabilities. A pretrained
    backbone is called with ``training=False`` so its BatchNorm layers stay in
    inference mode even when unfrozen (the Keras fine-tuning recipe); a backbone
    trained from scratch needs its BatchNorm statistics, so it trains normally.
    """
    if hp["pooling"] not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {hp['pooling']!r}")
    backbone = create_backbone(hp["backbone"], input_shape=input_shape, weights=hp["weights"], weights_dir=weights_dir)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    augmentation = make_augmentation(hp["augment"], seed=seed)
    if augmentation is not None:
        x = augmentation(x)
    x = backbone(x, training=False) if hp["weights"] else backbone(x)
    x = layers.GlobalAveragePooling2D()(x) if hp["pooling"] == "avg" else layers.Flatten()(x)
    if hp["head_units"]:
        x = layers.Dense(int(hp["head_units"]), activation="relu", name="head_dense")(x)
    if hp["dropout"]:
        x = layers.Dropout(float(hp["dropout"]), seed=seed)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{hp['backbone']}_classifier"), backbone


def apply_unfreeze(backbone: keras.Model, unfreeze: int | str) -> int:
    """Make the top ``unfreeze`` layers of ``backbone`` trainable; 0 freezes it, "all" frees it.

    Layers are counted like the reference notebooks' ``base.layers[-k:]``.
    Returns the number of trainable backbone weights tensors.
    """
    if unfreeze == "all":
        backbone.trainable = True
    else:
        depth = int(unfreeze)
        if depth < 0:
            raise ValueError(f"unfreeze must be >= 0 or 'all', got {unfreeze!r}")
        backbone.trainable = depth > 0
        if depth:
            for layer in backbone.layers[:-depth]:
                layer.trainable = False
    return len(backbone.trainable_weights)
