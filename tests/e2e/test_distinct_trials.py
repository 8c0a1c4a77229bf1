"""End to end with real Ray, Optuna and TensorFlow: no two trials of a study train the same configuration, and a
study whose space has fewer configurations than trials ends cleanly once each has run (search.distinct)."""

import json

import pandas as pd
import pytest

from search.run import main
from trainables.hparams import HPARAM_NAMES

pytestmark = pytest.mark.e2e

NUM_SAMPLES = 8  # more trials than the six configurations below


def test_every_configuration_once_then_the_study_ends(tmp_path, capsys):
    from fixtures.studies import TINY_STUDY  # noqa: PLC0415

    # The tiny study with its continuous values made two-valued: 2 (cnn_s3) + 2 x 2 (cnn_s2) = 6 configurations.
    body = (TINY_STUDY.replace("NUM_SAMPLES", str(NUM_SAMPLES)).replace("MAX_EPOCHS", "1")
            .replace('trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)',
                     'trial.suggest_categorical("learning_rate", [1e-3, 1e-2])')
            .replace('trial.suggest_float("dropout_s2", 0.1, 0.3)', 'trial.suggest_categorical("dropout_s2", [0.1, 0.3])'))
    assert body.count("suggest_categorical") == 3
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n" + body)
    code = main([str(study), "--storage", str(tmp_path / "runs"), "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    folder = tmp_path / "runs" / "tiny"
    assert json.loads((folder / "study.json").read_text())["outcome"] == "completed"
    assert "every one of the space's 6 configurations has run or is running, so the study ends with them" in out

    board = pd.read_parquet(folder / "leaderboard.parquet")
    trained = board[[c for c in HPARAM_NAMES if c in board.columns]].astype(str)
    assert len(board) == 6 and not trained.duplicated().any(), trained
    assert set(board["status"]) <= {"finished", "stopped"}
