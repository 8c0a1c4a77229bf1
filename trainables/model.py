"""``build_model(hp)``: backbone + augmentation + head, and which layers train."""

from __future__ import annotations

import keras
from keras import layers

from trainables.augment import make_augmentation
from trainables.backbones import create_backbone
from trainables.hparams import POOLINGS


def build_model(
    hp: dict,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights_dir: str | None = None,
    seed: int | None = None,
    backbone: keras.Model | None = None,
) -> tuple[keras.Model, keras.Model]:
    """Return ``(model, backbone)`` for the hyperparameters ``hp``.

    The model maps raw [0, 255] RGB to class probabilities. ``backbone``, if
    given, is used instead of building one (``activation_cache.shared_backbone``).
    With a ``seed``, the global RNG is seeded again once the backbone is there,
    so the head's initial weights, and all randomness after them, are the same
    whether the backbone was built here or before (building draws from that RNG).
    """
    if hp["pooling"] not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {hp['pooling']!r}")
    if backbone is None:
        backbone = create_backbone(hp["backbone"], input_shape=input_shape, weights=hp["weights"],
                                   weights_dir=weights_dir)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    head = build_head(hp, backbone.output.shape[1:], num_classes=num_classes, seed=seed)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    augmentation = make_augmentation(hp["augment"], seed=seed)
    if augmentation is not None:
        x = augmentation(x)
    outputs = head(backbone(x))
    return keras.Model(inputs, outputs, name=f"{hp['backbone']}_classifier"), backbone


def build_head(hp: dict, feature_shape, *, num_classes: int, seed: int | None = None) -> keras.Model:
    """Backbone features -> class probabilities: pooling, optional dense layer, dropout, softmax.

    A model of its own, so a trial can train it on cached backbone features
    (``trainables.activation_cache``) and still save the whole classifier.
    """
    features = keras.Input(shape=tuple(feature_shape), name="features")
    x = layers.GlobalAveragePooling2D()(features) if hp["pooling"] == "avg" else layers.Flatten()(features)
    if hp["head_units"]:
        x = layers.Dense(int(hp["head_units"]), activation="relu", name="head_dense")(x)
    if hp["dropout"]:
        x = layers.Dropout(float(hp["dropout"]), seed=seed)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(features, outputs, name="head")


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
        below_input = len(backbone.layers) - 1
        if depth < 0:
            raise ValueError(f"unfreeze must be >= 0 or 'all', got {unfreeze!r}")
        if depth > below_input:  # it would train the whole backbone while the leaderboard records the depth
            raise ValueError(f"unfreeze {depth} is deeper than backbone {backbone.name!r}, which has "
                             f"{below_input} layers; use at most {below_input}, or 'all'")
        backbone.trainable = depth > 0
        if depth:
            for layer in backbone.layers[:-depth]:
                layer.trainable = False
    if pretrained:
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
        _frozen_layers_skip_dropout(backbone)
    return len(backbone.trainable_weights)


def _frozen_layers_skip_dropout(backbone: keras.Model) -> None:
    """Stochastic depth (EfficientNet's block Dropout) only where layers train.

    Dropout ignores ``trainable``, so a frozen pretrained block would still drop
    its residual branch at random under ``fit``. Frozen blocks should compute
    what they compute at inference, like their BatchNorm layers, which also
    makes a frozen backbone's output cacheable. A block trains when any of its
    weighted layers (BatchNorm aside) does.
    """
    original = backbone.__dict__.setdefault("_medsearch_drop_rates", {})
    for layer in backbone.layers:
        if not isinstance(layer, layers.Dropout):
            continue
        original.setdefault(layer.name, layer.rate)
        block = layer.name.rsplit("_", 1)[0] + "_"  # "block2b_drop" belongs to block "block2b"
        block_trains = any(other.trainable and other.weights for other in backbone.layers
                           if other.name.startswith(block) and not isinstance(other, layers.BatchNormalization))
        layer.rate = original[layer.name] if block_trains else 0.0
