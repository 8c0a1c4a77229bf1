"""Split protocols: name -> function(table, seed, **options) -> split per row.

Each protocol returns a ``pandas.Series`` of ``"train"``, ``"val"``, ``"test"``
(or ``"unused"`` for rows a protocol leaves out) aligned with the table.
Splits depend only on the table and the seed, so they are reproducible.

Protocols: ``stratified`` (image-level, any fractions), ``grouped`` (leak-free:
by patient or lesion id, by near-duplicate cluster, or both), and ``S1`` ...
``S5``, which reproduce the split sizes of the reference studies in
``shared/paper-tables.md``. S1 and S3 fix their
own random seed, as the studies did, and ignore ``seed``.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import pandas as pd

from trainables.datasets import DatasetError
from trainables.near_duplicates import CLUSTER_COLUMN

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
    from trainables.checks import unknown_name_message

    if protocol not in _PROTOCOLS:
        raise ValueError(unknown_name_message("split protocol", protocol, _PROTOCOLS))
    split = _PROTOCOLS[protocol](table, seed=seed, **options).rename("split")
    missing = {"train", "val"} - set(split)
    if missing:
        raise ValueError(f"split protocol {protocol!r} produced no {sorted(missing)} rows")
    for warning in classes_missing_from_splits(table["label"], split, protocol):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return split


def classes_missing_from_splits(labels: pd.Series, split: pd.Series, protocol: str) -> list[str]:
    """One line per class that has no images in a split the protocol filled (S4's empty test split is no gap).

    Such a class cannot be learnt (no train images) or scored (no val or test images) there, and
    stratification rounds a class of a few images down to none in a small split, so this is said aloud.
    """
    filled = [name for name in SPLITS if (split == name).any()]
    present = pd.crosstab(labels, split).reindex(columns=filled, fill_value=0)
    counts = labels.value_counts()
    lines = []
    for name, row in present.iterrows():
        gaps = [s for s in filled if row[s] == 0]
        if gaps:
            lines.append(
                f"split protocol {protocol!r}: class {name!r} ({int(counts[name])} image(s)) has no "
                f"{' or '.join(gaps)} images; add images of this class or leave it out of the dataset"
            )
    return lines


def three_way(labels: pd.Series, *, val: float, test: float, seed: int, protocol: str = "stratified") -> pd.Series:
    """Stratified train/val/test split of an index by label.

    Every class needs an image for each split it is cut into (3, or 2 without a test split);
    fewer is a ``DatasetError`` naming the class, before scikit-learn fails on it.
    """
    from sklearn.model_selection import train_test_split  # here: a study's protocol names load without it

    needs, parts = (3, "train, val and test") if test > 0 else (2, "train and val")
    _check_class_sizes(labels, needs, protocol, why=f"one each for {parts}")
    index = labels.index.to_numpy()
    split = pd.Series("train", index=labels.index)
    # Whole-image counts rounded up like scikit-learn's test_size, minus float drift
    # (0.15 * 100 must be 15, not 16; 0.16 * 4032 = 645.12 becomes S3's 646).
    n_test, n_val = (math.ceil(f * len(index) - 1e-9) for f in (test, val))
    try:
        rest, test_idx = (index, []) if n_test == 0 else train_test_split(
            index, test_size=n_test, stratify=labels, random_state=seed
        )
        _, val_idx = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    except ValueError as exc:  # still too few images for these fractions (say 6 images, 2 classes, test=0.15)
        counts = {str(k): int(v) for k, v in labels.value_counts().items()}
        raise DatasetError(
            f"split protocol {protocol!r} cannot stratify {len(index)} images {counts} into val={val}, test={test} "
            f"({n_val} val and {n_test} test images): {exc} Add images or change the fractions."
        ) from None
    split[test_idx] = "test"
    split[val_idx] = "val"
    return _one_of_each_class_in_each_split(labels, split, [s for s in SPLITS if s != "test" or n_test], seed)


def _one_of_each_class_in_each_split(labels: pd.Series, split: pd.Series, opened: list[str], seed: int) -> pd.Series:
    """``split`` with every class of at least ``len(opened)`` images in each of the ``opened`` splits.

    Stratification rounds a small class's share of a split down, to none where it is under half an image
    (3 positives in 1,000 give 2 / 1 / 0 at 15 % test), although the minimum of 3 per class promises one
    each. A class missing from split E takes one image from the split where it has most, and E gives that
    split back an image of its own largest class, which has 2 or more there, so no split changes size and
    no other class loses its last image. When E holds no such image (fewer images than classes), E grows by
    one instead. Seeded, so the split stays reproducible.
    """
    rng = np.random.default_rng(seed)
    split = split.copy()
    for name in labels.value_counts()[lambda counts: counts >= len(opened)].index:
        for empty in opened:
            present = pd.crosstab(labels, split).reindex(index=labels.unique(), columns=opened, fill_value=0)
            if present.at[name, empty] > 0:
                continue
            donor = present.loc[name].idxmax()  # >= 2 there: the class has >= len(opened) images, none in ``empty``
            split[rng.choice(labels.index[((labels == name) & (split == donor)).to_numpy()])] = empty
            back = present[empty].drop(index=name)
            if back.max() >= 2:  # the largest class of ``empty`` gives one image back, keeping at least one
                split[rng.choice(labels.index[((labels == back.idxmax()) & (split == empty)).to_numpy()])] = donor
    return split


@register_protocol("stratified")
def stratified(table: pd.DataFrame, *, seed: int, val: float = 0.15, test: float = 0.15) -> pd.Series:
    """Image-level stratified train/val/test; fractions of the whole table."""
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions must satisfy 0 < val, 0 <= test, val + test < 1; got val={val}, test={test}")
    return three_way(table["label"], val=val, test=test, seed=seed, protocol="stratified")


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


# --- Reference-study protocols (see shared/paper-tables.md) and a leak-free one ---------------------------------
# S1-S5 reproduce each study's split sizes so our numbers sit beside theirs; ``grouped`` is the leak-free
# protocol to report next to them on data with several images per lesion or patient.


def _unused(table: pd.DataFrame) -> pd.Series:
    return pd.Series("unused", index=table.index, dtype=object)


def _check_class_sizes(labels: pd.Series, need: int, protocol: str, *, why: str = "") -> None:
    """A class with fewer than ``need`` images is a DatasetError naming it, its count and ``need``."""
    counts = labels.value_counts()
    short = {str(k): int(v) for k, v in counts[counts < need].items()}
    if not short:
        return
    if why:  # a minimum for the split to work at all
        named = "; ".join(f"class {k!r} has {v} image(s)" for k, v in short.items())
        raise DatasetError(
            f"{named}; split protocol {protocol!r} needs at least {need} per class ({why}). "
            "Add images of the class or leave it out of the dataset"
            + (", or split without a test set (S4, or split_options test=0), which needs 2" if need > 2 else "")
        )
    raise DatasetError(
        f"split protocol {protocol!r} samples {need} images per class, but these classes have fewer: {short}"
    )


@register_protocol("S1")
def s1(table: pd.DataFrame, *, seed: int, shuffle_seed: int = 42, train: float = 0.70, val: float = 0.15) -> pd.Series:
    """S1 (MobileNetV2, Melanoma Cancer Dataset): every row, shuffled with seed 42, cut 70/15/15.

    Train and test origins are combined, as in the study. ``seed`` is ignored:
    the study fixed the shuffle (``shuffle_seed=42``). The cut floors the
    train and val sizes and gives the rest to test (the usual
    ``take(int(0.7 * n))`` / ``take(int(0.15 * n))`` idiom): 13,879 images give
    9,715 / 2,081 / 2,083, the study's sizes. (sklearn's ``train_test_split``,
    which rounds the held-out side up, would give 9,715 / 2,082 / 2,082.)
    Not stratified, as in the study.
    """
    n = len(table)
    n_train = math.floor(train * n + 1e-9)  # epsilon: 0.7 * n may land a hair below an integer
    n_val = math.floor(val * n + 1e-9)
    order = np.random.RandomState(shuffle_seed).permutation(n)
    split = _unused(table)
    split.iloc[order[:n_train]] = "train"
    split.iloc[order[n_train : n_train + n_val]] = "val"
    split.iloc[order[n_train + n_val :]] = "test"
    return split


@register_protocol("S2")
def s2(
    table: pd.DataFrame, *, seed: int, per_class: int = 600, test_per_class: int = 120, val: float = 0.15
) -> pd.Series:
    """S2 (custom CNN vs VGG16 vs MobileNetV2, HAM10000 binary): a balanced 1,200-image subsample.

    Per class, seeded by ``seed``: ``per_class`` (600) images are drawn, the
    first ``test_per_class`` (120) go to test, ``val`` (15%) of the other 480,
    72, to validation, and the remaining 408 to train. Totals: 816 train /
    144 val / 240 test (120 / 120); every other row is "unused".

    The study says it kept all malignant images and downsampled benign ones,
    but HAM10000 has 1,954 malignant images (mel + bcc + akiec), so keeping
    them all cannot give its 600 / 600 balance. We keep the published sizes
    (1,200 images, balanced, test 120 / 120) and draw the malignant images at
    random too. Needs a two-class table: load ham10000 with ``target="binary"``.
    """
    labels = table["label"]
    classes = sorted(labels.unique())
    if len(classes) != 2:
        raise DatasetError(
            f"split protocol 'S2' needs a binary table (benign / malignant), got classes {classes}; "
            "for HAM10000 set the loader option target='binary'"
        )
    _check_class_sizes(labels, per_class, "S2")
    rng = np.random.default_rng(seed)
    n_val = round(val * (per_class - test_per_class))
    split = _unused(table)
    for name in classes:
        drawn = rng.permutation(labels.index[labels == name].to_numpy())[:per_class]
        split[drawn[:test_per_class]] = "test"
        split[drawn[test_per_class : test_per_class + n_val]] = "val"
        split[drawn[test_per_class + n_val :]] = "train"
    return split


@register_protocol("S3")
def s3(
    table: pd.DataFrame,
    *,
    seed: int,
    per_class: int = 1344,
    val: float = 0.16,
    test: float = 0.16,
    random_state: int = 1987,
) -> pd.Series:
    """S3 (CNN + transfer learning, COVID-19 Radiography, 3 classes): 1,344 per class, then 68/16/16.

    ``per_class`` images of every class are sampled with ``random_state``
    1987, then split stratified with the same random state (``seed`` is
    ignored: the study fixed it). sklearn rounds held-out sizes up:
    test = ceil(0.16 * 4,032) = ceil(645.12) = 646, the study's test size;
    val = ceil(0.16 / 0.84 * 3,386) = 645; train 2,741. Load the covid dataset
    with ``classes=["COVID", "Normal", "Viral Pneumonia"]``: every class in the
    table is sampled, so Lung_Opacity would add a fourth 1,344.
    """
    labels = table["label"]
    _check_class_sizes(labels, per_class, "S3")
    sampled = table.groupby("label", sort=True).sample(n=per_class, random_state=random_state).index.sort_values()
    split = _unused(table)
    split[sampled] = three_way(labels[sampled], val=val, test=test, seed=random_state, protocol="S3")
    return split


@register_protocol("S4")
def s4(table: pd.DataFrame, *, seed: int, val: float = 0.20) -> pd.Series:
    """S4 (MobileNetV2, histopathology folders): stratified 80/20 train/val, no test set.

    sklearn rounds val up: 50 images give 40 / 10, the study's 10 validation images.
    """
    return three_way(table["label"], val=val, test=0, seed=seed, protocol="S4")


@register_protocol("S5")
def s5(table: pd.DataFrame, *, seed: int, val: float = 0.20) -> pd.Series:
    """S5 (EfficientNetB1, HAM10000, 7 classes): stratified train/val, no test set.

    ceil(0.2 * 10,015) = 2,003 val and 8,012 train, the study's sizes. The
    split is image-level, so lesions leak across it; report ``grouped`` too.
    """
    return three_way(table["label"], val=val, test=0, seed=seed, protocol="S5")


@register_protocol("grouped")
def grouped(table: pd.DataFrame, *, seed: int, val: float = 0.15, test: float = 0.15,
            by: str | list[str] = "group") -> pd.Series:
    """Leak-free train/val/test: every group lands in exactly one split.

    ``by`` names what makes a group: ``"group"`` (the loader's patient or
    lesion id), ``"near_duplicates"`` (the image's near-duplicate cluster, set
    by ``search.prepare`` from ``trainables.near_duplicates``: the
    only leak-free split for data without patient ids), or both as a list:
    images sharing either land together, transitively.

    Stratified by class as far as whole groups allow. Greedy assignment: the
    groups are shuffled with ``seed`` and taken largest first; each goes to the
    split where it most reduces the gap between the split's class counts and
    their targets (``fraction * class count``), measured as a chi-square-like
    sum of squared gaps over target. Sizes come within a few images of the
    fractions. Rows without a group are treated as groups of one.
    """
    _check_fractions(val, test)
    groups = _group_keys(table, group_by(by))
    counts = pd.crosstab(groups, table["label"])  # one row per group, one column per class
    per_group = counts.to_numpy(dtype=float)
    fractions = np.array([1 - val - test, val, test])
    target = fractions[:, None] * per_group.sum(axis=0)[None, :]
    scale = np.maximum(target, 0.5)  # a class with a tiny target must not divide by zero
    closed = fractions == 0  # test=0: never assign there
    current = np.zeros_like(target)
    order = np.random.default_rng(seed).permutation(len(per_group))
    order = order[np.argsort(-per_group[order].sum(axis=1), kind="stable")]  # largest first, ties in seeded order
    assigned = np.empty(len(per_group), dtype=int)
    for g in order:
        c = per_group[g]
        # Increase of sum((current - target)^2 / target) if group g joins each split.
        cost = ((c * c + 2 * c * (current - target)) / scale).sum(axis=1)
        cost[closed] = np.inf
        s = int(np.argmin(cost))
        current[s] += c
        assigned[g] = s
    _one_group_of_each_class_in_each_split(per_group, assigned, np.flatnonzero(~closed))
    split_of_group = dict(zip(counts.index, np.array(SPLITS)[assigned]))
    return pd.Series(groups.map(split_of_group).to_numpy(), index=table.index, dtype=object)


def _one_group_of_each_class_in_each_split(per_group: np.ndarray, assigned: np.ndarray, opened: np.ndarray) -> None:
    """Move groups (in ``assigned``, in place) so that a class in at least ``len(opened)`` groups has a group
    in each ``opened`` split, as ``three_way`` promises for images.

    The greedy assignment can leave a rare class's few groups all in train. A split without the class takes,
    from the split where it has most groups (2 or more), its smallest group whose move leaves no class of
    that split without a group there. Where no group can move so, the class stays missing there, and
    ``assign_splits`` warns.
    """
    has = per_group > 0  # (groups, classes)
    for k in np.flatnonzero(has.sum(axis=0) >= len(opened)):
        for empty in opened:
            in_split = np.stack([has[assigned == s].sum(axis=0) for s in range(len(SPLITS))])  # (splits, classes)
            if in_split[empty, k] > 0:
                continue
            donor = int(np.argmax(np.where(np.isin(np.arange(len(SPLITS)), opened), in_split[:, k], -1)))
            movable = [g for g in np.flatnonzero((assigned == donor) & has[:, k])
                       if not ((in_split[donor] - has[g]) == 0)[in_split[donor] > 0].any()]
            if movable:
                assigned[min(movable, key=lambda g: per_group[g].sum())] = empty


# ``grouped``'s ``by`` names -> the image-table column that holds each image's key.
GROUP_BY = {"group": "group", "near_duplicates": CLUSTER_COLUMN}


def group_by(by) -> list[str]:
    """``grouped``'s ``by`` option as a list of names; anything else is a ``DatasetError`` naming the valid ones."""
    names = [by] if isinstance(by, str) else by
    if not isinstance(names, (list, tuple)) or not names or len(set(map(str, names))) != len(names):
        raise DatasetError(f"split option by={by!r}: use one of {sorted(GROUP_BY)} or a list of them, "
                           "e.g. by=['group', 'near_duplicates']")
    for name in names:
        if name not in GROUP_BY:
            from trainables.checks import unknown_name_message

            raise DatasetError("split option by: " + unknown_name_message("grouping", name, GROUP_BY))
    return list(names)


