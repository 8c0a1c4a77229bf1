"""The loader registry and the table contract every loader meets."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable

import pandas as pd

TABLE_COLUMNS = ("path", "label", "group", "origin")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A dataset is missing, empty or malformed. The message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    name: str
    load: Callable[..., pd.DataFrame]  # load(path, **options) -> image table
    layout: str  # the expected folder layout, shown when the path is wrong
    url: str = ""  # where users download the dataset
    needs_path: bool = True


_LOADERS: dict[str, LoaderSpec] = {}


def register_loader(name: str, *, layout: str, url: str = "", needs_path: bool = True):
    def wrap(load):
        _LOADERS[name] = LoaderSpec(name, load, layout, url, needs_path)
        return load

    return wrap


def list_loaders() -> list[str]:
    return sorted(_LOADERS)


def get_loader(name: str) -> LoaderSpec:
    from trainables.backbones import unknown_name_message

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
    return check_table(table, name, layout=spec.layout)


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


def check_table(table: pd.DataFrame, name: str, *, layout: str = "") -> pd.DataFrame:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"loader {name!r} returned a table without columns {missing}")
    expected = f" Expected layout:\n{layout}" if layout else ""
    if table.empty:
        raise DatasetError(f"dataset {name!r} has no images.{expected}")
    counts = {k: int(v) for k, v in table["label"].value_counts().items()}
    if len(counts) < 2:
        raise DatasetError(
            f"dataset {name!r} has a single class {counts}; a classifier needs at least two. "
            f"Check that the path is the dataset root (the folder holding every class).{expected}"
        )
    return table.reset_index(drop=True)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted, so tables are reproducible.

    Hidden files are skipped: archives made on macOS carry ``._name.jpg``
    resource forks that look like images but are not.
    """
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
