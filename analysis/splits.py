"""The evaluated splits of a results folder, and the log of every look at the test split.

``splits.parquet`` (written by ``search.prepare``) lists every image with its split;
``read_split`` gives one split's rows and ``decode_split`` their pixels, decoded
like training but never cached on disk (held-out pixels stay in memory).
Every reading of the test split is appended to ``RUN_DIR/test_evaluation.json``
(``log_test_use``), under a lock and atomically (``append_record``), so a report
can show how often the test set was looked at.

Images are named relative to the dataset's root (``trainables.datasets.image_root``:
the deepest folder holding every image its loader lists), in ``splits.parquet`` and
everything written after it, so a sealed folder names no place on the machine that
wrote it. ``image_paths`` finds them again: it lists the study's dataset the way the
run did (its ``Dataset``, or ``--data-dir``), checks that the listing holds every
image the split names, and joins the names to its root. Folders written before
names were relative keep their absolute paths, and those are used as they are.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from analysis.errors import EvaluateError, ResultsFolderError
from analysis.reader import read_record, read_table
from analysis.files import SPLITS, TEST_LOG

__all__ = ["SPLIT_NAMES", "DATA_DIR_HELP", "read_split", "read_splits", "decode_split", "label_indices", "split_class_names",
           "fold_rows", "image_names", "image_paths", "dataset_root", "log_test_use", "append_record", "now", "jsonable"]

SPLIT_NAMES = ("test", "val")
DATA_DIR_HELP = ("the study's dataset folder on this machine, if it moved since the run (as search.run --data-dir "
                 "takes it); by default it is found as the run found it")


def read_split(run_dir: Path, split: str, data_dir: str | None = None) -> pd.DataFrame:
    """The rows of ``splits.parquet`` in ``split``, in file order: ``image`` as the folder names it, ``path`` where
    it is on this machine (``image_paths``; ``data_dir`` where the dataset now lives, if it moved)."""
    if split not in SPLIT_NAMES:
        raise EvaluateError(f"split {split!r} cannot be evaluated; choose one of {', '.join(SPLIT_NAMES)}")
    path = run_dir / SPLITS
    if not path.is_file():
        raise EvaluateError(f"{str(path)!r} is missing; was the results folder copied completely?")
    table = read_splits(path)
    rows = table[table["split"] == split].reset_index(drop=True)
    if not rows.empty:
        rows = located(run_dir, rows, data_dir)
    if rows.empty:
        present = ", ".join(f"{k} {v}" for k, v in table["split"].value_counts().items())
        fix = ("use the validation split instead (analysis.evaluate --split val, optimistic as the trials were "
               "chosen on it; analysis.export --verify-on val), or run a study whose split protocol has a test set "
               "(grouped, stratified, S1-S3)") if split == "test" else "the study has no validation images; check its dataset"
        raise EvaluateError(f"the study's split holds no {split} images ({present}); {fix}")
    return rows


def decode_split(rows: pd.DataFrame, size: int) -> np.ndarray:
    """Decode like training (``trainables.data.decode_images``), without the disk cache:
    held-out pixels are kept in memory only."""
    from trainables.data import decode_images
    from trainables.datasets import DatasetError

    try:
        return decode_images(rows["path"].astype(str).tolist(), size, use_cache=False)
    except DatasetError as exc:
        raise EvaluateError(f"{exc}\nThe split's images must be where the study's dataset is; restore them there, "
                            "or pass --data-dir DIR where the dataset now lives") from None


def label_indices(rows: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    """The split's labels as indices in the model's class order (from its trial.json)."""
    unknown = sorted(set(rows["label"].astype(str)) - set(class_names))
    if unknown:
        raise EvaluateError(f"labels {unknown} of splits.parquet are not classes of the model {class_names}; "
                            "is this the run the checkpoint came from?")
    index = {c: i for i, c in enumerate(class_names)}
    return rows["label"].astype(str).map(index).to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------
# the test-split log
# --------------------------------------------------------------------------


def log_test_use(run_dir: Path, *, trials: list[str], n_test: int, by: str, **extra) -> dict:
    """Append one use of the test split to ``RUN_DIR/test_evaluation.json`` and return the entry."""
    entry = {"test_split_used_at": now(), "by": by, "trials": list(trials), "n_test": int(n_test), **extra}
    append_record(run_dir / TEST_LOG, "test_split_log", entry)
    return entry


def append_record(path: Path, key: str, item: dict) -> None:
    """Append ``item`` to the list ``key`` of a JSON file, under a lock, written atomically."""
    try:
        _append(path, key, item)
    except OSError as exc:  # a read-only folder or a full disk: the log is not written, so nothing is read after it
        raise EvaluateError(f"cannot write {str(path)!r} ({exc.strerror or exc}); make the results folder writable "
                            "(or free some space) and run again: every look at the test split is logged first") from None


def _append(path: Path, key: str, item: dict) -> None:
    with FileLock(str(path) + ".lock"):
        record = {}
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except ValueError as exc:
                # Never overwrite a damaged log: it is the record of every look at the test set.
                raise EvaluateError(f"{str(path)!r} is not valid JSON ({exc}); move it aside and keep it, "
                                    "then run again") from None
        record.setdefault(key, []).append(jsonable(item))
        from search.storage import write_atomic  # search/ imports TensorFlow: only when writing

        write_atomic(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(value):
    """NaN becomes null (strict JSON); numpy scalars and arrays become Python ones."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def split_class_names(run_dir: Path) -> list[str]:
    """Class order of ``splits.parquet`` (``label_index``), the order every trial was trained with."""
    pairs = read_splits(run_dir / SPLITS)[["label", "label_index"]].drop_duplicates()
    return pairs.sort_values("label_index")["label"].astype(str).tolist()


