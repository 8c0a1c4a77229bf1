"""Class-per-folder datasets: ``root/<class>/*.png|jpg|dcm``, and the embedded default dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from trainables.datasets._registry import (
    PIPELINE_COLUMNS,
    TABLE_COLUMNS,
    DatasetError,
    LeftOut,
    check_distinct_names,
    class_folders,
    class_name,
    list_images,
    no_images_message,
    register_loader,
    relative_names,
    with_left_out,
)

_LAYOUT = """  ROOT/
    <class A>/  image files (.jpg, .jpeg, .png, .dcm), subfolders included
    <class B>/  ...
    prediction/ (optional, unlabelled images; never used for training)
    meta.csv    (optional, with options={"metadata": "meta.csv"}: a "file" column, then age, sex, site, ...)"""

UNLABELLED_FOLDER = "prediction"
FILE_COLUMN = "file"  # the metadata CSV's column naming each image
_SHOWN = 5  # examples quoted in an error message


@register_loader("folder", layout=_LAYOUT)
def load_folder(path: Path, *, classes: list[str] | None = None, metadata: str | None = None) -> pd.DataFrame:
    """One folder per class, images at any depth inside it. ``classes`` picks and orders the class folders.

    Files beside the class folders (a README, EMBEDDED.json) are no class's and are not reported;
    hidden folders there (``.thumbs/``, ``__MACOSX/``) are left out and reported.
    ``metadata``: a CSV (relative to ``path``, or absolute) of per-image metadata, see ``read_metadata``.
    """
    left_out = LeftOut()
    folders = [p for p in class_folders(path, left_out) if p.name != UNLABELLED_FOLDER]
    # Every class folder, picked or not: with benign/ beside Benign/, which one classes=['benign'] means is a guess.
    check_distinct_names([p.name for p in folders], f"folder: class folders in {str(path)!r}",
                         "Merge them into one folder per class (or rename one), then run again.")
    found = {class_name(p.name): p for p in folders}  # a class is named in NFC, whatever the file system stores
    classes = sorted(found) if classes is None else [class_name(c) for c in classes]
    rows = []
    for name in classes:
        if name not in found:
            raise DatasetError(f"class folder {name!r} not found in {str(path)!r}; found: {sorted(found)}")
        images = list_images(found[name], left_out)
        if not images:
            raise DatasetError(no_images_message(found[name], left_out))
        rows += [(str(p), name, None, "") for p in images]
    table = pd.DataFrame(rows, columns=["path", "label", "group", "origin"])
    if metadata is not None:
        table = read_metadata(table, Path(path), metadata)
    return with_left_out(table, path, left_out)


def read_metadata(table: pd.DataFrame, root: Path, csv: str) -> pd.DataFrame:
    """``table`` with the columns of the metadata CSV ``csv``, joined on its ``file`` column.

    ``file`` names an image by its path relative to ``root`` (``benign/a.png``), or by its file name alone
    where that is unique; every other column is metadata (a column of numbers stays numeric). Images
    without a row get NA. A file listed twice, a file that is not an image of the table, or a column named
    like one of the table's is refused.
    """
    where = Path(csv) if Path(csv).is_absolute() else root / csv
    if not where.is_file():
        raise DatasetError(f"folder: metadata file {str(where)!r} not found; give options={{'metadata': ...}} a CSV "
                           f"path relative to the dataset folder {str(root)!r} (or an absolute one)")
    try:
        meta = pd.read_csv(where, dtype=str, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"folder: metadata file {str(where)!r} is not a readable CSV ({exc}); "
                           "save it as comma-separated UTF-8 text with a header line") from None
    if FILE_COLUMN not in meta.columns:
        raise DatasetError(f"folder: metadata file {where.name!r} has no {FILE_COLUMN!r} column (its columns: "
                           f"{list(meta.columns)}); add one naming each image relative to the dataset folder, "
                           "e.g. 'benign/img_001.png'")
    taken = [c for c in meta.columns if c in TABLE_COLUMNS or c in PIPELINE_COLUMNS]
    if taken:
        raise DatasetError(f"folder: metadata file {where.name!r} has column(s) {taken}, names the image table "
                           f"already uses ({list(TABLE_COLUMNS + PIPELINE_COLUMNS)}); rename them")
    names = meta[FILE_COLUMN].astype(str).str.strip().str.replace("\\", "/", regex=False).map(class_name)
    keys, ambiguous = _image_keys(table, root)
    unknown = sorted(set(names) - set(keys))
    if unknown:
        shared = [n for n in unknown if n in ambiguous]
        why = f" ({_examples(shared)}: a file name of several images; give its path)" if shared else ""
        raise DatasetError(f"folder: {len(unknown)} file(s) of {where.name!r} are no image of the dataset "
                           f"(e.g. {_examples(unknown)}){why}; name each image relative to {str(root)!r}, "
                           "e.g. 'benign/img_001.png', or remove those rows")
    rows = names.map(keys)
    twice = rows.duplicated(keep=False)  # the same file twice, or once by its path and once by its name
    if twice.any():
        shown = sorted(names[twice].unique())
        raise DatasetError(f"folder: {int(rows[twice].nunique())} image(s) have more than one row in {where.name!r} "
                           f"(e.g. {_examples(shown)}); keep one row per image")
    joined = meta.drop(columns=[FILE_COLUMN]).set_axis(rows.to_numpy()).reindex(table.index)
    for col in joined.columns:
        numbers = pd.to_numeric(joined[col], errors="coerce")
        # a column of numbers (age) stays numeric; one with any text (sex, site) is text
        table[col] = numbers if numbers.notna().sum() == joined[col].notna().sum() else joined[col].astype("string")
    return table


def _image_keys(table: pd.DataFrame, root: Path) -> tuple[dict, set]:
    """Image name -> table row, by path relative to ``root`` and by file name where only one image has it;
    and the file names several images share."""
    # In NFC on both sides, as class names: a CSV typed on one machine names the folders another stored in NFD.
    relative = [class_name(name) for name in relative_names(table["path"], str(root))]
    keys, by_name = dict(zip(relative, table.index)), {}
    for name, i in zip(relative, table.index):
        by_name.setdefault(Path(name).name, []).append(i)
    for name, found in by_name.items():
        if len(found) == 1:
            keys.setdefault(name, found[0])
    return keys, {n for n, found in by_name.items() if len(found) > 1}


def _examples(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def embedded_root() -> Path:
    """Where the embedded dataset is generated: $MEDSEARCH_DATA or ~/.cache/medsearch."""
    base = os.environ.get("MEDSEARCH_DATA") or Path.home() / ".cache" / "medsearch"
    return Path(base) / "embedded"


@register_loader("embedded", layout="generated on first use", needs_path=False, synthetic=True)
def load_embedded(path: Path | None = None, *, n_per_class: int = 400, image_size: int = 96, seed: int = 0) -> pd.DataFrame:
    """The synthetic dermoscopy stand-in, generated once, then read like any folder dataset."""
    from trainables.datasets.embedded import generate_embedded

    root = Path(path) if path else embedded_root() / f"n{n_per_class}-s{image_size}-seed{seed}"
    generate_embedded(root, n_per_class=n_per_class, image_size=image_size, seed=seed)
    return load_folder(root, classes=["benign", "malignant"])
