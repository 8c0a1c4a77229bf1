"""The loader registry and the table contract every loader meets."""

from __future__ import annotations

import dataclasses
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
    if spec.needs_path:
        if path is None:
            raise DatasetError(f"dataset {name!r} needs a path (set Dataset(path=...) or --data-dir)")
        path = Path(path).expanduser()
        if not path.is_dir():
            where = f" Download it from {spec.url}." if spec.url else ""
            raise DatasetError(f"dataset folder {str(path)!r} does not exist. Expected layout:\n{spec.layout}{where}")
    table = spec.load(path, **options)
    return check_table(table, name)


def check_table(table: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"loader {name!r} returned a table without columns {missing}")
    if table.empty:
        raise DatasetError(f"dataset {name!r} has no images")
    labels = table["label"].unique()
    if len(labels) < 2:
        raise DatasetError(f"dataset {name!r} has a single class {list(labels)}; a classifier needs at least two")
    return table.reset_index(drop=True)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted, so tables are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
