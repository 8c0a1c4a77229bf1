"""The loader registry and the table contract every loader meets."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import unicodedata
from pathlib import Path
from typing import Callable

import pandas as pd

# Class names are compared in this Unicode form: a folder named on macOS (NFD: 'e' + U+0301) and the same
# name typed in a study file (NFC: U+00E9) are one class.
CLASS_NAME_FORM = "NFC"
TABLE_COLUMNS = ("path", "label", "group", "origin")
# Added to the table after loading (search.prepare, analysis.splits), so a loader's metadata column may not take
# these names. "near_duplicate_cluster" is trainables.near_duplicates.CLUSTER_COLUMN (that module imports this one).
PIPELINE_COLUMNS = ("label_index", "split", "fold", "near_duplicate_cluster", "image")
DICOM_SUFFIXES = (".dcm",)  # decoded by trainables.data.read_dicom (pydicom), every other suffix by PIL
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", *DICOM_SUFFIXES)  # the files a listing takes, in any letter case
IMAGE_KINDS = "/".join(IMAGE_SUFFIXES)  # ".jpg/.jpeg/.png/.dcm": how every message names them
_LEFT_OUT = "medsearch_left_out"  # table.attrs key: (root, LeftOut) from a loader to load_table, removed there


class DatasetError(ValueError):
    """A dataset is missing, empty or malformed. The message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    name: str
    load: Callable[..., pd.DataFrame]  # load(path, **options) -> image table
    layout: str  # the expected folder layout, shown when the path is wrong
    url: str = ""  # where users download the dataset
    needs_path: bool = True
    synthetic: bool = False  # generated images: every report and card says "not for clinical use"


_LOADERS: dict[str, LoaderSpec] = {}


def register_loader(name: str, *, layout: str, url: str = "", needs_path: bool = True, synthetic: bool = False):
    def wrap(load):
        _LOADERS[name] = LoaderSpec(name, load, layout, url, needs_path, synthetic)
        return load

    return wrap


def image_root(paths) -> str:
    """The deepest folder holding every image of ``paths``: what a results folder's image names are relative to,
    so that a folder names no place on the machine that wrote it."""
    folders = sorted({os.path.dirname(os.path.abspath(str(p))) for p in paths})
    return os.path.commonpath(folders) if folders else ""


def relative_names(paths, root: str) -> list[str]:
    """``paths`` relative to ``root`` (``image_root``), with forward slashes: how a results folder names images."""
    return [Path(os.path.relpath(os.path.abspath(str(p)), root)).as_posix() for p in paths]


def list_loaders() -> list[str]:
    return sorted(_LOADERS)


def get_loader(name: str) -> LoaderSpec:
    from trainables.checks import unknown_name_message

    if name not in _LOADERS:
        raise DatasetError(unknown_name_message("dataset loader", name, _LOADERS))
    return _LOADERS[name]


def load_table(name: str, path: str | Path | None, **options) -> pd.DataFrame:
    """Run loader ``name`` on ``path`` and check the table it returns."""
    spec = get_loader(name)
    _check_options(spec, options)
    if spec.needs_path:
        if path is None:
            raise DatasetError(f"dataset {name!r} needs a path (set Dataset(path=...) or --data-dir)")
        path = Path(path).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            where = f"\nDownload it from {spec.url}." if spec.url else ""
            raise DatasetError(f"dataset folder {str(path)!r} {what}. Expected layout:\n{spec.layout}{where}")
    table = spec.load(path, **options)
    _report_left_out(table, name)
    return check_table(table, name, layout=spec.layout)


def _report_left_out(table: pd.DataFrame, name: str) -> None:
    """Print what the loader's listing skipped (hidden entries, other files), so nothing is dropped unsaid.

    Printed before the table is checked: when a class comes out empty, this says where its files went.
    """
    root, left_out = table.attrs.pop(_LEFT_OUT, (None, LeftOut()))
    if left_out:
        print(f"note: {name}: left out {left_out.describe(root)} under {str(root)!r}", file=sys.stderr, flush=True)


def _check_options(spec: LoaderSpec, options: dict) -> None:
    """A misspelt option becomes a DatasetError naming the valid ones, not a bare TypeError."""
    params = inspect.signature(spec.load).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = list(params)[1:]  # the first parameter is the dataset path
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DatasetError(
            f"dataset {spec.name!r} has no option(s) {unknown}; valid options: {valid or 'none'}"
        )


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """The per-image metadata of an image table (or of ``splits.parquet``): every column that is neither in
    ``TABLE_COLUMNS`` nor one the pipeline adds (``PIPELINE_COLUMNS``), e.g. HAM10000's age, sex, localization."""
    return [str(c) for c in table.columns if c not in TABLE_COLUMNS and c not in PIPELINE_COLUMNS]


