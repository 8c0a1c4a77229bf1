"""Before Ray starts: list the images, split them, write the split, decode train and val.

The test split is written to ``splits.parquet`` but never decoded here: the
search cannot read what it was never given.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pandas as pd

from search.study import Study, StudyError, cv_folds
from trainables.data import DIGEST_PREFIX, data_digest, decode_images, turned_by_exif
from trainables.datasets import DatasetError, image_root, load_table, metadata_columns, relative_names
from trainables.datasets.integrity import find_corrupt_cached, find_duplicates
from trainables.near_duplicates import CLUSTER_COLUMN, NearDuplicates, find_near_duplicates, settings_from
from trainables.splits import assign_folds, assign_splits, group_by, subsample

SMOKE_IMAGES_PER_SPLIT = 64


@dataclasses.dataclass
class Prepared:
    splits: pd.DataFrame  # every image: path, label, group, origin, split
    class_names: list[str]
    positive: int | None  # index of the positive class of a binary task
    arrays: dict  # x_train, y_train, x_val, y_val (+ fold_train, fold_val with cv_folds), digest_x_train, digest_x_val
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason) left out
    duplicates: pd.DataFrame | None = None  # byte-identical pairs, see integrity.find_duplicates
    near_duplicates: NearDuplicates | None = None  # the leakage audit (None when turned off)
    image_root: str = ""  # the folder every listed image is under; the results folder names images relative to it
    rotated: int = 0  # images of the splits the decoder turns upright by their EXIF orientation (said aloud)

    def names(self, paths) -> list[str]:
        """``paths`` as the results folder records them: relative to ``image_root``."""
        return relative_names(paths, self.image_root or image_root(paths))


def prepare_data(study: Study, *, data_dir: str | None = None, smoke: bool = False,
                 skip_corrupt: bool = False) -> Prepared:
    ds = study.dataset
    path = data_dir or ds.path
    options = dict(ds.options)
    if ds.classes is not None and ds.loader == "folder":
        options["classes"] = ds.classes
    table = load_table(ds.loader, path, **options)
    root = image_root(table["path"])  # of the whole listing, as analysis.splits lists it again to find the images
    table, skipped = drop_corrupt(table, skip=skip_corrupt)
    class_names = list(ds.classes) if ds.classes else sorted(table["label"].unique())
    unknown = sorted(set(table["label"]) - set(class_names))
    if unknown:
        table = table[table["label"].isin(class_names)].reset_index(drop=True)
    audit = settings_from(ds.near_duplicates)
    near = None
    if audit.enabled and _grouped_by_near_duplicates(ds):  # the split needs the clusters of every image
        near = find_near_duplicates(table, audit, weights_dir=study.weights_dir)
        table[CLUSTER_COLUMN] = near.clusters
    table["split"] = assign_splits(table, ds.split, seed=ds.seed, **ds.split_options)
    if smoke:
        table["split"] = subsample(table["split"], table["label"], per_split=SMOKE_IMAGES_PER_SPLIT, seed=ds.seed)
    if audit.enabled:
        if near is None:  # the images in a split only: S2's and --smoke's unused ones need no audit
            near = find_near_duplicates(table[table["split"] != "unused"], audit, weights_dir=study.weights_dir)
        near = near.with_splits(table)
        if audit.stop_on_label_conflict:
            _refuse_label_conflicts(near, table)
    if cv_folds(study):  # the folds of train ∪ val, written out with the split; the test split keeps <NA>
        table["fold"] = _folds(table, study)
    positive = _positive_index(study, class_names)
    _check_metric_reported(study, class_names)
    table["label_index"] = table["label"].map({c: i for i, c in enumerate(class_names)}).astype("int64")
    check_fits_in_memory(int(table["split"].isin(["train", "val"]).sum()), ds.image_size)
    arrays = {}
    for split in ("train", "val"):
        rows = table[table["split"] == split]
        arrays[f"x_{split}"] = decode_images(rows["path"].tolist(), ds.image_size)
        arrays[f"{DIGEST_PREFIX}x_{split}"] = data_digest(arrays[f"x_{split}"])  # once here, not in every trial
        arrays[f"y_{split}"] = rows["label_index"].to_numpy()
        if "fold" in rows.columns:  # the trials train fold k on train ∪ val minus fold k (trainables.train)
            arrays[f"fold_{split}"] = rows["fold"].to_numpy(dtype="int64")
    duplicates = find_duplicates(table[table["split"] != "unused"])
    rotated = len(turned_by_exif(table.loc[table["split"] != "unused", "path"]))  # test too: evaluate decodes it
    return Prepared(table, class_names, positive, arrays, skipped, duplicates, near, root, rotated)


def _folds(table: pd.DataFrame, study: Study) -> pd.Series:
    """``assign_folds`` for the study: seeded by the split's seed, grouped when its split protocol is."""
    ds = study.dataset
    by = group_by(ds.split_options.get("by", "group")) if ds.split == "grouped" else None
    try:
        return assign_folds(table, table["split"], cv_folds(study), seed=ds.seed, grouped_by=by)
    except DatasetError as exc:
        raise StudyError(f"cv_folds: bad value {study.cv_folds!r}; {exc}") from None


