"""Class-per-folder datasets: ``root/<class>/*.png|jpg|dcm``, and the embedded default dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from trainables.datasets._registry import (
    DatasetError,
    LeftOut,
    class_folders,
    list_images,
    no_images_message,
    register_loader,
    with_left_out,
)

_LAYOUT = """  ROOT/
    <class A>/  image files (.jpg, .jpeg, .png, .dcm), subfolders included
    <class B>/  ...
    prediction/ (optional, unlabelled images; never used for training)"""

UNLABELLED_FOLDER = "prediction"


@register_loader("folder", layout=_LAYOUT)
def load_folder(path: Path, *, classes: list[str] | None = None) -> pd.DataFrame:
    """One folder per class, images at any depth inside it. ``classes`` picks and orders the class folders.

    Files beside the class folders (a README, EMBEDDED.json) are no class's and are not reported;
    hidden folders there (``.thumbs/``, ``__MACOSX/``) are left out and reported.
    """
    left_out = LeftOut()
    found = {p.name: p for p in class_folders(path, left_out) if p.name != UNLABELLED_FOLDER}
    if classes is None:
        classes = sorted(found)
    rows = []
    for name in classes:
        if name not in found:
            raise DatasetError(f"class folder {name!r} not found in {str(path)!r}; found: {sorted(found)}")
        images = list_images(found[name], left_out)
        if not images:
            raise DatasetError(no_images_message(found[name], left_out))
        rows += [(str(p), name, None, "") for p in images]
    return with_left_out(pd.DataFrame(rows, columns=["path", "label", "group", "origin"]), path, left_out)


def embedded_root() -> Path:
    """Where the embedded dataset is generated: $MEDSEARCH_DATA or ~/.cache/medsearch."""
    base = os.environ.get("MEDSEARCH_DATA") or Path.home() / ".cache" / "medsearch"
    return Path(base) / "embedded"


@register_loader("embedded", layout="generated on first use", needs_path=False)
def load_embedded(path: Path | None = None, *, n_per_class: int = 400, image_size: int = 96, seed: int = 0) -> pd.DataFrame:
    """The synthetic dermoscopy stand-in, generated once, then read like any folder dataset."""
    from trainables.datasets.embedded import generate_embedded

    root = Path(path) if path else embedded_root() / f"n{n_per_class}-s{image_size}-seed{seed}"
    generate_embedded(root, n_per_class=n_per_class, image_size=image_size, seed=seed)
    return load_folder(root, classes=["benign", "malignant"])
