"""Warm start (issue 29.2): a finished study's trials that fit a second study seed its searcher, and say so."""

import contextlib
import io
import json

import optuna
import pytest

from search import Dataset, Study, StudyError, run_study
from search.warm_start import warm_trials

pytestmark = pytest.mark.e2e

DATASET = Dataset(loader="embedded", image_size=32, positive_class="malignant",
                  options={"n_per_class": 30, "image_size": 48})
FIXED = {"backbone": "cnn_s2", "batch_size": 16, "pooling": "flatten"}


def wide(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)}


def narrow(trial):  # the first study's trials with a rate above 1e-2 do not fit
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}


def quiet(call):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = call()
    return result, out.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    storage = tmp_path_factory.mktemp("warm")
    study = Study(name="first", dataset=DATASET, space=wide, fixed=FIXED, num_samples=6, max_epochs=2, cheap_first=0)
    results, _ = quiet(lambda: run_study(study, storage=storage, seed=1))
    assert results.outcome == "completed"
    return storage, results.path


def test_the_trials_that_fit_seed_the_second_study_and_the_rest_are_named(first):
    storage, folder = first
    old = optuna.load_study(study_name="first", storage=f"sqlite:///{folder / 'optuna.db'}")
    inside = [t for t in old.trials if t.params["learning_rate"] <= 1e-2]
    outside = [t for t in old.trials if t.params["learning_rate"] > 1e-2]
    assert inside and outside, [t.params for t in old.trials]  # seed 1 draws rates on both sides of 1e-2

    second = Study(name="second", dataset=DATASET, space=narrow, fixed=FIXED, num_samples=2, max_epochs=2,
                   warm_start=str(folder))
    results, output = quiet(lambda: run_study(second, storage=storage, seed=2))
    assert results.outcome == "completed"
    assert f"Warm start: {len(inside)} of {len(old.trials)} trial(s) of {folder} seed the searcher; left out: " \
           f"{len(outside)} outside this space" in output
    db = optuna.load_study(study_name="second", storage=f"sqlite:///{results.path / 'optuna.db'}")
    warm = [t for t in db.trials if t.user_attrs.get("warm_start_from") == "first"]
    assert sorted(t.params["learning_rate"] for t in warm) == sorted(t.params["learning_rate"] for t in inside)
    assert sorted(t.value for t in warm) == pytest.approx(sorted(t.value for t in inside))
    # they were not trained again: the leaderboard has the second study's own 2 trials, numbered after them
    names = sorted(results.leaderboard["trial_name"])
    assert len(names) == 2 and all(int(n.split("_")[1]) >= len(inside) for n in names)
    record = json.loads((results.path / "study.json").read_text())["warm_start"]
    assert record["taken"] == len(inside) and len(sum(record["left_out"].values(), [])) == len(outside)


def test_a_study_that_trains_otherwise_or_scores_otherwise_is_refused_or_left_out(first):
    _, folder = first
    other_fixed = Study(name="x", dataset=DATASET, space=wide, fixed={**FIXED, "dropout": 0.45}, num_samples=2,
                        max_epochs=2)
    taken = warm_trials(str(folder), other_fixed)
    assert not taken.trials and list(taken.left_out) == ["trained otherwise"]
    assert taken.examples["trained otherwise"] == "dropout 0.2 -> 0.45"
    other_metric = Study(name="y", dataset=DATASET, space=wide, fixed=FIXED, metric="val_auc", num_samples=2)
    with pytest.raises(StudyError, match=r"ranked its trials by metric 'val_balanced_accuracy', this study by 'val_auc'"):
        warm_trials(str(folder), other_metric)
    other_size = Study(name="z", dataset=Dataset(**{**DATASET.__dict__, "image_size": 40}), space=wide, fixed=FIXED)
    with pytest.raises(StudyError, match=r"dataset.image_size 32, this study on 40"):
        warm_trials(str(folder), other_size)
    more_images = Study(name="w", dataset=Dataset(**{**DATASET.__dict__, "options": {"n_per_class": 40, "image_size": 48}}),
                        space=wide, fixed=FIXED)
    with pytest.raises(StudyError, match=r"dataset.options .*'n_per_class': 30.* this study on .*'n_per_class': 40"):
        warm_trials(str(folder), more_images)
    with pytest.raises(StudyError, match="is not a readable results folder"):
        warm_trials(str(folder / "nothing"), other_metric)
