"""Named augmentation policies, built from Keras preprocessing layers.

The layers act only when the model is called with ``training=True``, so
evaluation and prediction always see clean images. The policy names are
checked before Ray starts, so this module imports Keras only to build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.checks import unknown_name_message

if TYPE_CHECKING:
    import keras


def _none(layers, seed):
    return []


def _light(layers, seed):
    return [layers.RandomFlip("horizontal_and_vertical", seed=seed)]


def _heavy(layers, seed):
    # Lesions have no canonical orientation, so full rotations are fair game.
    return [
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.5, fill_mode="reflect", seed=seed),
        layers.RandomZoom(0.2, fill_mode="reflect", seed=seed),
        layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed),
        layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed),
        layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
    ]


POLICIES = {"none": _none, "light": _light, "heavy": _heavy}  # policy(keras.layers, seed) -> layers


def make_augmentation(policy: str, *, seed: int | None = None) -> keras.Sequential | None:
    """A Sequential of random layers for ``policy``, or None for ``"none"``."""
    if policy not in POLICIES:
        raise ValueError(unknown_name_message("augmentation policy", policy, POLICIES))
    import keras

    parts = POLICIES[policy](keras.layers, seed)
    if not parts:
        return None
    return keras.Sequential(parts, name=f"augment_{policy}")
