"""End to end with real Ray, Optuna and TensorFlow: a tiny study writes its results folder."""

import json
from pathlib import Path

import pandas as pd
import pytest

from search.run import main

pytestmark = pytest.mark.e2e

LEADERBOARD_COLUMNS = {
    "trial_id", "trial_number", "trial_name", "status", "error", "backbone", "learning_rate", "epochs", "best_epoch",
    "wall_time_s", "trainable_params", "total_params", "checkpoint_path",
    "best_val_balanced_accuracy", "last_val_balanced_accuracy", "best_val_macro_f1", "best_val_auc",
    "best_val_recall_malignant", "best_val_accuracy", "best_val_loss",
}
EPOCH_COLUMNS = {
    "trial_id", "trial_number", "epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy",
    "val_macro_f1", "val_auc", "val_recall_benign", "val_recall_malignant", "elapsed_s",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run the tiny study once; several tests read its folder."""
    folder = tmp_path_factory.mktemp("e2e")
    study = folder / "tiny.py"
    log = folder / "space_calls.jsonl"
    from fixtures.studies import TINY_STUDY  # noqa: PLC0415

    # The space logs every call, so the test can see who proposed each trial's values.
    body = TINY_STUDY.replace("NUM_SAMPLES", "4").replace("MAX_EPOCHS", "2").replace(
        "    return out\n",
        "    import json\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'number': trial.number, 'type': type(getattr(trial, 'ot_trial', trial)).__module__,"
        " **out}) + '\\n')\n"
        "    return out\n",
    )
    study.write_text("from search import Dataset, Study\n" + body)
    storage = folder / "runs"
    code = main([str(study), "--storage", str(storage), "--seed", "3"])
    return code, storage / "tiny", log


def test_run_succeeds_and_writes_the_study_folder(finished_run):
    code, folder, _ = finished_run
    assert code == 0
    for name in ("leaderboard.parquet", "epochs.parquet", "splits.parquet", "study.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "study.json").read_text())
    assert record["outcome"] == "completed" and record["finished_at"] > record["started_at"]


def test_leaderboard_has_one_row_per_trial_with_documented_columns(finished_run):
    _, folder, _ = finished_run
    board = pd.read_parquet(folder / "leaderboard.parquet")
    assert len(board) == 4 and board["trial_id"].is_unique
    assert LEADERBOARD_COLUMNS <= set(board.columns), LEADERBOARD_COLUMNS - set(board.columns)
    assert set(board["status"]) <= {"finished", "stopped"}
    assert board["epochs"].between(1, 2).all()
    assert board["best_val_balanced_accuracy"].between(0, 1).all()
    assert board["learning_rate"].dtype.kind == "f" and board["epochs"].dtype.kind == "i"
    # Sorted best first, and every trial's checkpoint, recorded relative to the folder, holds a model.
    assert board["best_val_balanced_accuracy"].is_monotonic_decreasing
    for path in board["checkpoint_path"]:
        assert not Path(path).is_absolute() and (folder / path / "model.keras").is_file()
    # Where each trial's time went adds up to no more than its wall time.
    parts = board["setup_s"] + board["train_s"] + board["checkpoint_s"]
    assert (board["setup_s"] > 0).all() and (parts <= board["wall_time_s"] + 1e-6).all()


def test_epochs_file_has_every_epoch_of_every_trial(finished_run):
    _, folder, _ = finished_run
    board = pd.read_parquet(folder / "leaderboard.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert EPOCH_COLUMNS <= set(epochs.columns), EPOCH_COLUMNS - set(epochs.columns)
    assert len(epochs) == board["epochs"].sum()
    per_trial = epochs.groupby("trial_id")["epoch"].apply(list)
    assert all(v == list(range(1, len(v) + 1)) for v in per_trial)


def test_optuna_search_proposed_every_configuration(finished_run):
    _, folder, log = finished_run
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(c["type"].startswith("optuna") for c in calls)  # a real Optuna trial was passed in
    proposed = {c["number"]: c for c in calls}
    board = pd.read_parquet(folder / "leaderboard.parquet")
    for row in board.itertuples():
        call = proposed[row.trial_number]
        assert row.backbone == call["backbone"] and row.learning_rate == pytest.approx(call["learning_rate"])
        assert 1e-3 <= row.learning_rate <= 1e-2
        # The conditional parameter exists exactly for the backbone that defines it.
        assert pd.isna(row.dropout) == (row.backbone != "cnn_s2")
    assert sorted(board["trial_number"]) == list(range(4))


def test_splits_and_study_record(finished_run):
    _, folder, _ = finished_run
    splits = pd.read_parquet(folder / "splits.parquet")
    assert set(splits["split"]) == {"train", "val", "test"} and len(splits) == 60
    assert splits.groupby("split")["label"].nunique().eq(2).all()
    record = json.loads((folder / "study.json").read_text())
    assert record["study"]["seed"] == 3 and len(record["study_file_sha256"]) == 64
    assert record["versions"]["ray"] and record["versions"]["optuna"]


def test_starting_again_in_the_same_named_folder_without_resume_is_refused(finished_run, capsys):
    _, folder, _ = finished_run
    study = folder.parent.parent / "tiny.py"
    assert main([str(study), "--storage", str(folder.parent), "--name", "tiny"]) == 2
    assert "add --resume" in capsys.readouterr().err


def test_failing_trials_do_not_sink_the_study(tmp_path, capsys):
    """A trial that raises is recorded as errored with its first line; the others run; all-failed exits 1."""
    body = '''from search import Dataset, Study

def space(trial):
    backbone = trial.suggest_categorical("backbone", ["cnn_s3", "efficientnet_lite0"])
    # efficientnet_lite0 needs 32 px or more: at 16 px its trials raise inside Ray. The learning rate varies so
    # that the space has more than two configurations: a study never trains one twice (search.distinct).
    return {"backbone": backbone, "weights": "imagenet" if backbone != "cnn_s3" else None,
            "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}

STUDY = Study(name="NAME", dataset=Dataset(image_size=16, options={"n_per_class": 20, "image_size": 32}),
              space=SPACE, num_samples=4, max_epochs=2, max_concurrent=2, max_failures=0, fixed={"batch_size": 8})
'''
    mixed = tmp_path / "mixed.py"
    mixed.write_text(body.replace("NAME", "mixed").replace("SPACE", "space"))
    code = main([str(mixed), "--storage", str(tmp_path / "runs"), "--seed", "0"])
    board = pd.read_parquet(tmp_path / "runs" / "mixed" / "leaderboard.parquet")
    assert len(board) == 4 and set(board["backbone"]) == {"cnn_s3", "efficientnet_lite0"}
    for backbone, status, error in zip(board["backbone"], board["status"], board["error"]):
        if backbone == "efficientnet_lite0":
            assert status == "errored" and "needs images of at least 32 px" in error
        else:
            assert status in ("finished", "stopped") and pd.isna(error)
    assert code == 0

    broken = tmp_path / "broken.py"
    broken.write_text(body.replace("NAME", "broken").replace("SPACE", "lambda trial: {'backbone': 'efficientnet_lite0',"
                                                                      " 'weights': 'imagenet', 'learning_rate':"
                                                                      " trial.suggest_float('learning_rate', 1e-3, 1e-2)}"))
    capsys.readouterr()
    assert main([str(broken), "--storage", str(tmp_path / "runs"), "--num-samples", "2"]) == 1
    err = capsys.readouterr().err
    assert "every trial failed" in err and "2 x " in err and "needs images of at least 32 px" in err