def _check_fractions(val: float, test: float) -> None:
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions must satisfy 0 < val, 0 <= test, val + test < 1; got val={val}, test={test}")


def _group_keys(table: pd.DataFrame, by: list[str]) -> pd.Series:
    """One key per row: rows sharing a value of any column in ``by`` share a key (connected components);
    a row with no value in any of them gets a key of its own."""
    columns = [_group_column(table, name) for name in by]
    if len(columns) == 1:
        missing = columns[0].isna()
        keys = columns[0].astype(str)
        keys[missing] = [f"\0row {i}" for i in table.index[missing]]  # "\0": cannot clash with a real id
        return keys
    # Link each row to one node per value it has; rows reachable from each other form one group.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, rows, nodes, offset = len(table), [], [], len(table)
    for column in columns:
        present = column.notna().to_numpy()
        codes, _ = pd.factorize(column[present].astype(str))
        rows.append(np.flatnonzero(present))
        nodes.append(codes + offset)
        offset += int(codes.max()) + 1 if len(codes) else 0
    rows, nodes = np.concatenate(rows), np.concatenate(nodes)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, nodes)), shape=(offset, offset))
    component = connected_components(graph, directed=False)[1][:n]
    return pd.Series([f"component {c}" for c in component], index=table.index)


def _group_column(table: pd.DataFrame, name: str) -> pd.Series:
    column = GROUP_BY[name]
    if name == "near_duplicates" and column not in table.columns:
        raise DatasetError(
            f"split protocol 'grouped' with by='near_duplicates' needs each image's near-duplicate cluster "
            f"(column {column!r}), which search.prepare adds when the study's near-duplicate audit is on; "
            "turn it on (Dataset(near_duplicates=True)), or add the column from "
            "trainables.near_duplicates.find_near_duplicates(table).clusters"
        )
    if column not in table.columns or table[column].isna().all():
        raise DatasetError(
            "split protocol 'grouped' needs a group per image (patient or lesion id), but this table has none. "
            "Use a loader that provides groups (ham10000 groups by lesion_id), group by near-duplicate clusters "
            "instead (split_options={'by': 'near_duplicates'}), or an image-level protocol such as 'stratified'. "
            f"Protocols: {', '.join(list_protocols())}"
        )
    return table[column]