def read_splits(path: Path) -> pd.DataFrame:
    """``splits.parquet``; a damaged one (cut short by a crash or an interrupted copy) is an ``EvaluateError`` naming it."""
    try:
        table = read_table(path)
    except ResultsFolderError as exc:
        raise EvaluateError(str(exc)) from None
    missing = {"path", "label", "label_index", "split"} - set(table.columns)
    if missing:
        raise EvaluateError(f"{str(path)!r} lacks the column(s) {sorted(missing)}; was it written by search.run? "
                            "Restore it from the original results folder")
    return table


def fold_rows(run_dir: Path, data_dir: str | None = None) -> pd.DataFrame | None:
    """train ∪ val rows of a cross-validated study's splits.parquet (file order), with their ``fold``; else None."""
    path = run_dir / SPLITS
    table = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if "fold" not in table.columns or table["fold"].isna().all():
        return None
    return located(run_dir, table[table["fold"].notna()].reset_index(drop=True), data_dir)


def located(run_dir: Path, rows: pd.DataFrame, data_dir: str | None = None) -> pd.DataFrame:
    """``rows`` of splits.parquet with ``image`` (the recorded name) and ``path`` (where it is on this machine)."""
    names = rows["path"].astype(str).tolist()
    return rows.assign(image=image_names(run_dir, names), path=image_paths(run_dir, names, data_dir))


def image_paths(run_dir: Path, names, data_dir: str | None = None) -> list[str]:
    """Where the images the folder names (``splits.parquet``'s ``path``, a prediction's ``path``) are on this
    machine. ``data_dir``: the dataset's folder if it moved since the run (as ``search.run --data-dir`` takes it)."""
    names = [str(n) for n in names]
    if all(os.path.isabs(n) for n in names):  # a folder written before names were relative
        return names
    run_dir = Path(run_dir)
    stamps = tuple(os.stat(run_dir / name).st_mtime_ns for name in (SPLITS, "study.json"))
    root = listed_root(run_dir, data_dir, stamps)
    if not os.path.isdir(root):  # listed earlier in this process, moved since
        listed_root.cache_clear()
        root = listed_root(run_dir, data_dir, stamps)
    return [n if os.path.isabs(n) else os.path.join(root, n) for n in names]


@functools.lru_cache(maxsize=8)  # stamps: the files' mtimes, so an edited folder is listed again
def listed_root(run_dir: Path, data_dir: str | None = None, stamps: tuple = ()) -> str:
    """The root of the study's dataset on this machine: listed as the run listed it (``study.json``'s dataset, with
    the run's ``--data-dir`` or ``data_dir``), after checking that the listing holds every image the split names."""
    from trainables.datasets import DatasetError, get_loader, image_root, load_table, relative_names

    record = read_record(run_dir)
    ds = (record.get("study") or {}).get("dataset") or {}
    loader, given = ds.get("loader"), data_dir or (record.get("flags") or {}).get("data_dir") or ds.get("path")
    options = dict(ds.get("options") or {})
    if ds.get("classes") and loader == "folder":
        options["classes"] = ds["classes"]
    fix = ("pass --data-dir DIR: the folder of the study's dataset on this machine (what search.run --data-dir "
           "takes)")
    try:
        if data_dir is not None and not get_loader(loader).needs_path:
            raise EvaluateError(f"--data-dir {data_dir!r}: the study's dataset ({loader!r}) is generated, not read "
                                "from a folder; leave --data-dir out")
        listing = load_table(loader, given, **options)["path"]
    except DatasetError as exc:
        raise EvaluateError(f"the study's images cannot be found: its dataset ({loader!r} at {given!r}) does not "
                            f"list here: {exc}\n{fix}") from None
    root = image_root(listing)
    held = set(relative_names(listing, root))
    recorded = read_splits(run_dir / SPLITS)["path"].astype(str)
    missing = [n for n in recorded if not os.path.isabs(n) and n not in held]
    if missing:
        raise EvaluateError(f"the dataset {loader!r} at {given!r} lists {len(held)} image(s) under {root!r}, but not "
                            f"{len(missing)} of the {len(recorded)} the study's splits.parquet names (e.g. "
                            f"{missing[0]!r}): is it the study's dataset? {fix}")
    return root



def image_names(run_dir: Path, paths) -> list[str]:
    """Image names as the results folder records them: relative ones as they are; the absolute paths of a folder
    written before names were relative, relative to the common folder of its images (``dataset_root``); a path
    outside that root keeps only its file name."""
    if not any(os.path.isabs(str(p)) for p in paths):
        return [str(p) for p in paths]
    root = dataset_root(run_dir)
    out = []
    for p in paths:
        p = str(p)
        try:
            out.append(Path(p).relative_to(root).as_posix() if root else Path(p).as_posix())
        except ValueError:
            out.append(Path(p).name)
    return out


def dataset_root(run_dir: Path) -> str | None:
    """The deepest folder holding every image of an older ``splits.parquet`` with absolute paths (None when its
    names are relative: see ``listed_root``)."""
    paths = read_splits(Path(run_dir) / SPLITS)["path"].astype(str)
    absolute = [p for p in paths.unique() if os.path.isabs(p)]
    if not absolute:
        return None
    return os.path.commonpath([os.path.dirname(p) for p in absolute])
