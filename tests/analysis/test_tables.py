"""analysis.tables on a real tiny study (``run_dir``) and on small synthetic folders (no Ray run needed).

Synthetic folders come from ``fixtures.runs.make_run_dir``.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from analysis import efficiency as E
from analysis import tables as T
from fixtures.runs import CLASSES, MIXED, make_run_dir  # noqa: F401

@pytest.fixture
def mixed(tmp_path):
    return T.load_run(make_run_dir(tmp_path))


# ---------------------------------------------------------------- the real tiny study

def test_best_per_backbone_matches_the_leaderboard_and_epochs(run_dir):
    run = T.load_run(run_dir)
    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    table = T.best_per_backbone(run)
    scored = board[board["status"] != "errored"]
    assert sorted(table["backbone"]) == sorted(scored["backbone"].unique())
    for _, row in table.iterrows():
        mine = scored[scored["backbone"] == row["backbone"]]
        assert row["best_val_balanced_accuracy"] == mine["best_val_balanced_accuracy"].max()
        source = board.set_index("trial_name").loc[row["trial_name"]]
        for col in ("best_val_accuracy", "best_val_macro_f1", "best_val_auc", "best_val_recall_malignant",
                    "epochs", "wall_time_s", "trainable_params", "total_params", "best_epoch"):
            assert row[col] == source[col], col
        trial = epochs[epochs["trial_id"] == source["trial_id"]]
        # The study's metric is val_balanced_accuracy (max): the best is the max over the trial's epochs.
        assert row["best_val_balanced_accuracy"] == pytest.approx(trial["val_balanced_accuracy"].max())
        at_best = trial[trial["epoch"] == row["best_epoch"]].iloc[0]
        assert row["best_val_auc"] == pytest.approx(at_best["val_auc"])
        assert row["epochs"] == trial["epoch"].max() == len(trial)
        assert row["wall_time_s"] == pytest.approx(trial["elapsed_s"].max())
        assert row["trials"] == (board["backbone"] == row["backbone"]).sum()


def test_unfreeze_groups_default_when_the_study_does_not_set_it(run_dir):
    run = T.load_run(run_dir)
    table = T.best_per_backbone_unfreeze(run)
    assert "unfreeze" not in run.board.columns  # the tiny study does not search it
    assert set(table["unfreeze"]) == {"default"}
    assert len(table) == len(T.best_per_backbone(run))


def test_asha_budget_on_the_real_study(run_dir):
    run = T.load_run(run_dir)
    budget = E.asha_budget(run)
    board = run.board
    assert budget["trials"] == len(board) == 4 and budget["max_epochs"] == 3
    assert budget["epochs_run"] == len(run.epochs) == board["epochs"].sum()
    assert budget["full_epochs"] == 4 * 3
    stopped = board[board["status"] == "stopped"]
    assert budget["saved_by_asha"] == (3 - stopped["epochs"]).sum()
    assert budget["unused_epochs"] == budget["saved_by_asha"] + budget["lost_to_errors"] + budget["still_running"]


def test_study_summary_of_the_real_study(run_dir):
    run = T.load_run(run_dir)
    assert run.name == "tiny" and run.metric == "val_balanced_accuracy"
    assert not T.run_state(run)["partial"]
    counts = T.split_counts(run)
    assert list(counts["split"][:3]) == ["train", "val", "test"]
    assert set(T.searched_parameters(run)) <= {"backbone", "learning_rate", "dropout"}
    # Ray's OptunaSearch also records the Optuna name (dropout_s2); it only repeats dropout, so it is left out.
    assert "dropout_s2" not in T.searched_parameters(run)


# ---------------------------------------------------------------- synthetic folders

def test_errored_trials_are_counted_but_never_best(mixed):
    table = T.best_per_backbone(mixed)
    assert list(table["backbone"]) == ["mobilenet_v2", "cnn_s3"]
    assert list(table["trial_name"]) == ["trial_004_mobilenet_v2", "trial_000_cnn_s3"]
    assert table["best_val_balanced_accuracy"].tolist() == [0.83, 0.62]
    assert table["trials"].tolist() == [4, 2]  # the errored mobilenet trial counts as a trial
    assert T.status_counts(mixed) == {"finished": 3, "stopped": 2, "running": 0, "interrupted": 0, "errored": 1}
    errored = T.errored_trials(mixed)
    assert errored["trial_name"].tolist() == ["trial_005_mobilenet_v2"]
    assert errored["error"].tolist() == ["ValueError: bad dropout 2"]


def test_backbone_by_unfreeze_in_depth_order(mixed):
    table = T.best_per_backbone_unfreeze(mixed)
    assert table[["backbone", "unfreeze"]].values.tolist() == [["mobilenet_v2", "0"], ["mobilenet_v2", "20"],
                                                              ["cnn_s3", "all"]]
    assert table["best_val_balanced_accuracy"].tolist() == [0.80, 0.83, 0.62]
    assert table["best_val_recall_malignant"].tolist() == pytest.approx([0.82, 0.85, 0.64])


def test_asha_budget_arithmetic(mixed):
    b = E.asha_budget(mixed)
    # epochs run: 4 + 4 + 2 + 1 + 4 + 0 = 15 of 6 trials x 4 epochs = 24
    assert (b["epochs_run"], b["full_epochs"], b["unused_epochs"]) == (15, 24, 9)
    assert b["saved_by_asha"] == (4 - 2) + (4 - 1) == 5
    assert b["lost_to_errors"] == 4 and b["still_running"] == 0
    assert b["saved_fraction"] == pytest.approx(5 / 24)
    # stopped trials at 2 s per epoch: (2 + 3) epochs not run = 10 s saved
    assert b["saved_s_estimate"] == pytest.approx(10.0)
    assert b["stopped_after_epochs"] == {1: 1, 2: 1}
    assert b["compute_s"] == pytest.approx(2.0 * 15)


def test_best_so_far_against_cumulative_compute(mixed):
    curve = E.best_so_far(mixed)
    assert curve.attrs["order"] == "trial_number"  # no Ray trial folders here
    assert curve["trial_number"].tolist() == [0, 1, 2, 3, 4, 5]
    assert curve["cumulative_s"].tolist() == pytest.approx([8, 16, 20, 22, 30, 30])
    assert curve["best_so_far"].tolist() == pytest.approx([0.62, 0.80, 0.80, 0.80, 0.83, 0.83])
    assert curve["new_best"].tolist() == [True, True, False, False, True, False]


def test_completion_order_prefers_ray_result_timestamps(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    for name, stamp in [("trial_000_cnn_s3", 50), ("trial_001_mobilenet_v2", 10), ("trial_004_mobilenet_v2", 20)]:
        (run.path / name).mkdir()
        (run.path / name / "result.json").write_text(json.dumps({"timestamp": 1}) + "\n" + json.dumps({"timestamp": stamp}) + "\n")
    order = E.completion_order(run)
    assert order.attrs["order"].startswith("completion")
    assert order["trial_number"].tolist()[:3] == [1, 4, 0]  # timed trials first, by end time; the rest by number


def test_minimise_mode(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5, 0.7]), (1, "cnn_s3", "all", 2e-3, None, "finished", [0.6, 0.65])]
    run = T.load_run(make_run_dir(tmp_path, trials, metric="val_loss", mode="min", max_epochs=2))
    table = T.best_per_backbone(run)
    assert table["trial_name"].tolist() == ["trial_000_cnn_s3"] and table["best_val_loss"].iloc[0] == pytest.approx(0.3)
    assert E.best_so_far(run)["best_so_far"].tolist() == pytest.approx([0.3, 0.3])


def test_a_study_still_running_is_partial(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5, 0.6]), (1, "cnn_s3", "all", 2e-3, None, "running", [0.55])]
    run = T.load_run(make_run_dir(tmp_path, trials, max_epochs=2, num_samples=5, extra_epochs=[("t0009", 9, [0.4])]))
    assert len(run.board) == 3  # t0009 has epochs but no leaderboard row yet: it shows as running
    state = T.run_state(run)
    assert state["partial"]
    assert any("2 trial(s) still running" in r for r in state["reasons"])
    assert any("3 of 5 trials" in r for r in state["reasons"])
    b = E.asha_budget(run)
    assert b["epochs_run"] == 2 + 1 + 1 and b["still_running"] == 2
    assert T.best_per_backbone(run)["trial_name"].tolist() == ["trial_000_cnn_s3"]


def test_a_finish_marker_is_reported(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5])]
    run = T.load_run(make_run_dir(tmp_path, trials, max_epochs=1, finished_at="2025-01-01T01:00:00+00:00"))
    state = T.run_state(run)
    assert not state["partial"] and state["finish_marker"].startswith("2025")


def test_a_single_trial(tmp_path):
    run = T.load_run(make_run_dir(tmp_path, [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5, 0.6])], max_epochs=2))
    assert len(T.best_per_backbone(run)) == 1 and len(T.best_per_backbone_unfreeze(run)) == 1
    assert T.searched_parameters(run) == []
    assert E.asha_budget(run)["saved_by_asha"] == 0


def test_every_trial_errored(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "errored", []), (1, "cnn_s2", "all", 2e-3, None, "errored", [])]
    run = T.load_run(make_run_dir(tmp_path, trials))
    assert T.best_per_backbone(run).empty and T.best_trial(run) is None
    assert E.asha_budget(run)["lost_to_errors"] == 8
    assert E.best_so_far(run)["best_so_far"].isna().all()
    assert len(T.all_trials(run)) == 2


def test_a_folder_without_study_json_is_refused(tmp_path):
    with pytest.raises(T.AnalysisError, match="no study.json"):
        T.load_run(tmp_path)


def test_a_study_with_no_leaderboard_yet(tmp_path):
    folder = make_run_dir(tmp_path, [])
    (folder / "leaderboard.parquet").unlink()
    run = T.load_run(folder)
    assert run.board.empty and T.run_state(run)["partial"]
    assert T.best_per_backbone(run).empty and E.asha_budget(run)["epochs_run"] == 0


def test_optuna_duplicates_of_a_hyperparameter_are_left_out(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    board = run.board.copy()
    board["cnn_learning_rate"] = board["learning_rate"].where(board["backbone"] == "cnn_s3")
    run.board = board
    params = T.searched_parameters(run)
    assert "learning_rate" in params and "cnn_learning_rate" not in params
    assert params == ["backbone", "unfreeze", "learning_rate", "dropout"]


def test_parameter_kinds():
    assert T.parameter_kind(pd.Series([1e-4, 1e-3, 1e-2]), "learning_rate") == "log"
    assert T.parameter_kind(pd.Series([0.1, 0.3, 0.2]), "dropout") == "float"
    assert T.parameter_kind(pd.Series(["0", "20", "all"]), "unfreeze") == "categorical"
    assert T.parameter_kind(pd.Series([0.0, 128.0, math.nan]), "head_units") == "categorical"
    assert T.parameter_kind(pd.Series(range(10)), "warmup") == "int"
    assert T.category_order(["all", "20", "0", None]) == ["0", "20", "all"]


def test_markdown_tables_need_no_tabulate(mixed):
    text = T.to_markdown(T.pretty(T.best_per_backbone(mixed), mixed))
    lines = text.splitlines()
    assert lines[0].startswith("| backbone | trial | status | validation balanced accuracy (best epoch) |")
    assert lines[1].startswith("|---|") and len(lines) == 4
    assert "0.8300" in lines[2] and "90,000" in lines[2]
    assert T.to_markdown(pd.DataFrame({"a": ["x|y"]})).splitlines()[2] == "| x\\|y |"


def test_a_stale_running_study_is_called_out(tmp_path):
    import os
    import time

    trials = [(0, "cnn_s3", "all", 1e-3, None, "running", [0.5])]
    folder = make_run_dir(tmp_path, trials, max_epochs=2)
    old = time.time() - 3 * 3600
    os.utime(folder / "leaderboard.parquet", (old, old))
    state = T.run_state(T.load_run(folder))
    assert state["partial"] and any("driver probably stopped" in r for r in state["reasons"])