# --- Cross-validation folds (Study(cv_folds=k)) ----------------------------------------------------------------


def assign_folds(table: pd.DataFrame, split: pd.Series, k: int, *, seed: int, grouped_by: list[str] | None = None,
                 ) -> pd.Series:
    """Fold 0..k-1 of every train and val row, ``<NA>`` elsewhere (test, unused): cross-validation on train ∪ val.

    Stratified by label (``StratifiedKFold``), or, when the split protocol is grouped (``grouped_by``, its
    ``by`` names), by whole groups as well (``StratifiedGroupKFold``: every group in one fold, so a lesion
    or a near-duplicate cluster is never on both sides of a fold). Shuffled with ``seed``; the test split is
    never touched. Too few images of a class (or too few groups) for ``k`` folds is a ``DatasetError``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    pool = split.isin(["train", "val"]).to_numpy()
    labels = table["label"][pool].astype(str).to_numpy()
    counts = pd.Series(labels).value_counts()
    if counts.min() < k:
        raise DatasetError(f"cv_folds={k}: class {counts.idxmin()!r} has only {int(counts.min())} image(s) in "
                           f"train ∪ val, too few for {k} stratified folds; use cv_folds <= {int(counts.min())}")
    folds = np.full(len(labels), -1)
    if grouped_by:
        groups = _group_keys(table[pool], grouped_by).to_numpy()
        n_groups = len(set(groups))
        if n_groups < k:
            raise DatasetError(f"cv_folds={k}: train ∪ val holds only {n_groups} group(s), too few for {k} "
                               f"grouped folds; use cv_folds <= {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels, groups)
    else:
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for fold, (_, held_out) in enumerate(parts):
        folds[held_out] = fold
    out = pd.Series(pd.NA, index=table.index, dtype="Int64", name="fold")
    out[pool] = folds
    return out
