"""COVID-19 Radiography Database (Chowdhury et al. 2020; Rahman et al. 2021): chest X-rays.

Download: https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database

The current release has one folder per class, each with ``images/`` and the
lung segmentation ``masks/`` (ignored here)::

    COVID-19_Radiography_Dataset/
      COVID/images/COVID-1.png ...            (3,616)
      Normal/images/Normal-1.png ...          (10,192)
      Viral Pneumonia/images/...              (1,345)
      Lung_Opacity/images/...                 (6,012, optional)
      */masks/...                             ignored

Older releases put the PNGs directly in the class folder (and named the
folders ``COVID-19`` and ``NORMAL``); both are accepted. Images are
grayscale PNGs; ``trainables.data.decode_image`` gives them 3 channels.
Labels are the canonical names ``COVID``, ``Normal``, ``Viral Pneumonia`` and
``Lung_Opacity``. There are no patient ids, so ``group`` is ``None``.
"""

from __future__ import annotations

import re
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

CLASSES = ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity")
REQUIRED = ("COVID", "Normal", "Viral Pneumonia")  # Lung_Opacity came with a later release
URL = "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"
_LAYOUT = """  ROOT/
    COVID/            images/*.png (masks/ is ignored), or the PNGs directly (older releases); subfolders included
    Normal/           ...
    Viral Pneumonia/  ...
    Lung_Opacity/     (optional)"""


def _key(name: str) -> str:
    """Folder or class name -> comparison key: 'COVID-19' ~ 'covid', 'Viral_Pneumonia' ~ 'Viral Pneumonia'."""
    return re.sub(r"[^a-z]", "", name.lower().replace("19", ""))


_CANONICAL = {_key(c): c for c in CLASSES}


@register_loader("covid", layout=_LAYOUT, url=URL)
def load_covid(path: Path, *, classes: list[str] | None = None) -> pd.DataFrame:
    """One row per X-ray. ``classes`` picks classes (default: every class folder found)."""
    left_out = LeftOut()
    found: dict[str, Path] = {}
    for folder in class_folders(path, left_out):
        label = _CANONICAL.get(_key(folder.name))
        if label in found:  # COVID/ beside covid/ (or COVID-19/): one would be dropped without a word
            raise DatasetError(f"covid: {str(path)!r} has both {found[label].name}/ and {folder.name}/, which are "
                               f"both class {label!r}; merge them into one {label}/ folder")
        if label is not None:
            found[label] = folder
    wanted = _wanted(classes, found, path)
    rows = []
    for label in wanted:
        folder = _image_folder(found[label])
        images = list_images(folder, left_out)
        if not images:
            raise DatasetError(no_images_message(folder, left_out, "covid"))
        rows += [(str(p), label, None, "") for p in images]
    return with_left_out(pd.DataFrame(rows, columns=["path", "label", "group", "origin"]), path, left_out)


def _wanted(classes: list[str] | None, found: dict[str, Path], root: Path) -> list[str]:
    if classes is None:
        required, wanted = list(REQUIRED), [c for c in CLASSES if c in found]
    else:
        unknown = [c for c in classes if _key(c) not in _CANONICAL]
        if unknown:
            raise DatasetError(f"covid: unknown class(es) {unknown}; valid: {list(CLASSES)}")
        required = wanted = [_CANONICAL[_key(c)] for c in classes]
    missing = [c for c in required if c not in found]
    if missing:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"covid: class folder(s) {missing} not found in {str(root)!r} (found folders: {folders or 'none'}). "
            f"Expected layout:\n{_LAYOUT}\nDownload it from {URL}."
        )
    return wanted


def _image_folder(class_dir: Path) -> Path:
    """``class/images/`` in the current release, else the class folder itself."""
    for child in class_dir.iterdir():
        if child.is_dir() and child.name.lower() == "images":
            return child
    return class_dir
