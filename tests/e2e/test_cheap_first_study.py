"""End to end: a study's first trials are its cheap ones, then TPE samples the whole space (search.cheap_first)."""

import json

import optuna
import pandas as pd
import pytest

from search.run import main

pytestmark = pytest.mark.e2e

STUDY = """
from search import Dataset, Study

def space(trial):
    backbone = trial.suggest_categorical("backbone", ["efficientnet_lite0", "cnn_s3"])
    out = {"backbone": backbone, "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}
    if backbone == "efficientnet_lite0":
        out.update(weights="imagenet", unfreeze=trial.suggest_categorical("unfreeze", [0, "all"]))
    return out

STUDY = Study(
    name="cheap",
    dataset=Dataset(loader="embedded", image_size=32, positive_class="malignant", near_duplicates=False,
                    options={"n_per_class": 20, "image_size": 40}),
    space=space,
    fixed={"batch_size": 16},
    num_samples=6,
    max_epochs=1,
    cheap_first=3,
    max_concurrent=1,  # one at a time, so the trials run in the order they were proposed
)
"""


def test_the_first_trials_are_head_only_then_the_whole_space(tmp_path, capsys):
    study = tmp_path / "cheap.py"
    study.write_text(STUDY)
    code = main([str(study), "--storage", str(tmp_path / "runs"), "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "Cheap first: the first 3 trials train heads on cached features" in out
    folder = tmp_path / "runs" / "cheap"
    board = pd.read_parquet(folder / "leaderboard.parquet").sort_values("trial_number")
    assert list(board["trial_number"]) == list(range(6))
    # unfreeze reads back 0.0 when the column mixes 0 with the CNN rows' missing values
    head_only = (board["backbone"] == "efficientnet_lite0") & board["unfreeze"].astype(str).isin(["0", "0.0"])
    assert head_only.iloc[:3].all(), board[["trial_number", "backbone", "unfreeze"]]
    assert not head_only.iloc[3:].all(), board[["trial_number", "backbone", "unfreeze"]]  # then anything
    assert len(set(board["learning_rate"].iloc[:3])) == 3  # three different configurations, not one thrice
    assert json.loads((folder / "study.json").read_text())["study"]["cheap_first"] == 3

    # The dashboard's copy holds every trial with its parameters, the queued ones too once they ran.
    trials = optuna.load_study(study_name="cheap", storage=f"sqlite:///{folder / 'optuna.db'}").trials
    assert [t.number for t in trials] == list(range(6))
    for trial, row in zip(trials, board.itertuples()):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.params["backbone"] == row.backbone
        assert trial.params["learning_rate"] == pytest.approx(row.learning_rate)
