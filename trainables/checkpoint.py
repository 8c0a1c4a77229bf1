"""A trial's model in a checkpoint folder: written by ``save_classifier``, read back by ``load_classifier``.

Most trials write the whole classifier, ``model.keras``. A trial that trains on
cached features of a frozen part (``trainables.activation_cache``) writes two
files instead: ``frozen.keras``, the frozen part, serialised once per process
and then only copied (it is the same in every checkpoint of every trial that
shares it), and ``top.keras``, what trains (the unfrozen top and the head).
Saving the whole classifier costs ~0.3 s for ``efficientnet_lite0``; the two
files cost a few milliseconds, which matters for trials whose epochs take 0.1 s.

Either way the folder is self-contained: ``load_classifier`` gives the same
raw-RGB-to-probabilities classifier, needing no weights file of its own.
Next to the model, ``trial.json`` holds the epoch, the metric, the class names
and the hyperparameters.
"""

from __future__ import annotations

import functools
import tempfile
import zipfile
from pathlib import Path

import keras

import trainables.preprocess  # noqa: F401  (registers the custom layer a saved backbone refers to)
from trainables.activation_cache import SHARED_BACKBONES, Frozen

MODEL_FILE = "model.keras"  # the whole classifier
FROZEN_FILE, TOP_FILE = "frozen.keras", "top.keras"  # a cached trial's frozen part and what trains


def has_model(folder: Path) -> bool:
    """Whether checkpoint ``folder`` holds a model, in either form."""
    return (folder / MODEL_FILE).is_file() or (folder / TOP_FILE).is_file()


def save_classifier(folder: Path, classifier, *, frozen: Frozen | None = None, top=None) -> None:
    """Write a trial's model into ``folder`` and check that each file would load.

    Without ``frozen``, the whole ``classifier``. With it (the frozen part of a
    cached trial), ``frozen`` and ``top``, the model the trial fits, which
    shares its layers with ``classifier``.
    """
    folder = Path(folder)
    if frozen is None:
        classifier.save(folder / MODEL_FILE)
        written = [MODEL_FILE]
    else:
        (folder / FROZEN_FILE).write_bytes(_serialised(frozen))
        top.save(folder / TOP_FILE)
        written = [FROZEN_FILE, TOP_FILE]
    for name in written:
        verify_checkpoint(folder / name)


@functools.lru_cache(maxsize=SHARED_BACKBONES)
def _serialised(frozen: Frozen) -> bytes:
    """``frozen.model`` as ``.keras`` bytes; keyed by its identity, so made once per process."""
    with tempfile.TemporaryDirectory(prefix="medsearch-frozen-") as folder:
        path = Path(folder) / FROZEN_FILE
        frozen.model.save(path)
        return path.read_bytes()


def load_classifier(folder: Path) -> keras.Model:
    """The classifier (raw [0, 255] RGB -> class probabilities) that ``save_classifier`` wrote into ``folder``.

    From a cached trial's two files it is ``top(frozen(image))``: the same
    layers and weights as the trial's classifier, minus its augmentation layers,
    which act only in training.
    """
    folder = Path(folder)
    if (folder / MODEL_FILE).is_file():
        return keras.saving.load_model(folder / MODEL_FILE, compile=False)
    frozen, top = (keras.saving.load_model(folder / name, compile=False) for name in (FROZEN_FILE, TOP_FILE))
    image = keras.Input(shape=frozen.input_shape[1:], name="image")
    return keras.Model(image, top(frozen(image)), name=f"{frozen.name}_classifier")


def verify_checkpoint(path: Path) -> None:
    """Refuse to report a checkpoint that would not load: a ``.keras`` file is a zip of config and weights."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if not {"config.json", "model.weights.h5"} <= names or archive.testzip() is not None:
            raise OSError(f"checkpoint {path} is incomplete or corrupt (holds {sorted(names)})")
