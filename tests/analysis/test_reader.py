"""``analysis.reader``: one reader of a results folder, and one "best trial" that every tool agrees on."""

from __future__ import annotations

import pandas as pd
import pytest

from fixtures.runs import make_run_dir

# Two trials tie on the study's metric (0.80); trial 3 has the lower validation loss at its best epoch,
# and the leaderboard file lists trial 1 first, as a leaderboard sorted by the metric alone would.
TIED = [
    (0, "cnn_s3", "all", 3e-3, None, "finished", [0.55, 0.60]),
    (1, "mobilenet_v2", 0, 1e-4, 0.2, "finished", [0.70, 0.80]),
    (2, "cnn_s3", "all", 8e-3, None, "stopped", [0.51]),
    (3, "mobilenet_v2", 20, 9e-3, 0.1, "finished", [0.72, 0.80]),
]


@pytest.fixture
def tied_run(tmp_path):
    from trainables.checkpoint import MODEL_FILE

    folder = make_run_dir(tmp_path, TIED, max_epochs=2)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    board["best_val_loss"] = board["trial_number"].map({0: 0.7, 1: 0.45, 2: 0.9, 3: 0.30})
    order = board["trial_number"].map({1: 0, 3: 1, 0: 2, 2: 3})
    board = board.iloc[order.argsort()].reset_index(drop=True)
    board["checkpoint_path"] = [f"{name}/checkpoint_000001" for name in board["trial_name"]]
    for path in board["checkpoint_path"]:
        (folder / path).mkdir(parents=True)
        (folder / path / MODEL_FILE).write_bytes(b"not read by these tests")
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    assert board["trial_name"].iloc[0] == "trial_001_mobilenet_v2"  # the file's first row is not the best
    return folder


def test_a_tie_is_broken_the_same_way_by_every_tool(tied_run):
    """predict (choose_trial), evaluate (ranked_trials), the report (tables.best_trial) and load_results
    name the same trial: the tied one with the lower validation loss."""
    from analysis import tables as T
    from analysis.reader import choose_trial, ranked_trials, read_study
    from analysis.results import load_results

    study = read_study(tied_run)
    expected = "trial_003_mobilenet_v2"
    assert choose_trial(tied_run, study, None).name == expected
    ranked, notes = ranked_trials(tied_run, study)
    assert ranked["trial_name"].tolist() == ["trial_003_mobilenet_v2", "trial_001_mobilenet_v2",
                                             "trial_000_cnn_s3", "trial_002_cnn_s3"]
    assert notes == []
    assert T.best_trial(T.load_run(tied_run))["trial_name"] == expected
    assert load_results(tied_run).best_trial.name == expected


def test_the_best_trial_needs_a_checkpoint_everywhere(tied_run):
    """A best-scoring trial whose model was never saved is passed over by every tool, with a note."""
    from analysis import tables as T
    from analysis.reader import choose_trial, ranked_trials, read_study

    board = pd.read_parquet(tied_run / "leaderboard.parquet")
    board.loc[board["trial_name"] == "trial_003_mobilenet_v2", "checkpoint_path"] = None
    board.to_parquet(tied_run / "leaderboard.parquet", index=False)
    study = read_study(tied_run)
    assert choose_trial(tied_run, study, None).name == "trial_001_mobilenet_v2"
    ranked, notes = ranked_trials(tied_run, study)
    assert ranked["trial_name"].iloc[0] == "trial_001_mobilenet_v2"
    assert notes == ["trial_003_mobilenet_v2: no checkpoint (finished); skipped"]
    assert T.best_trial(T.load_run(tied_run))["trial_name"] == "trial_001_mobilenet_v2"


@pytest.mark.parametrize("damage, message", [
    ("study.json", "is unreadable"),
    ("leaderboard.parquet", "is unreadable"),
])
def test_a_damaged_file_is_named(tied_run, damage, message):
    from analysis.reader import ResultsFolderError, choose_trial, read_record

    path = tied_run / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ResultsFolderError, match=message) as info:
        choose_trial(tied_run, read_record(tied_run)["study"], None)
    assert damage in str(info.value)


def test_not_a_results_folder(tmp_path):
    from analysis.reader import ResultsFolderError, read_study

    with pytest.raises(ResultsFolderError, match="does not exist"):
        read_study(tmp_path / "nowhere")
    with pytest.raises(ResultsFolderError, match="has no study.json"):
        read_study(tmp_path)