def _grouped_by_near_duplicates(ds) -> bool:
    return ds.split == "grouped" and "near_duplicates" in group_by(ds.split_options.get("by", "group"))


def _refuse_label_conflicts(near: NearDuplicates, table: pd.DataFrame, shown: int = 10) -> None:
    """``stop_on_label_conflict``: near-duplicates with two labels stop the run, listed, before anything is decoded."""
    pairs = near.in_study(table)
    conflicts = pairs[pairs["label_conflict"]]
    if conflicts.empty:
        return
    listed = "\n  ".join(f"{r.path_a} ({r.label_a}) ~ {r.path_b} ({r.label_b})"
                         for r in conflicts.head(shown).itertuples())
    more = f"\n  ... and {len(conflicts) - shown} more" if len(conflicts) > shown else ""
    raise DatasetError(f"{len(conflicts)} near-duplicate pair(s) have different labels:\n  {listed}{more}\n"
                       "Correct the labels or remove one image of each pair, or set "
                       "Dataset(near_duplicates={'stop_on_label_conflict': False}) to be warned and go on.")


def write_near_duplicates(prepared: Prepared, folder) -> str:
    """``near_duplicates.parquet`` in a ``search.storage.StudyFolder``: every pair, closest first."""
    pairs = prepared.near_duplicates.recorded()
    for col in ("path_a", "path_b"):
        pairs[col] = prepared.names(pairs[col])
    return folder.write_parquet("near_duplicates.parquet", pairs)


def check_fits_in_memory(n_images: int, image_size: int, available: tuple[int, str] | None = None) -> None:
    """Refuse, before decoding, train and val images whose arrays cannot fit in memory.

    Decoded, they take ``n_images x image_size x image_size x 3`` bytes (uint8
    RGB), held by this process for the whole run; Ray's object store then holds
    a second copy for the trials (spilling to disk when it must), and each
    trial's TensorFlow needs memory of its own. Only the first is certain, so
    only that is refused here. ``available``: ``(bytes, how they were counted)``.
    """
    memory, counted = available_memory() if available is None else available
    needed = n_images * image_size * image_size * 3
    if memory is None or needed <= memory:
        return
    fits = int(math.sqrt(memory / (n_images * 3)))  # the largest size whose arrays would fit
    raise StudyError(f"dataset.image_size: bad value {image_size}; its {n_images} train and val images decode to "
                     f"{_size(needed)} ({n_images} x {image_size} x {image_size} x 3 bytes), but this machine has "
                     f"{_size(memory)} of memory {counted}. Use a smaller image_size (at most {fits} fits, "
                     "less leaves room for training), or fewer images")


def available_memory() -> tuple[int | None, str]:
    """Bytes of memory this machine can give now, and how they were counted (None where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: MemAvailable counts the page cache it can drop
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available"
    except OSError:
        pass
    try:  # elsewhere, the arrays can at least never exceed the total
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in all"
    except (AttributeError, ValueError, OSError):
        return None, "unknown"


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.4g} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.4g} TiB"


def drop_corrupt(table: pd.DataFrame, *, skip: bool) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Check every image, test split included; fail listing the bad ones, or leave them out if ``skip``."""
    bad = find_corrupt_cached(table["path"])
    if not bad:
        return table, []
    if not skip:
        shown = "\n  ".join(f"{path} ({reason})" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DatasetError(f"{len(bad)} image(s) cannot be read:\n  {shown}{more}\n"
                           "Replace or delete them, or pass --skip-corrupt to leave them out "
                           "(the run then reports how many it skipped).")
    return table[~table["path"].isin({path for path, _ in bad})].reset_index(drop=True), bad


def _positive_index(study: Study, class_names: list[str]) -> int | None:
    positive = study.dataset.positive_class
    if positive is None:
        return None
    if positive not in class_names:
        from trainables.checks import unknown_name_message

        raise StudyError("dataset.positive_class: " + unknown_name_message("class", positive, class_names)
                         + " (the dataset's classes)")
    return class_names.index(positive)


def _check_metric_reported(study: Study, class_names: list[str]) -> None:
    from trainables.metrics import metric_names

    reported = metric_names(class_names) + ["train_loss"]
    if study.metric not in reported:
        from trainables.checks import unknown_name_message

        raise StudyError("metric: " + unknown_name_message("metric", study.metric, reported) + " (trials never report it)")


def write_splits(prepared: Prepared, folder) -> str:
    """``splits.parquet`` in a ``search.storage.StudyFolder``: every image with its split, written out, each
    named relative to the dataset's root (``analysis.splits.image_paths`` finds them again)."""
    splits = prepared.splits
    metadata = metadata_columns(splits)  # age, sex, ...: for analysis.subgroups
    out = splits[["path", "label", "label_index", "group", "origin", "split"]
                 + (["fold"] if "fold" in splits.columns else [])  # fold: cv_folds, <NA> outside train ∪ val
                 + metadata].copy()
    out["path"] = prepared.names(out["path"])
    text = [c for c in metadata if not pd.api.types.is_numeric_dtype(out[c]) or pd.api.types.is_bool_dtype(out[c])]
    for col in ("path", "label", "group", "origin", "split", *text):
        out[col] = out[col].astype("string")
    return folder.write_parquet("splits.parquet", out)
