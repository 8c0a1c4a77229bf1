"""--refit (issue 28.5): the final model's members trained again on train + val, shipped, scored beside the model
before the refit; what validation fitted is kept and said to be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PROBS = ["prob_benign", "prob_malignant"]


@pytest.fixture(scope="module")
def refitted(run_dir, tmp_path_factory):
    from analysis.evaluate import main

    folder = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("refit") / "tiny"))
    assert main([str(folder), "--ensemble", "2", "--refit", "--bootstrap", "100"]) == 0
    return folder


def test_the_final_model_is_the_refit_members_and_the_record_names_the_model_before(refitted):
    record = json.loads((refitted / "final_model.json").read_text())
    before = record["refit"]["before"]
    assert record["refit"]["done"] and before["model"] == "ensemble of top 2"
    assert record["model"] == "ensemble of top 2, refit on train+val"
    assert record["trials"] == [f"{t}+refit" for t in before["trials"]]
    assert record["checkpoints"] == [f"refit/{t}" for t in before["trials"]]
    assert record["refit"]["selection_corrected_describes"] == "the model before the refit"
    splits = pd.read_parquet(refitted / "splits.parquet")
    n_fit = int(splits["split"].isin(["train", "val"]).sum())
    board = pd.read_parquet(refitted / "leaderboard.parquet").set_index("trial_name")
    for trial in before["trials"]:
        saved = json.loads((refitted / "refit" / trial / "trial.json").read_text())
        assert saved["refit"]["n_train"] == n_fit == record["refit"]["n_train"]
        assert saved["epoch"] == int(board.loc[trial, "best_epoch"])  # as many epochs as its checkpoint had


def test_both_models_are_scored_on_test_and_the_refit_one_is_another_model(refitted):
    evaluation = json.loads((refitted / "test_evaluation.json").read_text())["evaluations"][-1]
    labels = [m["label"] for m in evaluation["final"]["models"]]
    assert "ensemble of top 2" in labels and "ensemble of top 2, refit on train+val" in labels
    assert evaluation["final"]["model"] == "ensemble of top 2, refit on train+val"
    table = pd.read_parquet(refitted / "test_predictions.parquet")
    after = table[table["trial"] == "ensemble of top 2, refit on train+val"]
    before = table[table["trial"] == "ensemble of top 2"]
    assert after["final"].all() and not before["final"].any() and len(after) == len(before) > 0
    assert np.abs(after[PROBS].to_numpy() - before[PROBS].to_numpy()).max() > 1e-4  # retrained, not copied
    # what validation fitted is kept: the same temperature and threshold
    assert after["temperature"].iloc[0] == pytest.approx(before["temperature"].iloc[0])
    assert after["threshold"].iloc[0] == pytest.approx(before["threshold"].iloc[0])
    reads = json.loads((refitted / "test_evaluation.json").read_text())["test_split_log"]
    assert any(t.endswith("+refit") for t in reads[-1]["trials"])


def test_predict_serves_the_refit_model(refitted):
    from analysis.results import load_results
    from analysis.splits import read_split

    table = pd.read_parquet(refitted / "test_predictions.parquet")
    final = table[table["final"]].reset_index(drop=True)
    results = load_results(refitted)
    assert results.final_model.label == "ensemble of top 2, refit on train+val"
    got = results.predict(read_split(refitted, "test")["path"].tolist())
    np.testing.assert_allclose(got.probabilities, final[PROBS].to_numpy(), atol=1e-5)
    assert got.labels == final["predicted"].tolist()


def test_the_report_and_card_name_the_refit(refitted):
    from analysis.report import main as report

    assert report([str(refitted)]) == 0
    card = (refitted / "model_card.md").read_text()
    assert "refit on train+val" in card
    assert "It describes the model before its refit on train + val." in card  # the estimate is of the model before


def test_refit_with_the_validation_split_is_refused_by_name(run_dir, capsys):
    from analysis.evaluate import main

    assert main([str(run_dir), "--split", "val", "--refit"]) == 2
    err = capsys.readouterr().err
    assert "--refit" in err and "validation" in err
