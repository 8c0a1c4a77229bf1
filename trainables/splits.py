"""Split protocols: name -> function(table, seed, **options) -> split per row.

Each protocol returns a ``pandas.Series`` of ``"train"``, ``"val"``, ``"test"``
(or ``"unused"`` for rows a protocol leaves out) aligned with the table.
Splits depend only on the table and the seed, so they are reproducible.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

SPLITS = ("train", "val", "test")

_PROTOCOLS: dict[str, Callable[..., pd.Series]] = {}


def register_protocol(name: str):
    def wrap(fn):
        _PROTOCOLS[name] = fn
        return fn

    return wrap


def list_protocols() -> list[str]:
    return sorted(_PROTOCOLS)


def assign_splits(table: pd.DataFrame, protocol: str, *, seed: int, **options) -> pd.Series:
    from trainables.backbones import unknown_name_message

    if protocol not in _PROTOCOLS:
        raise ValueError(unknown_name_message("split protocol", protocol, _PROTOCOLS))
    split = _PROTOCOLS[protocol](table, seed=seed, **options).rename("split")
    missing = {"train", "val"} - set(split)
    if missing:
        raise ValueError(f"split protocol {protocol!r} produced no {sorted(missing)} rows")
    return split


def three_way(labels: pd.Series, *, val: float, test: float, seed: int) -> pd.Series:
    """Stratified train/val/test split of an index by label."""
    index = labels.index.to_numpy()
    split = pd.Series("train", index=labels.index)
    rest, test_idx = (index, []) if test == 0 else train_test_split(
        index, test_size=test, stratify=labels, random_state=seed
    )
    _, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=labels[rest], random_state=seed)
    split[test_idx] = "test"
    split[val_idx] = "val"
    return split


@register_protocol("stratified")
def stratified(table: pd.DataFrame, *, seed: int, val: float = 0.15, test: float = 0.15) -> pd.Series:
    """Image-level stratified train/val/test; fractions of the whole table."""
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions must satisfy 0 < val, 0 <= test, val + test < 1; got val={val}, test={test}")
    return three_way(table["label"], val=val, test=test, seed=seed)


def subsample(split: pd.Series, labels: pd.Series, *, per_split: int, seed: int) -> pd.Series:
    """Keep at most ``per_split`` stratified rows of each split (for --smoke); the rest become "unused"."""
    rng = np.random.default_rng(seed)
    out = split.copy()
    for name in SPLITS:
        idx = split.index[split == name]
        if len(idx) <= per_split:
            continue
        keep = []
        for _, group in labels[idx].groupby(labels[idx]):
            share = max(1, round(per_split * len(group) / len(idx)))
            keep += list(rng.choice(group.index, size=min(share, len(group)), replace=False))
        out[idx.difference(keep)] = "unused"
    return out
