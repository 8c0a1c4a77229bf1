"""Benign vs malignant dermoscopy datasets shipped as ``train/`` and ``test/`` class folders.

Two Kaggle datasets share this layout:

- "Melanoma Cancer Dataset" (bhaveshmittal, 13,879 images, study S1):
  ``train/{Benign,Malignant}`` (6,289 / 5,590) and ``test/{Benign,Malignant}`` (1,000 / 1,000);
  https://www.kaggle.com/datasets/bhaveshmittal/melanoma-cancer-dataset
- "Melanoma Skin Cancer Dataset of 10000 Images" (hasnainjaved):
  ``train/{benign,malignant}`` and ``test/{benign,malignant}``;
  https://www.kaggle.com/datasets/hasnainjaved/melanoma-skin-cancer-dataset-of-10000-images

Class folder names are matched case-insensitively and labels are always the
lower-case ``benign`` / ``malignant``. ``origin`` is ``"train"`` or ``"test"``,
the folder an image came from.

``test/`` is optional: some copies (such as ``shared/datasets/melanoma10k``)
ship ``train/`` only. The table then has only ``origin == "train"`` rows, and
the split protocol carves validation and test sets out of them. ``train/`` is
required. Images carry no patient or lesion id, so ``group`` is ``None``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainables.datasets._registry import (
    DatasetError,
    LeftOut,
    class_folders,
    is_hidden,
    list_images,
    no_images_message,
    register_loader,
    with_left_out,
)

CLASSES = ("benign", "malignant")
URL = (
    "https://www.kaggle.com/datasets/bhaveshmittal/melanoma-cancer-dataset or "
    "https://www.kaggle.com/datasets/hasnainjaved/melanoma-skin-cancer-dataset-of-10000-images"
)
_LAYOUT = """  ROOT/
    train/
      benign/     image files (.jpg, .jpeg, .png, .dcm), subfolders included; folder names in any case (Benign/)
      malignant/
    test/         (optional: without it, val and test are carved out of train/)
      benign/
      malignant/"""


@register_loader("melanoma", layout=_LAYOUT, url=URL)
def load_melanoma(path: Path) -> pd.DataFrame:
    """Read ``train/`` and, when present, ``test/`` into an image table."""
    origins = {p.name.lower(): p for p in path.iterdir() if p.is_dir() and not is_hidden(p.name)}
    if "train" not in origins:
        raise DatasetError(_no_train_message(path))
    left_out = LeftOut()
    rows = []
    for origin in ("train", "test"):
        if origin in origins:
            for label, folder in _class_folders(origins[origin], left_out).items():
                images = list_images(folder, left_out)
                if not images:
                    raise DatasetError(no_images_message(folder, left_out, "melanoma"))
                rows += [(str(p), label, None, origin) for p in images]
    return with_left_out(pd.DataFrame(rows, columns=["path", "label", "group", "origin"]), path, left_out)


def _class_folders(split_dir: Path, left_out: LeftOut) -> dict[str, Path]:
    """``benign`` / ``malignant`` -> folder, matched case-insensitively; anything else is an error."""
    folders = class_folders(split_dir, left_out)
    found: dict[str, Path] = {}
    for folder in folders:
        key = folder.name.lower()
        if key not in CLASSES:
            raise DatasetError(
                f"melanoma: unexpected folder {str(folder)!r}; {split_dir.name}/ must hold only "
                f"benign/ and malignant/ (any case). Expected layout:\n{_LAYOUT}"
            )
        if key in found:
            raise DatasetError(
                f"melanoma: {str(split_dir)!r} has both {found[key].name}/ and {folder.name}/; "
                f"merge them into one {key}/ folder"
            )
        found[key] = folder
    missing = [c for c in CLASSES if c not in found]
    if missing:
        raise DatasetError(
            f"melanoma: {str(split_dir)!r} has no {'/, '.join(missing)}/ folder "
            f"(found: {[p.name for p in folders] or 'no folders'}). Expected layout:\n{_LAYOUT}"
        )
    return found


def _no_train_message(root: Path) -> str:
    # A common mistake: pointing at the folder that holds the unzipped dataset folder.
    nested = [p for p in sorted(root.iterdir()) if p.is_dir() and any(
        c.is_dir() and c.name.lower() == "train" for c in p.iterdir()
    )]
    hint = f" Did you mean {str(nested[0])!r}?" if nested else ""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    return (
        f"melanoma: no train/ folder in {str(root)!r} (found folders: {found or 'none'}).{hint} "
        f"Expected layout:\n{_LAYOUT}\nDownload it from {URL}."
    )
