"""Cheap first (search.cheap_first): the study's first trials are head-only configurations of its own space."""

import pytest

from search import Dataset, Study
from search.cheap_first import CHEAP_FIRST_MAX, cheap_first_count, cheap_first_points, is_head_only
from search.study import StudyError

DATA = Dataset(loader="embedded", image_size=32, near_duplicates=False)


def mixed_space(trial):
    """Frozen, cut and wholly fine-tuned lite0, augmented or not, and a CNN from scratch."""
    backbone = trial.suggest_categorical("backbone", ["efficientnet_lite0", "cnn_s3"])
    out = {"backbone": backbone, "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}
    if backbone == "efficientnet_lite0":
        out.update(weights="imagenet", unfreeze=trial.suggest_categorical("unfreeze", [0, 21, "all"]))
    else:
        out.update(weights=None, unfreeze="all")
    out["augment"] = trial.suggest_categorical("augment", ["none", "light"])
    return out


def study(**fields) -> Study:
    return Study(name="cheap", dataset=DATA, space=fields.pop("space", mixed_space), num_samples=40, **fields)


def test_the_points_are_distinct_head_only_configurations_of_the_space():
    s = study()
    points = cheap_first_points(s)
    assert len(points) == cheap_first_count(s) == CHEAP_FIRST_MAX  # auto: 40 // 4, at most 10
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    for p in points:  # frozen lite0 without augmentation: the only head-only part (no augmented view bank)
        assert p["backbone"] == "efficientnet_lite0" and p["unfreeze"] == 0 and p["augment"] == "none", p
        assert 1e-4 <= p["learning_rate"] <= 1e-2
    assert cheap_first_points(s) == points  # seeded by the study: a resume or a re-run draws the same


def test_an_augmented_view_bank_makes_augmented_heads_cheap_too():
    points = cheap_first_points(study(augment_views=2, cheap_first=8))
    assert {p["augment"] for p in points} == {"none", "light"} and all(p["unfreeze"] == 0 for p in points)


def test_nothing_is_cheap_without_the_cache_or_without_a_frozen_pretrained_branch():
    assert cheap_first_points(study(activation_cache=False)) == []
    assert cheap_first_count(study(activation_cache=False)) == 0
    cnn_only = lambda trial: {"backbone": "cnn_s3", "learning_rate": trial.suggest_float("lr", 1e-3, 1e-2)}  # noqa: E731
    assert cheap_first_points(study(space=cnn_only)) == []
    assert cheap_first_points(study(cheap_first=0)) == []


@pytest.mark.parametrize("hparams, head_only", [
    ({"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0}, True),
    ({"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 21}, False),  # fine-tunes a top
    ({"backbone": "efficientnet_lite0", "weights": None, "unfreeze": 0}, False),  # random weights: nothing to cache
    ({"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "light"}, False),
])
def test_is_head_only(hparams, head_only):
    assert is_head_only(hparams) is head_only


@pytest.mark.parametrize("bad", [-1, "many", 2.5, True])
def test_a_bad_cheap_first_is_named(bad):
    with pytest.raises(StudyError, match=r"cheap_first.*use 'auto', 0 \(off\)"):
        study(cheap_first=bad)
