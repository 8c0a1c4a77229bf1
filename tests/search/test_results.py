"""Leaderboard summaries, status, dtypes and atomic writes (no Ray needed)."""

import pandas as pd
import pytest

from search.results import _summarise, first_error_line, tidy_dtypes
from search.storage import write_parquet


def test_best_values_come_from_the_best_epoch():
    epochs = pd.DataFrame(
        {"epoch": [1, 2, 3], "val_balanced_accuracy": [0.6, 0.8, 0.7], "val_loss": [0.9, 0.5, 0.4], "elapsed_s": [1, 2, 3.5]}
    )
    out = _summarise(epochs, "val_balanced_accuracy", "max")
    assert out["best_epoch"] == 2 and out["epochs"] == 3
    assert out["best_val_balanced_accuracy"] == 0.8 and out["last_val_balanced_accuracy"] == 0.7
    assert out["best_val_loss"] == 0.5  # at the best epoch, not the lowest loss
    assert out["wall_time_s"] == 3.5


def test_min_mode_picks_the_lowest():
    epochs = pd.DataFrame({"epoch": [1, 2], "val_loss": [0.9, 0.5]})
    assert _summarise(epochs, "val_loss", "min")["best_epoch"] == 2


def test_mixed_hyperparameter_columns_become_strings():
    frame = tidy_dtypes(pd.DataFrame({"unfreeze": [0, "all", 30], "class_weight": [True, False, None], "lr": [0.1, 1, None],
                                      "weights": [None, "imagenet", None]}))
    assert frame["unfreeze"].tolist() == ["0", "all", "30"]
    assert str(frame["class_weight"].dtype) == "boolean"
    assert frame["lr"].dtype.kind == "f"
    assert pd.api.types.is_string_dtype(frame["weights"]) and frame["weights"].isna().sum() == 2


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = write_parquet(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.parquet")
    write_parquet(pd.DataFrame({"a": [3]}), path)
    assert pd.read_parquet(path)["a"].tolist() == [3]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Traceback...\n  File x\nray.exceptions.RayTaskError(ValueError): boom\nValueError: bad dropout 2\n", "ValueError: bad dropout 2"),
        ("Failure # 1\nsomething odd\n", "something odd"),
        (None, "unknown error"),
    ],
)
def test_first_error_line(text, expected):
    assert first_error_line(text) == expected


# --------------------------------------------------------------------------
# where a checkpoint is recorded: relative to the results folder
# --------------------------------------------------------------------------


def test_a_checkpoint_is_recorded_relative_to_the_results_folder(tmp_path):
    from search.storage import OutsideFolderError, StudyFolder

    folder = StudyFolder(tmp_path / "runs", "tiny")
    ray_path = f"{tmp_path.resolve()}/runs/tiny/trial_000_cnn_s3/checkpoint_000002"  # as Ray's Checkpoint.path gives it
    assert folder.relative(ray_path) == "trial_000_cnn_s3/checkpoint_000002"
    assert folder.resolve("trial_000_cnn_s3/checkpoint_000002") == ray_path
    with pytest.raises(OutsideFolderError, match="tiny2/trial_000.* is not inside the results folder"):
        folder.relative(f"{tmp_path.resolve()}/runs/tiny2/trial_000/checkpoint_000002")


def test_a_bucket_folder_records_and_resolves_under_its_own_uri():
    from search.storage import OutsideFolderError, StudyFolder

    folder = StudyFolder("mock:///bucket/runs", "tiny")  # pyarrow's in-memory filesystem, named by a URI like s3://
    assert folder.relative("bucket/runs/tiny/trial_001_cnn_s2/checkpoint_000001") == "trial_001_cnn_s2/checkpoint_000001"
    assert folder.resolve("trial_001_cnn_s2/checkpoint_000001") == "bucket/runs/tiny/trial_001_cnn_s2/checkpoint_000001"
    # An earlier version's URI, from another bucket: re-rooted into this folder, never read where it points.
    assert folder.resolve("s3://old-bucket/x/tiny/trial_001_cnn_s2/checkpoint_000001") \
        == "bucket/runs/tiny/trial_001_cnn_s2/checkpoint_000001"
    for escape in ("../other/trial_001/checkpoint_000001", "s3://old-bucket/x/other/trial_001/checkpoint_000001"):
        with pytest.raises(OutsideFolderError, match="mock://bucket/runs/tiny"):
            folder.resolve(escape)


@pytest.mark.parametrize("name", ["../../pwned", "a/b", "..", ".", "", "a\\b", "x\x00"])
def test_a_file_name_that_would_leave_its_folder_is_refused(name):
    from search.storage import OutsideFolderError, file_name

    with pytest.raises(OutsideFolderError, match="trial_name"):
        file_name(name, "trial_name")
    assert file_name("trial_003_mobilenet_v2", "trial_name") == "trial_003_mobilenet_v2"


# --------------------------------------------------------------------------
# what the leaderboard records is what ran
# --------------------------------------------------------------------------


