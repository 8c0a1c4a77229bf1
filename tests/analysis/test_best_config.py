"""``load_results(run).best_trial.config``: the hyperparameters a trial trained with, with their own types,
fit to feed back into ``Study(fixed=...)``. A synthetic folder; the real round trip is tests/e2e/test_dashboards.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fixtures.runs import make_run_dir

# What each trial trained with, as trainables.train writes it into trial.json beside the checkpoint.
TRAINED = {
    0: {"backbone": "cnn_s3", "unfreeze": "all", "learning_rate": 3e-3, "batch_size": 16},
    1: {"backbone": "mobilenet_v2", "unfreeze": 0, "learning_rate": 1e-4, "dropout": 0.2, "batch_size": 16},
    2: {"backbone": "mobilenet_v2", "unfreeze": 20, "learning_rate": 2e-3, "dropout": 0.4, "batch_size": 16},
    3: {"backbone": "cnn_s3", "unfreeze": "all", "learning_rate": 8e-3, "batch_size": 16},
    4: {"backbone": "mobilenet_v2", "unfreeze": 20, "learning_rate": 9e-3, "dropout": 0.1, "batch_size": 16,
        "head_units": 128},
}


@pytest.fixture
def run(tmp_path):
    """make_run_dir's MIXED study (trial 4 is the best), each trial with a checkpoint and its trial.json.

    Its leaderboard holds what a real one does: ``unfreeze`` mixes ints and "all" (a string column),
    ``head_units`` is set for one trial only (a float column), and Optuna's own parameter names
    (``cnn_learning_rate``) that Ray's OptunaSearch adds to a trial's config sit beside the hyperparameters.
    """
    from trainables.checkpoint import MODEL_FILE
    from trainables.hparams import DEFAULTS

    folder = make_run_dir(tmp_path)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    board["head_units"] = board["trial_number"].map({4: 128})
    board["cnn_learning_rate"] = board["trial_number"].map({0: 3e-3, 3: 8e-3})
    board["adjusted"] = None
    board["checkpoint_path"] = [None if status == "errored" else f"{name}/checkpoint_000001"
                                for name, status in zip(board["trial_name"], board["status"])]
    for number, path in zip(board["trial_number"], board["checkpoint_path"]):
        if not isinstance(path, str):
            continue
        (folder / path).mkdir(parents=True)
        (folder / path / MODEL_FILE).write_bytes(b"not read by these tests")
        hparams = {**DEFAULTS, **TRAINED[number], "trial_number": int(number)}
        (folder / path / "trial.json").write_text(json.dumps({"epoch": 1, "hparams": hparams}))
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    stored = pd.read_parquet(folder / "leaderboard.parquet")
    assert stored["unfreeze"].dtype == "string" and stored["head_units"].dtype == "float64"  # what Parquet keeps
    return folder


def test_the_config_has_the_types_the_trial_trained_with(run):
    from analysis.results import load_results

    results = load_results(run)
    best = results.best_trial
    assert best.name == "trial_004_mobilenet_v2"
    assert best.config == TRAINED[4]  # no trial_number, no Optuna parameter names, nothing adjusted
    assert [type(best.config[k]) for k in ("unfreeze", "head_units", "batch_size")] == [int, int, int]
    assert results.trial("trial_000_cnn_s3").config == TRAINED[0]  # "all" stays a string


def test_the_best_config_feeds_back_into_a_study(run):
    from analysis.results import load_results
    from search import Study

    config = load_results(run).best_trial.config
    study = Study(name="again", space=lambda trial: {}, fixed=config)
    assert study.fixed == TRAINED[4]


def test_without_trial_json_the_leaderboard_values_are_mended(run):
    """A checkpoint without a readable trial.json: the row's values, whole numbers as ints again."""
    from analysis.results import load_results

    best = run / "trial_004_mobilenet_v2" / "checkpoint_000001" / "trial.json"
    best.write_text("{not json")
    assert load_results(run).best_trial.config == TRAINED[4]
    best.unlink()
    assert load_results(run).best_trial.config == TRAINED[4]
