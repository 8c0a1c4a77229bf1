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
