"""Split protocols: the reference studies' sizes (S1-S5), determinism, and the leak-free grouped split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fixtures.datasets import fake_table, shared_dataset
from trainables.datasets import DatasetError
from trainables.near_duplicates import CLUSTER_COLUMN
from trainables.splits import assign_splits, list_protocols, stratified, subsample, three_way

# Tables of the published shapes (fake paths: the splits only read labels, origins and groups).
S1_SHAPE = {
    ("benign", "train"): 6289, ("malignant", "train"): 5590, ("benign", "test"): 1000, ("malignant", "test"): 1000
}
HAM_DX = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
HAM_BINARY = {"benign": 8061, "malignant": 1954}
COVID_SHAPE = {"COVID": 3616, "Normal": 10192, "Viral Pneumonia": 1345}
S4_SHAPE = {"benign": 25, "malignant": 25}


def _sizes(split: pd.Series) -> dict[str, int]:
    return {k: int(v) for k, v in split.value_counts().items()}


def _by_class(table: pd.DataFrame, split: pd.Series, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in table["label"][split == name].value_counts().items()}


def test_protocols_registered():
    assert {"stratified", "S1", "S2", "S3", "S4", "S5", "grouped"} <= set(list_protocols())
    with pytest.raises(ValueError, match="unknown split protocol 's6'"):
        assign_splits(fake_table(S4_SHAPE), "s6", seed=0)


def test_s1_sizes_and_fixed_seed():
    table = fake_table(S1_SHAPE)
    assert len(table) == 13_879
    split = assign_splits(table, "S1", seed=0)
    assert _sizes(split) == {"train": 9_715, "val": 2_081, "test": 2_083}
    # Both origins are pooled: each split draws from the shipped train/ and test/ folders.
    assert pd.crosstab(split, table["origin"]).gt(0).all().all()
    # The study fixed its shuffle at 42, so the study seed does not change the split.
    assert split.equals(assign_splits(table, "S1", seed=7))
    assert not split.equals(assign_splits(table, "S1", seed=0, shuffle_seed=1))


def test_s2_balanced_subsample():
    table = fake_table(HAM_BINARY)
    split = assign_splits(table, "S2", seed=0)
    assert _sizes(split) == {"unused": 8_815, "train": 816, "val": 144, "test": 240}
    assert _by_class(table, split, "test") == {"benign": 120, "malignant": 120}
    assert _by_class(table, split, "val") == {"benign": 72, "malignant": 72}
    assert _by_class(table, split, "train") == {"benign": 408, "malignant": 408}
    assert split.equals(assign_splits(table, "S2", seed=0))
    assert not split.equals(assign_splits(table, "S2", seed=1))


def test_s2_errors():
    with pytest.raises(DatasetError, match=r"needs a binary table .*target='binary'"):
        assign_splits(fake_table(HAM_DX), "S2", seed=0)
    with pytest.raises(DatasetError, match=r"samples 600 images per class, .*fewer: \{'malignant': 599\}"):
        assign_splits(fake_table({"benign": 700, "malignant": 599}), "S2", seed=0)


def test_s3_sizes():
    table = fake_table(COVID_SHAPE)
    split = assign_splits(table, "S3", seed=0)
    assert _sizes(split) == {"unused": 11_121, "train": 2_740, "val": 646, "test": 646}  # 68/16/16, ceil like sklearn
    assert sorted(_by_class(table, split, "test").values()) == [215, 215, 216]
    assert all(n == 1_344 for n in table["label"][split != "unused"].value_counts())
    assert split.equals(assign_splits(table, "S3", seed=5))  # random_state 1987 is the study's
    with pytest.raises(DatasetError, match=r"fewer: \{'Viral Pneumonia': 1000\}"):
        assign_splits(fake_table({**COVID_SHAPE, "Viral Pneumonia": 1000}), "S3", seed=0)


def test_s4_sizes():
    table = fake_table(S4_SHAPE)
    split = assign_splits(table, "S4", seed=0)
    assert _sizes(split) == {"train": 40, "val": 10}
    assert _by_class(table, split, "val") == {"benign": 5, "malignant": 5}
    assert split.equals(assign_splits(table, "S4", seed=0))


def test_s5_sizes():
    table = fake_table(HAM_DX)
    split = assign_splits(table, "S5", seed=0)
    assert _sizes(split) == {"train": 8_012, "val": 2_003}
    val = _by_class(table, split, "val")
    assert all(abs(val[c] - 0.2 * n) <= 1 for c, n in HAM_DX.items())  # stratified
    assert split.equals(assign_splits(table, "S5", seed=0))
    assert not split.equals(assign_splits(table, "S5", seed=1))


def _lesions(i: int) -> str:
    return f"L{i // 3}"  # groups of 3 images


def test_grouped_synthetic():
    groups = {"nv": lambda i: f"nv{i // 4}", "mel": lambda i: f"mel{i // 2}", "df": lambda i: f"df{i}"}
    table = fake_table({"nv": 400, "mel": 120, "df": 40}, groups=groups)
    split = assign_splits(table, "grouped", seed=3)
    assert (table.assign(split=split).groupby("group")["split"].nunique() == 1).all()
    sizes = _sizes(split)
    assert abs(sizes["test"] - 84) <= 4 and abs(sizes["val"] - 84) <= 4
    for name in ("train", "val", "test"):  # stratified as far as groups allow
        counts = _by_class(table, split, name)
        assert {"nv", "mel", "df"} == set(counts)
    assert split.equals(assign_splits(table, "grouped", seed=3))
    assert not split.equals(assign_splits(table, "grouped", seed=4))

    no_test = assign_splits(table, "grouped", seed=3, val=0.2, test=0)
    assert set(no_test) == {"train", "val"}


def test_grouped_needs_groups():
    with pytest.raises(DatasetError, match=r"'grouped' needs a group per image .*ham10000 groups by lesion_id"):
        assign_splits(fake_table(S4_SHAPE), "grouped", seed=0)
    with pytest.raises(ValueError, match="split fractions must satisfy"):
        assign_splits(fake_table(S4_SHAPE, groups={"benign": str}), "grouped", seed=0, val=0.6, test=0.5)


def test_grouped_rows_without_group_are_singletons():
    table = fake_table({"a": 30, "b": 30}, groups={"a": _lesions})  # "b" rows have no group
    split = assign_splits(table, "grouped", seed=0)
    assert (table[table["label"] == "a"].assign(split=split).groupby("group")["split"].nunique() == 1).all()
    assert set(split[table["label"] == "b"]) == {"train", "val", "test"}


def test_grouped_real_ham10000_metadata():
    meta = pd.read_csv(shared_dataset("ham10000") / "HAM10000_metadata.csv")
    table = pd.DataFrame({"path": meta["image_id"], "label": meta["dx"], "group": meta["lesion_id"], "origin": ""})
    split = assign_splits(table, "grouped", seed=0)
    per_lesion = table.assign(split=split).groupby("group")["split"].nunique()
    assert len(per_lesion) == 7_470 and (per_lesion == 1).all()  # no lesion in two splits
    sizes = _sizes(split)
    assert abs(sizes["val"] - 1_502) <= 10 and abs(sizes["test"] - 1_502) <= 10
    shares = pd.crosstab(table["label"], split, normalize="index")
    assert (shares["test"] - 0.15).abs().max() < 0.02  # every class, even df (115) and vasc (142)


def test_existing_helpers_still_work():
    table = fake_table({"a": 60, "b": 40})
    split = stratified(table, seed=0)
    assert _sizes(split) == {"train": 70, "val": 15, "test": 15}
    assert _sizes(three_way(table["label"], val=0.2, test=0, seed=0)) == {"train": 80, "val": 20}
    small = subsample(split, table["label"], per_split=10, seed=0)
    assert _sizes(small) == {"train": 10, "val": 10, "test": 10, "unused": 70}


@pytest.mark.parametrize(
    "protocol, shape, options",
    [
        ("S1", S1_SHAPE, {}),
        ("S2", HAM_BINARY, {}),
        ("S3", COVID_SHAPE, {}),
        ("S4", S4_SHAPE, {}),
        ("S5", HAM_DX, {}),
        ("stratified", HAM_DX, {}),
    ],
)
def test_protocol_contract(protocol, shape, options):
    """Aligned with the table, only known values, no row lost."""
    table = fake_table(shape)
    table.index = table.index + 1000  # a non-default index must be preserved
    split = assign_splits(table, protocol, seed=0, **options)
    assert split.index.equals(table.index)
    assert set(split) <= {"train", "val", "test", "unused"}
    assert split.notna().all()


# --- Classes too small for a protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2])
def test_a_class_too_small_for_a_three_way_split_is_named(count):
    """1 image used to end in a scikit-learn traceback; 2 images left the class out of test without a word."""
    table = fake_table({"common": 60, "rare": count})
    with pytest.raises(DatasetError, match=rf"class 'rare' has {count} image\(s\); split protocol 'stratified' "
                                           r"needs at least 3 per class \(one each for train, val and test\)"):
        assign_splits(table, "stratified", seed=0)


def test_a_class_too_small_for_a_two_way_split_is_named():
    with pytest.raises(DatasetError, match=r"class 'rare' has 1 image\(s\); split protocol 'S4' needs at least 2 "
                                           r"per class \(one each for train and val\)"):
        assign_splits(fake_table({"common": 40, "rare": 1}), "S4", seed=0)
    assert set(assign_splits(fake_table({"common": 40, "rare": 2}), "S4", seed=0)) == {"train", "val"}


def test_too_few_images_for_the_fractions_is_named():
    with pytest.raises(DatasetError, match=r"'stratified' cannot stratify 6 images \{'a': 3, 'b': 3\} into "
                                           r"val=0.15, test=0.15 \(1 val and 1 test images\).*Add images"):
        assign_splits(fake_table({"a": 3, "b": 3}), "stratified", seed=0)


@pytest.mark.parametrize("shape", [{"common": 200, "rare": 3}, {"negative": 997, "positive": 3},
                                   {"a": 500, "b": 300, "c": 4, "d": 3}])
def test_three_images_of_a_class_give_one_to_each_split(shape, capsys):
    """Stratification rounded 0.45 test images of a 3-image class down to none (2 / 1 / 0, with only a
    warning), although the minimum of 3 promises one each for train, val and test."""
    table = fake_table(shape)
    split = assign_splits(table, "stratified", seed=0)
    per_class = pd.crosstab(table["label"], split)
    assert (per_class[["train", "val", "test"]] >= 1).all().all(), per_class
    n = len(table)  # the split sizes are those asked for: the repair swaps images, it does not move them
    assert _sizes(split) == {"test": -(-15 * n // 100), "val": -(-15 * n // 100), "train": n - 2 * -(-15 * n // 100)}
    assert capsys.readouterr().err == ""
    assert split.equals(assign_splits(table, "stratified", seed=0))


def test_three_groups_of_a_class_give_one_to_each_grouped_split(capsys):
    """The greedy grouped split left all 3 groups of a rare class in train and val."""
    table = fake_table({"common": 600, "rare": 6}, groups={"common": lambda i: f"c{i // 3}", "rare": lambda i: f"r{i // 2}"})
    split = assign_splits(table, "grouped", seed=0)
    assert (table.assign(split=split).groupby("group")["split"].nunique() == 1).all()  # still leak-free
    assert set(split[table["label"] == "rare"]) == {"train", "val", "test"}
    assert capsys.readouterr().err == ""


def test_a_class_missing_from_a_split_is_warned(capsys):
    # 2 groups of a class cannot fill 3 splits: grouped says so
    table = fake_table({"common": 200, "rare": 4}, groups={"common": str, "rare": lambda i: f"r{i // 2}"})
    split = assign_splits(table, "grouped", seed=0)
    missing = [s for s in ("train", "val", "test") if s not in set(split[table["label"] == "rare"])]
    assert missing
    err = capsys.readouterr().err
    assert f"warning: split protocol 'grouped': class 'rare' (4 image(s)) has no {' or '.join(missing)} images" in err

    # Protocols that do not stratify warn too: S1 shuffles a 1-image class into one split.
    assign_splits(fake_table({"a": 100, "b": 1}), "S1", seed=0)
    assert "class 'b' (1 image(s)) has no val or test images" in capsys.readouterr().err
    assign_splits(fake_table({"a": 100, "b": 100}), "S1", seed=0)
    assert capsys.readouterr().err == ""


# --- grouped by near-duplicate clusters (issue 16) ----------------------------------------------------------------


def test_grouped_by_near_duplicate_clusters_never_separates_a_cluster():
    table = fake_table({"nv": 400, "mel": 120, "df": 40})  # no lesion ids, as with the melanoma and folder loaders
    table[CLUSTER_COLUMN] = np.random.default_rng(0).integers(0, 150, len(table))  # ~3.7 images a cluster
    for seed in range(3):
        split = assign_splits(table, "grouped", seed=seed, by="near_duplicates")
        assert (table.assign(split=split).groupby(CLUSTER_COLUMN)["split"].nunique() == 1).all()
        sizes = _sizes(split)
        assert abs(sizes["val"] - 84) <= 8 and abs(sizes["test"] - 84) <= 8


def test_grouped_by_lesion_and_near_duplicates_joins_them_transitively():
    table = fake_table({"a": 60, "b": 60}, groups={"a": lambda i: f"La{i // 2}", "b": lambda i: f"Lb{i // 2}"})
    table[CLUSTER_COLUMN] = np.arange(len(table))
    for i in range(1, 19, 2):  # rows 0-1 share a lesion, 1-2 a cluster, 2-3 a lesion, ...: rows 0-19 are one group
        table.loc[i + 1, CLUSTER_COLUMN] = table.loc[i, CLUSTER_COLUMN]
    chain = table.index[:20]
    by_lesion_alone_splits_it = False
    for seed in range(5):
        both = assign_splits(table, "grouped", seed=seed, by=["group", "near_duplicates"])
        assert both[chain].nunique() == 1
        per_lesion = table.assign(split=both).groupby("group")["split"].nunique()
        assert (per_lesion == 1).all()
        by_lesion_alone_splits_it |= assign_splits(table, "grouped", seed=seed)[chain].nunique() > 1
    assert by_lesion_alone_splits_it  # the clusters are what holds the chain together


def test_grouped_by_is_checked():
    table = fake_table(S4_SHAPE, groups={"benign": str, "malignant": str})
    with pytest.raises(DatasetError, match=r"split option by: unknown grouping 'near_duplicate'; "
                                           r"did you mean 'near_duplicates'\?"):
        assign_splits(table, "grouped", seed=0, by="near_duplicate")
    with pytest.raises(DatasetError, match=r"by=\[\]: use one of \['group', 'near_duplicates'\]"):
        assign_splits(table, "grouped", seed=0, by=[])
    with pytest.raises(DatasetError, match=r"needs each image's near-duplicate cluster \(column "
                                           r"'near_duplicate_cluster'\).*Dataset\(near_duplicates=True\)"):
        assign_splits(table, "grouped", seed=0, by="near_duplicates")
