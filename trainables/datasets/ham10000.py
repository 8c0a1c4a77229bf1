"""HAM10000 (Tschandl et al. 2018): 10,015 dermoscopy images of 7,470 lesions, 7 classes.

Download: https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000
or the Harvard Dataverse, https://doi.org/10.7910/DVN/DBW86T (CC BY-NC-SA 4.0).

The table has one row per image; ``group`` is the ``lesion_id``, because many
lesions were photographed more than once and an image-level split leaks
(use the ``grouped`` split protocol for a leak-free split).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainables.datasets._registry import (
    HIDDEN,
    DatasetError,
    LeftOut,
    is_hidden,
    list_images,
    register_loader,
    scan_images,
    with_left_out,
)

METADATA = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# The binary mapping used in the literature (and by study S2).
MALIGNANT = ("akiec", "bcc", "mel")
BENIGN = ("bkl", "df", "nv", "vasc")
TARGETS = ("dx", "binary")
# Per-image metadata carried into the table (and splits.parquet) for subgroup results (analysis.subgroups).
# dx_type is how the diagnosis was confirmed (histo, follow_up, consensus, confocal).
METADATA_COLUMNS = ("age", "sex", "localization", "dx_type", "source")
# The CSV's own name of a column, where ours differs: its "dataset" is the acquisition site (vidam, rosendahl, ...),
# which in splits.parquet would read as a name of the whole data set.
CSV_NAMES = {"source": "dataset"}
NUMERIC_METADATA = ("age",)

URL = "https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000 or https://doi.org/10.7910/DVN/DBW86T"
_LAYOUT = f"""  ROOT/
    {METADATA}      lesion_id,image_id,dx,dx_type,age,sex,localization,...
    HAM10000_images_part_1/   ISIC_0024306.jpg ...
    HAM10000_images_part_2/   ISIC_0029306.jpg ...
  (or every image in one folder: ROOT/images/*.jpg, or ROOT/*.jpg)"""

_SHOWN = 5  # examples quoted in an error message


@register_loader("ham10000", layout=_LAYOUT, url=URL)
def load_ham10000(path: Path, *, target: str = "dx", strict: bool = True) -> pd.DataFrame:
    """Read HAM10000 into an image table.

    ``target="dx"`` labels each image with its diagnosis (7 classes);
    ``target="binary"`` labels it ``malignant`` (mel, bcc, akiec) or ``benign``
    (nv, bkl, df, vasc). With ``strict=False``, metadata rows without an image
    file and image files without a row are dropped instead of raising.
    The table also carries the metadata columns the CSV has of ``METADATA_COLUMNS``
    (``age`` a number, the others text; empty cells are NA).
    """
    if target not in TARGETS:
        raise DatasetError(f"ham10000: target must be one of {list(TARGETS)}, got {target!r}")
    meta = _read_metadata(path)
    left_out = LeftOut()
    files = _find_images(path, left_out)
    meta = _match_files(meta, files, path, strict=strict)
    labels = meta["dx"] if target == "dx" else meta["dx"].map(lambda dx: "malignant" if dx in MALIGNANT else "benign")
    table = pd.DataFrame(
        {
            "path": meta["image_id"].map(lambda i: str(files[i])),
            "label": labels.astype(str),
            "group": meta["lesion_id"].astype(str),
            "origin": "",
            **_metadata(meta),
        }
    ).reset_index(drop=True)
    return with_left_out(table, path, left_out)


def _metadata(meta: pd.DataFrame) -> dict[str, pd.Series]:
    """The CSV's ``METADATA_COLUMNS`` it has: numbers as floats (a bad or empty cell is NaN), text as strings."""
    out = {}
    for col in METADATA_COLUMNS:
        if CSV_NAMES.get(col, col) in meta.columns:
            values = meta[CSV_NAMES.get(col, col)]
            out[col] = pd.to_numeric(values, errors="coerce") if col in NUMERIC_METADATA else values.astype("string")
    return out


def _read_metadata(root: Path) -> pd.DataFrame:
    csv = root / METADATA
    if not csv.is_file():
        found = sorted(p.name for p in root.glob("*.csv"))
        raise DatasetError(
            f"ham10000: {METADATA} not found in {str(root)!r} (CSV files there: {found or 'none'}). "
            f"Expected layout:\n{_LAYOUT}\nDownload it from {URL}."
        )
    meta = pd.read_csv(csv, dtype=str)
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise DatasetError(
            f"ham10000: {str(csv)!r} lacks column(s) {missing}; it needs {list(REQUIRED_COLUMNS)} "
            f"and has {list(meta.columns)}. Use the metadata file that ships with the images."
        )
    meta = meta.dropna(how="all")
    blank = meta[list(REQUIRED_COLUMNS)].isna().any(axis=1)
    if blank.any():
        rows = [int(i) + 2 for i in meta.index[blank][:_SHOWN]]  # +2: header line, 1-based
        raise DatasetError(
            f"ham10000: {int(blank.sum())} row(s) of {csv.name} have an empty lesion_id, image_id or dx (lines {rows})"
        )
    dup = meta["image_id"].duplicated(keep=False)
    if dup.any():
        ids = sorted(meta.loc[dup, "image_id"].unique())
        raise DatasetError(f"ham10000: {len(ids)} image_id(s) appear more than once in {csv.name}: {_examples(ids)}")
    unknown = sorted(set(meta["dx"]) - set(CLASSES))
    if unknown:
        raise DatasetError(f"ham10000: unknown dx value(s) {unknown} in {csv.name}; expected {list(CLASSES)}")
    return meta.sort_values("image_id", kind="stable").reset_index(drop=True)


def _find_images(root: Path, left_out: LeftOut) -> dict[str, Path]:
    """image_id -> file, from the part folders and an ``images/`` folder (subfolders included) and the root itself.

    The Kaggle download also ships lower-case copies of the part folders
    (``ham10000_images_part_1/``); a file whose id was already found is a
    copy and is skipped, so upper-case names (sorted first) win. Files at the
    root other than images (the metadata and Kaggle's ``hmnist_*.csv``) are
    expected there and not reported; hidden ones are.
    """
    folders = sorted(
        p for p in root.iterdir()
        if p.is_dir() and not is_hidden(p.name)
        and (p.name.lower().startswith("ham10000_images_part") or p.name.lower() == "images")
    )
    files: dict[str, Path] = {}
    for folder in folders:
        for image in list_images(folder, left_out):
            files.setdefault(image.stem, image)
    at_root = scan_images(root, recursive=False)
    for path in at_root.left_out.by_reason.get(HIDDEN, []):
        left_out.add(path, HIDDEN)
    for image in at_root.images:
        files.setdefault(image.stem, image)
    return files


def _match_files(meta: pd.DataFrame, files: dict[str, Path], root: Path, *, strict: bool) -> pd.DataFrame:
    ids = set(meta["image_id"])
    no_file = sorted(ids - set(files))
    no_row = sorted(str(files[i]) for i in set(files) - ids)
    if not files:
        raise DatasetError(f"ham10000: no .jpg/.png images found in {str(root)!r}. Expected layout:\n{_LAYOUT}")
    if strict and (no_file or no_row):
        problems = []
        if no_file:
            problems.append(
                f"{len(no_file)} of {len(ids)} image_id(s) in {METADATA} have no image file "
                f"(e.g. {_examples(no_file)}); are both HAM10000_images_part_1/ and _part_2/ unpacked?"
            )
        if no_row:
            problems.append(
                f"{len(no_row)} image file(s) have no row in {METADATA} (e.g. {_examples(no_row)}); "
                f"remove them or add their metadata"
            )
        raise DatasetError(
            "ham10000: metadata and image files disagree:\n  - " + "\n  - ".join(problems)
            + "\nPass options={'strict': False} to drop the unmatched rows and files instead."
        )
    return meta[meta["image_id"].isin(list(files))]


def _examples(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
