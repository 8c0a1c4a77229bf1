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

    The model maps raw [0, 255] RGB to class probabilities.
    """
    if hp["pooling"] not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {hp['pooling']!r}")
    backbone = create_backbone(hp["backbone"], input_shape=input_shape, weights=hp["weights"], weights_dir=weights_dir)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    augmentation = make_augmentation(hp["augment"], seed=seed)
    if augmentation is not None:
        x = augmentation(x)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D()(x) if hp["pooling"] == "avg" else layers.Flatten()(x)
    if hp["head_units"]:
        x = layers.Dense(int(hp["head_units"]), activation="relu", name="head_dense")(x)
    if hp["dropout"]:
        x = layers.Dropout(float(hp["dropout"]), seed=seed)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{hp['backbone']}_classifier"), backbone


def apply_unfreeze(backbone: keras.Model, unfreeze: int | str, *, pretrained: bool) -> int:
    """Make the top ``unfreeze`` layers of ``backbone`` trainable; 0 freezes it, "all" frees it.

    Layers are counted like the reference notebooks' ``base.layers[-k:]``.
    A pretrained backbone keeps every BatchNorm layer frozen, which in Keras 3
    also keeps it in inference mode, so small medical batches cannot wreck the
    ImageNet statistics. (A nested ``backbone(x, training=False)`` does not do
    this under ``fit`` in Keras 3.) A backbone trained from scratch needs its
    BatchNorm statistics, so its BatchNorm layers train like the rest.
    Returns the number of trainable backbone weight tensors.
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
    if pretrained:
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    return len(backbone.trainable_weights)