def class_name(name: str) -> str:
    """``name`` as class names are compared everywhere (``CLASS_NAME_FORM``): loaders' labels, a study's
    ``classes`` and ``positive_class``, ``--positive-class``."""
    return unicodedata.normalize(CLASS_NAME_FORM, name)


def _name_key(name: str) -> str:
    """Names that differ only by letter case or Unicode normalisation share this key."""
    return class_name(class_name(name).casefold())


def _shown(text: str) -> str:
    """``text`` quoted, combining marks and invisible characters escaped (``'e\\u0301'``), so two names that
    render alike print differently."""
    return "'" + "".join(f"\\u{ord(ch):04x}" if unicodedata.combining(ch) or not ch.isprintable() else ch
                         for ch in text) + "'"


def _difference(a: str, b: str) -> str:
    """Where ``a`` and ``b`` differ, by code point: ``'e\\u0301' (U+0065 U+0301) vs 'é' (U+00E9)``."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    if start and any(unicodedata.combining(x[start]) for x in (a, b) if start < len(x)):
        start -= 1  # show the letter an accent combines with, not the accent alone
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    parts = [(x[start:len(x) - end]) for x in (a, b)]
    return " vs ".join(f"{_shown(p)} ({' '.join(f'U+{ord(ch):04X}' for ch in p)})" for p in parts)


def check_distinct_names(names, what: str, fix: str) -> None:
    """Refuse names that differ only by letter case or Unicode normalisation (``benign`` / ``Benign``, ``bénin``
    typed as NFC and as NFD): they would become separate classes that read the same. ``what`` says what the
    names are (``"dataset 'folder': class names"``); ``fix`` how to make them one."""
    by_key: dict[str, list[str]] = {}
    for name in dict.fromkeys(str(n) for n in names):
        by_key.setdefault(_name_key(name), []).append(name)
    clashes = [sorted(same) for same in by_key.values() if len(same) > 1]
    if not clashes:
        return
    lines = []
    for same in clashes:
        a, b = same[0], same[1]
        how = [h for h, differs in (("letter case", class_name(a) != class_name(b)),
                                    ("Unicode normalisation", a.casefold() != b.casefold())) if differs]
        lines.append(f"{' and '.join(_shown(n) for n in same)} differ only in {' and '.join(how)}: "
                     f"{_difference(a, b)}")
    raise DatasetError(f"{what} that differ only in letter case or Unicode normalisation would be separate "
                       "classes that read the same:\n  " + "\n  ".join(lines) + f"\n{fix}")


def check_table(table: pd.DataFrame, name: str, *, layout: str = "") -> pd.DataFrame:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"loader {name!r} returned a table without columns {missing}")
    taken = [str(c) for c in table.columns if c in PIPELINE_COLUMNS]
    if taken:
        raise DatasetError(f"dataset {name!r}: metadata column(s) {taken} take names the pipeline adds "
                           f"({list(PIPELINE_COLUMNS)}); rename them (e.g. {taken[0] + '_given'!r})")
    expected = f" Expected layout:\n{layout}" if layout else ""
    if table.empty:
        raise DatasetError(f"dataset {name!r} has no images.{expected}")
    check_distinct_names(table["label"].unique(), f"dataset {name!r}: class names",
                         "Rename or merge the class folders (or labels) so each class has one name.")
    table["label"] = table["label"].map(class_name)  # compared with a study's classes in this form
    counts = {k: int(v) for k, v in table["label"].value_counts().items()}
    if len(counts) < 2:
        raise DatasetError(
            f"dataset {name!r} has a single class {counts}; a classifier needs at least two. "
            f"Check that the path is the dataset root (the folder holding every class).{expected}"
        )
    return table.reset_index(drop=True)


# --- Which files a dataset folder holds: one rule for every loader and for search.predict --------------------------

# Archive tools and viewers leave these beside the images: macOS ``._x.jpg`` resource forks and ``__MACOSX/``,
# ``.ipynb_checkpoints/``, thumbnail caches (``.thumbs/``), ``.DS_Store``. They are never images of the dataset.
SYSTEM_NAMES = ("__MACOSX",)

# Why an entry was left out, in the order ``LeftOut.describe`` lists them.
NOT_IMAGE = f"file(s) that are not {IMAGE_KINDS}"
HIDDEN = "hidden or __MACOSX file(s)/folder(s)"
LINKED_TWICE = "linked folder(s) already listed"
BROKEN = "broken link(s) or special file(s)"
UNREADABLE = "unreadable folder(s)"
_SHOWN = 3  # example paths per reason in a note


def is_hidden(name: str) -> bool:
    """Names that are never a class or an image: dot-names and ``__MACOSX``, at any depth."""
    return name.startswith(".") or name in SYSTEM_NAMES


@dataclasses.dataclass
class LeftOut:
    """Entries a listing skipped, by reason, so callers can say how many and which."""

    by_reason: dict[str, list[Path]] = dataclasses.field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    def update(self, other: "LeftOut") -> None:
        for reason, paths in other.by_reason.items():
            self.by_reason.setdefault(reason, []).extend(paths)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.by_reason.values())

    def under(self, folder: Path) -> "LeftOut":
        """Only the entries at or inside ``folder``."""
        inside = {r: [p for p in ps if p == folder or folder in p.parents] for r, ps in self.by_reason.items()}
        return LeftOut(inside)

    def describe(self, root: Path) -> str:
        """``"2 file(s) that are not .jpg/.jpeg/.png/.dcm (a/notes.txt, b.csv); 1 hidden ..."`` (under ``root``)."""
        parts = []
        for reason in (NOT_IMAGE, HIDDEN, LINKED_TWICE, BROKEN, UNREADABLE):
            paths = sorted(self.by_reason.get(reason, []))
            if paths:
                shown = ", ".join(_relative(p, root) for p in paths[:_SHOWN])
                more = f", ... ({len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else ""
                parts.append(f"{len(paths)} {reason} ({shown}{more})")
        return "; ".join(parts)


@dataclasses.dataclass
class ImageListing:
    """What ``scan_images`` found under a folder."""

    images: list[Path]  # sorted, so tables are reproducible
    left_out: LeftOut


def scan_images(folder: Path, *, recursive: bool = True) -> ImageListing:
    """The image files under ``folder``, subfolders included unless ``recursive=False``.

    Hidden entries (``is_hidden``) are left out at every depth. Symlinks are
    followed, files and folders alike, so a dataset assembled from links reads
    like a copy; a folder already being listed (a link back up the tree, or a
    second link to the same folder) is left out, so loops end and no image is
    listed twice. With ``recursive=False`` subfolders are not entered and, as
    asked for, not reported.
    """
    listing = ImageListing([], LeftOut())
    _scan(Path(folder), recursive, {os.path.realpath(folder)}, listing)
    listing.images.sort()
    return listing


def _scan(folder: Path, recursive: bool, seen: set[str], listing: ImageListing) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        listing.left_out.add(folder, UNREADABLE)
        return
    for entry in entries:
        path = Path(entry.path)
        try:  # following a link can fail: a loop of links, a link into a folder we may not read
            is_dir, is_file = entry.is_dir(), entry.is_file()
        except OSError:
            listing.left_out.add(path, BROKEN)
            continue
        if is_hidden(entry.name):
            listing.left_out.add(path, HIDDEN)
        elif is_dir:  # follows links
            if not recursive:
                continue
            real = os.path.realpath(path)
            if real in seen:
                listing.left_out.add(path, LINKED_TWICE)
                continue
            seen.add(real)
            _scan(path, recursive, seen, listing)
        elif is_file:  # follows links
            if path.suffix.lower() in IMAGE_SUFFIXES:
                listing.images.append(path)
            else:
                listing.left_out.add(path, NOT_IMAGE)
        else:  # a link to nothing, a socket, a FIFO
            listing.left_out.add(path, BROKEN)


def list_images(folder: Path, left_out: LeftOut) -> list[Path]:
    """The image files under ``folder`` by ``scan_images``; what it skipped is added to ``left_out``."""
    listing = scan_images(folder)
    left_out.update(listing.left_out)
    return listing.images


def class_folders(folder: Path, left_out: LeftOut) -> list[Path]:
    """The folders directly inside ``folder`` that may be classes, sorted; hidden ones go to ``left_out``."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and is_hidden(path.name):
            left_out.add(path, HIDDEN)
        elif path.is_dir():
            found.append(path)
    return found


def no_images_message(folder: Path, left_out: LeftOut, loader: str = "") -> str:
    """The error for a class folder without images, saying what it held instead."""
    held = left_out.under(folder).describe(folder)
    prefix = f"{loader}: " if loader else ""
    held = f" (left out: {held})" if held else ""
    return f"{prefix}class folder {str(folder)!r} holds no {IMAGE_KINDS} images{held}"


def with_left_out(table: pd.DataFrame, root: Path, left_out: LeftOut) -> pd.DataFrame:
    """A loader's table carrying what its listing skipped under ``root``, for ``load_table`` to report."""
    table.attrs[_LEFT_OUT] = (root, left_out)
    return table


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