@pytest.mark.parametrize("config, max_epochs, random_init, expected, note", [
    ({"backbone": "cnn_s3", "weights": None, "warmup_epochs": 2}, 5, (), {"warmup_epochs": 0}, "warmup_epochs 2 -> 0"),
    ({"backbone": "mobilenet_v2", "weights": "imagenet", "warmup_epochs": 3, "unfreeze": 30}, 3, (),
     {"unfreeze": 0, "warmup_epochs": 3}, "unfreeze 30 -> 0"),
    ({"backbone": "mobilenet_v2", "weights": "imagenet", "warmup_epochs": 2, "unfreeze": 30}, 2, ("mobilenet_v2",),
     {"weights": None, "warmup_epochs": 0, "unfreeze": 30}, "weights 'imagenet' -> None"),
    ({"backbone": "mobilenet_v2", "weights": "imagenet", "warmup_epochs": 2, "unfreeze": 30}, 5, (),
     {"weights": "imagenet", "warmup_epochs": 2, "unfreeze": 30}, None),
])
def test_the_leaderboard_records_the_hyperparameters_that_ran(tmp_path, config, max_epochs, random_init, expected, note):
    from ray.tune.experiment import Trial

    from search.results import LeaderboardWriter
    from search.storage import StudyFolder
    from trainables.hparams import effective_hparams

    hp, notes = effective_hparams(config, max_epochs, random_init)
    assert {k: hp[k] for k in expected} == expected
    assert (note is None and notes == []) or (note is not None and any(n.startswith(note) for n in notes))

    writer = LeaderboardWriter(StudyFolder(str(tmp_path), "s"), metric="val_loss", mode="min",
                               max_epochs=max_epochs, random_init=random_init)
    trial = Trial("__fake", config=config, stub=True)
    writer.on_trial_start(0, [trial], trial)
    row = pd.read_parquet(tmp_path / "s" / "leaderboard.parquet").iloc[0]
    for key, value in expected.items():
        assert (pd.isna(row[key]) if value is None else str(row[key]) == str(value)), (key, row[key])
    assert (pd.isna(row["adjusted"]) if note is None else note in row["adjusted"])


def test_ties_are_broken_by_validation_loss_in_the_leaderboard_as_everywhere(tmp_path):
    """Two trials with the same best accuracy: the one with the lower loss at that epoch is ranked first."""
    from ray.tune.experiment import Trial

    from search.ranking import rank
    from search.results import LeaderboardWriter
    from search.storage import StudyFolder

    writer = LeaderboardWriter(StudyFolder(str(tmp_path), "s"), metric="val_accuracy", mode="max", max_epochs=1)
    first, second = (Trial("__fake", config={"backbone": "cnn_s3", "trial_number": n}, stub=True) for n in range(2))
    for trial, loss in ((first, 0.9), (second, 0.4)):  # the first row seen has the higher loss
        writer.on_trial_start(0, [first, second], trial)
        writer.on_trial_result(0, [first, second], trial, {"epoch": 1, "val_accuracy": 0.75, "val_loss": loss})
    board = writer.leaderboard()
    assert board["trial_id"].tolist() == [second.trial_id, first.trial_id]
    assert rank(board, "best_val_accuracy", "max")["trial_id"].iloc[0] == board["trial_id"].iloc[0]


def test_a_retried_attempt_survives_a_killed_driver_and_a_lost_twin(tmp_path):
    """A trial Ray retried, then a driver killed before Ray saved its state: the resumed search proposes the
    trial again under a new id, whose row replaces the old one; the failed attempt is still counted, and rows
    read back from the Parquet file (failures NaN there) do not stop the driver (it did: int(NaN))."""
    from ray.tune.experiment import Trial

    from search.results import LeaderboardWriter
    from search.storage import StudyFolder

    config = {"backbone": "cnn_s3", "trial_number": 1}
    first = LeaderboardWriter(StudyFolder(str(tmp_path), "s"), metric="val_accuracy", mode="max", max_epochs=2)
    never_retried = Trial("__fake", config={"backbone": "cnn_s3", "trial_number": 0}, stub=True)
    retried = Trial("__fake", config=config, stub=True)
    for trial in (never_retried, retried):
        first.on_trial_start(0, [never_retried, retried], trial)
    first.on_trial_recover(0, [retried], retried)  # the worker died; Ray retries it
    assert pd.read_parquet(tmp_path / "s" / "leaderboard.parquet").set_index("trial_id").loc[
        retried.trial_id, "failures"] == 1  # recorded at once: the driver may die before the trial ends
    # the driver dies; the resumed driver reads the rows back and Ray proposes trial 1 under a new id
    resumed = LeaderboardWriter(StudyFolder(str(tmp_path), "s"), metric="val_accuracy", mode="max", max_epochs=2)
    twin = Trial("__fake", config=config, stub=True)
    twin_of_0 = Trial("__fake", config={"backbone": "cnn_s3", "trial_number": 0}, stub=True)
    resumed.on_trial_start(0, [twin_of_0], twin_of_0)  # its lost row holds failures NaN, as read back
    resumed.on_trial_start(0, [twin], twin)
    resumed.on_trial_result(0, [twin], twin, {"epoch": 1, "val_accuracy": 0.7})
    resumed.on_trial_result(0, [twin], twin, {"epoch": 2, "val_accuracy": 0.8})
    resumed.on_trial_complete(0, [twin], twin)
    board = resumed.leaderboard().set_index("trial_number")
    assert len(board) == 2 and board.loc[1, "trial_id"] == twin.trial_id  # one row for trial 1, the new training
    assert board.loc[1, "failures"] == 1 and board.loc[1, "status"] == "finished"
