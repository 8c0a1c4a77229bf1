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

A cross-validated trial (``Study(cv_folds=k)``) writes its k fold models into
``fold_0/`` ... ``fold_<k-1>/``, each in one of the forms above, except that a
cached trial's frozen part, the same for every fold, is written once beside
them; ``trial.json`` then also holds ``cv_folds``. ``load_classifier`` gives
the fold ensemble: one raw-RGB-to-probabilities model whose output is the mean
of the k fold models' probabilities (the frozen part, if any, runs once).
"""

from __future__ import annotations

import functools
import re
import tempfile
import zipfile
from pathlib import Path

import keras

import trainables.preprocess  # noqa: F401  (registers the custom layer a saved backbone refers to)
from trainables.activation_cache import SHARED_BACKBONES, Frozen

MODEL_FILE = "model.keras"  # the whole classifier
FROZEN_FILE, TOP_FILE = "frozen.keras", "top.keras"  # a cached trial's frozen part and what trains
FOLD_PREFIX = "fold_"  # a cross-validated trial's fold models: fold_0/, fold_1/, ...
_FOLD = re.compile(r"^fold_(\d+)$")


def has_model(folder: Path) -> bool:
    """Whether checkpoint ``folder`` holds a model, in either form."""
    folder = Path(folder)
    if (folder / MODEL_FILE).is_file() or (folder / TOP_FILE).is_file():
        return True
    folds = fold_folders(folder)
    return bool(folds) and all((f / MODEL_FILE).is_file() or (f / TOP_FILE).is_file() for f in folds)


def fold_folders(folder: Path) -> list[Path]:
    """A cross-validated checkpoint's ``fold_<i>`` folders in fold order (none for a single model)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _FOLD.match(p.name))]
    return [p for _, p in sorted(found)]


def save_folds(folder: Path, classifiers: list, *, frozen: Frozen | None = None, tops: list | None = None) -> None:
    """A cross-validated trial's k models: ``fold_<i>/`` each, and a cached trial's shared frozen part once."""
    folder = Path(folder)
    if frozen is not None:
        (folder / FROZEN_FILE).write_bytes(_serialised(frozen))
        verify_checkpoint(folder / FROZEN_FILE)
    for i, classifier in enumerate(classifiers):
        sub = folder / f"{FOLD_PREFIX}{i}"
        sub.mkdir(parents=True, exist_ok=True)
        if frozen is None:
            save_classifier(sub, classifier)
        else:
            tops[i].save(sub / TOP_FILE)
            verify_checkpoint(sub / TOP_FILE)


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
    folds = fold_folders(folder)
    if folds and not (folder / TOP_FILE).is_file():
        return _fold_ensemble(folder, folds)
    frozen, top = (keras.saving.load_model(folder / name, compile=False) for name in (FROZEN_FILE, TOP_FILE))
    image = keras.Input(shape=frozen.input_shape[1:], name="image")
    return keras.Model(image, top(frozen(image)), name=f"{frozen.name}_classifier")


def _fold_ensemble(folder: Path, folds: list[Path]) -> keras.Model:
    """The mean of the fold models' probabilities, as one functional model (predict, evaluate and export
    treat it like any classifier). Each fold model is a layer named ``fold_<i>``; a cached trial's frozen
    part is one layer, ``frozen_part``, run once and feeding every fold's top."""
    shared = folder / FROZEN_FILE
    frozen = keras.saving.load_model(shared, compile=False) if shared.is_file() else None
    members = []
    for i, sub in enumerate(folds):
        if (sub / MODEL_FILE).is_file():
            inner = keras.saving.load_model(sub / MODEL_FILE, compile=False)
        else:
            inner = keras.saving.load_model(sub / TOP_FILE, compile=False)
        x = keras.Input(shape=inner.input_shape[1:], name=f"fold_{i}_input")
        members.append(keras.Model(x, inner(x), name=f"{FOLD_PREFIX}{i}"))  # unique names in the ensemble
    if frozen is not None:
        image = keras.Input(shape=frozen.input_shape[1:], name="image")
        features = keras.Model(frozen.input, frozen.output, name="frozen_part")(image)
    else:
        image = keras.Input(shape=members[0].input_shape[1:], name="image")
        features = image
    outputs = [member(features) for member in members]
    mean = keras.layers.Average(name="fold_mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(image, mean, name=f"cv{len(members)}_ensemble")


def fold_classifiers(model) -> list[keras.Model] | None:
    """The image -> probabilities model of each fold of a fold ensemble from ``load_classifier``, sharing its
    layers (for out-of-fold predictions); None for any other model."""
    names = sorted((int(m.group(1)), layer.name) for layer in getattr(model, "layers", [])
                   if (m := _FOLD.match(layer.name)))
    if not names:
        return None
    frozen = next((layer for layer in model.layers if layer.name == "frozen_part"), None)
    out = []
    for _, name in names:
        image = keras.Input(shape=model.input_shape[1:], name="image")
        x = frozen(image) if frozen is not None else image
        out.append(keras.Model(image, model.get_layer(name)(x), name=f"{name}_classifier"))
    return out


def verify_checkpoint(path: Path) -> None:
    """Refuse to report a checkpoint that would not load: a ``.keras`` file is a zip of config and weights."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if not {"config.json", "model.weights.h5"} <= names or archive.testzip() is not None:
            raise OSError(f"checkpoint {path} is incomplete or corrupt (holds {sorted(names)})")
