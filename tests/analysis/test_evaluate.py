"""Held-out test evaluation: top-k by validation, sklearn-exact metrics, bootstrap intervals, a logged test split.

Also the other half of honest science: the search itself never decodes the test split.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from analysis.evaluate import (EvaluateError, _weighted_metrics, bootstrap_ci, evaluate_top_k, log_test_use, main,
                               point_metrics)

CLASSES = ["benign", "malignant"]


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of the results folder whose leaderboard records the old place, as after a move."""
    shutil.copytree(run_dir, to)
    board = pd.read_parquet(to / "leaderboard.parquet")
    board["checkpoint_path"] = [None if pd.isna(p) else f"/moved/away/tiny/{Path(p).parent.name}/{Path(p).name}"
                                for p in board["checkpoint_path"]]
    board.to_parquet(to / "leaderboard.parquet", index=False)
    return to


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
    folder = copy_run(run_dir, tmp_path_factory.mktemp("evaluate") / "tiny")
    return folder, evaluate_top_k(folder, k=3, n_boot=1000, seed=0, log=lambda line: None)


def expected_order(folder: Path) -> list[str]:
    board = pd.read_parquet(folder / "leaderboard.parquet")
    board = board[board["checkpoint_path"].notna()]
    return board.sort_values(["best_val_balanced_accuracy", "best_val_loss"], ascending=[False, True],
                             kind="stable")["trial_name"].tolist()


# --------------------------------------------------------------------------
# the evaluation of a real finished study
# --------------------------------------------------------------------------


def test_top_k_are_chosen_by_validation_and_every_test_image_is_predicted(evaluated):
    folder, table = evaluated
    assert table["trial_name"].tolist() == expected_order(folder)[:3]
    assert table["rank"].tolist() == [1, 2, 3]
    splits = pd.read_parquet(folder / "splits.parquet")
    test_paths = splits.loc[splits["split"] == "test", "path"].tolist()
    predictions = pd.read_parquet(folder / "test_predictions.parquet")
    assert list(predictions.columns) == ["trial", "path", "label", "label_index", "predicted", *(f"prob_{c}" for c in CLASSES)]
    for name, rows in predictions.groupby("trial"):
        assert rows["path"].tolist() == test_paths
        assert np.allclose(rows[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert (table["n"] == len(test_paths)).all() and (table["split"] == "test").all()


def test_metrics_equal_sklearn_on_the_saved_predictions(evaluated):
    folder, table = evaluated
    predictions = pd.read_parquet(folder / "test_predictions.parquet")
    record = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    for _, ours in table.iterrows():
        rows = predictions[predictions["trial"] == ours["trial_name"]]
        y, probs = rows["label_index"].to_numpy(), rows[[f"prob_{c}" for c in CLASSES]].to_numpy()
        y_pred = probs.argmax(axis=1)
        assert (rows["predicted"] == [CLASSES[i] for i in y_pred]).all()
        expected = {
            "accuracy": skm.accuracy_score(y, y_pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y, y_pred),
            "macro_f1": skm.f1_score(y, y_pred, average="macro", labels=[0, 1], zero_division=0),
            "auc": skm.roc_auc_score(y == 1, probs[:, 1]),  # positive_class malignant, the last class
            "loss": skm.log_loss(y, probs / probs.sum(axis=1, keepdims=True), labels=[0, 1]),
        }
        p, r, f, _ = skm.precision_recall_fscore_support(y, y_pred, labels=[0, 1], zero_division=0)
        for i, c in enumerate(CLASSES):
            expected.update({f"precision_{c}": p[i], f"recall_{c}": r[i], f"f1_{c}": f[i]})
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, abs=1e-6), name
            low, high = ours[f"{name}_ci_low"], ours[f"{name}_ci_high"]
            assert low - 1e-9 <= ours[name] <= high + 1e-9 or np.isnan(low), name
        trial = next(t for t in record["trials"] if t["trial_name"] == ours["trial_name"])
        assert trial["confusion_matrix"] == skm.confusion_matrix(y, y_pred, labels=[0, 1]).tolist()
        assert trial["classification_report"]["malignant"]["recall"] == pytest.approx(r[1])
        assert trial["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])


def test_the_use_of_the_test_split_is_logged_and_appended(evaluated, capsys):
    folder, table = evaluated
    log = json.loads((folder / "test_evaluation.json").read_text())["test_split_log"]
    assert log[0]["trials"] == table["trial_name"].tolist() and log[0]["by"] == "analysis.evaluate"
    assert log[0]["n_test"] == int(table["n"].iloc[0]) and log[0]["test_split_used_at"].endswith("+00:00")

    assert main([str(folder), "--top-k", "1", "--bootstrap", "1000"]) == 0  # the command line: a second look
    out = capsys.readouterr().out
    assert table["trial_name"].iloc[0] in out and "balanced_accuracy" in out and "pred malignant" in out
    record = json.loads((folder / "test_evaluation.json").read_text())
    assert len(record["test_split_log"]) == 2 and len(record["evaluations"]) == 2
    assert record["test_split_log"][1]["trials"] == [table["trial_name"].iloc[0]]
    assert record["test_split_log"][0] == log[0]  # earlier entries are kept as they were


def test_trials_without_a_usable_checkpoint_are_skipped_with_a_note(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "tiny")
    order = expected_order(folder)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    errored = board["trial_name"] == order[0]
    board.loc[errored, ["status", "error", "checkpoint_path"]] = ["errored", "ValueError: boom", None]
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    lost = Path(board.loc[board["trial_name"] == order[1], "checkpoint_path"].iloc[0])
    shutil.rmtree(folder / lost.parent.name / lost.name)  # e.g. lost in a copy
    notes = []
    table = evaluate_top_k(folder, k=2, n_boot=1000, log=notes.append)
    assert table["trial_name"].tolist() == order[2:4]
    assert any(order[0] in n and "errored: ValueError: boom" in n for n in notes)
    assert any(order[1] in n and "skipped" in n for n in notes)
    record = json.loads((folder / "test_evaluation.json").read_text())
    assert record["test_split_log"][0]["trials"] == order[2:4] and len(record["evaluations"][0]["notes"]) == 2


def test_a_study_without_test_images_says_how_to_go_on(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "tiny")
    splits = pd.read_parquet(folder / "splits.parquet")
    splits["split"] = splits["split"].replace({"test": "unused"})
    splits.to_parquet(folder / "splits.parquet", index=False)
    with pytest.raises(EvaluateError, match="no test images .*--split val"):
        evaluate_top_k(folder, k=1)
    assert not (folder / "test_evaluation.json").exists()


def test_a_damaged_log_is_never_overwritten(tmp_path):
    (tmp_path / "test_evaluation.json").write_text("{not json")
    with pytest.raises(EvaluateError, match="move it aside"):
        log_test_use(tmp_path, trials=["t"], n_test=3, by="test")
    assert (tmp_path / "test_evaluation.json").read_text() == "{not json"


# --------------------------------------------------------------------------
# the bootstrap, on synthetic predictions
# --------------------------------------------------------------------------


def synthetic(n: int, k: int = 2, seed: int = 0, decimals: int | None = None):
    """Labels and probabilities with real but imperfect signal; rounding makes ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.2 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, (np.round(probs, decimals) if decimals is not None else probs)


def test_the_interval_holds_the_estimate_and_narrows_with_more_images():
    names = CLASSES
    widths = {}
    for n in (100, 2000):
        y, probs = synthetic(n)
        point = point_metrics(y, probs, names, positive=1)
        ci = bootstrap_ci(y, probs, names, n_boot=1000, seed=0, positive=1)
        assert set(ci) == set(point)
        for name, value in point.items():
            assert ci[name][0] <= value <= ci[name][1], (n, name)
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
        assert ci == bootstrap_ci(y, probs, names, n_boot=1000, seed=0, positive=1)  # seeded: reproducible
    for name in widths[100]:
        assert widths[2000][name] < widths[100][name], name
    assert widths[2000]["accuracy"] < 0.5 * widths[100]["accuracy"]  # about 1/sqrt(20) as wide


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn warns on the degenerate resamples on purpose
@pytest.mark.parametrize("k", [2, 3])
def test_each_resample_scores_exactly_like_classification_metrics(k):
    names = ["a", "b", "c"][:k]
    y, probs = synthetic(40, k=k, seed=k, decimals=1)  # ties in the scores
    rng = np.random.default_rng(1)
    picks = [rng.integers(0, 40, 40) for _ in range(5)]
    picks.append(np.flatnonzero(y != 0)[:10].repeat(2))  # class 0 absent: no AUC, balanced accuracy without it
    picks.append(np.flatnonzero(probs.argmax(axis=1) == 0)[:12])  # one predicted class only: zero divisions
    counts = np.stack([np.bincount(p, minlength=40) for p in picks])
    bulk = _weighted_metrics(y, probs, counts, names, positive=None)
    for r, p in enumerate(picks):
        with np.errstate(all="ignore"):
            expected = point_metrics(y[p], probs[p], names, positive=None)
        for name, value in expected.items():
            assert bulk[name][r] == pytest.approx(value, abs=1e-9, nan_ok=True), (r, name)


def test_bad_bootstrap_arguments_name_the_fix():
    y, probs = synthetic(10)
    with pytest.raises(EvaluateError, match="at least 1000"):
        bootstrap_ci(y, probs, CLASSES, n_boot=0)


# --------------------------------------------------------------------------
# the search never decodes the test split
# --------------------------------------------------------------------------


def test_the_real_search_decoded_train_and_val_but_never_test(run_dir):
    """The study run by the fixture left one decoded array per split it shipped: train and val, not test."""
    from trainables.data import cache_dir, cache_key

    splits = pd.read_parquet(run_dir / "splits.parquet")
    size = json.loads((run_dir / "study.json").read_text())["study"]["dataset"]["image_size"]
    cached = {split: (cache_dir() / f"{cache_key(rows['path'].tolist(), size)}.npy").exists()
              for split, rows in splits.groupby("split")}
    assert cached == {"train": True, "val": True, "test": False}


def folder_study(root: Path):
    from search.study import Dataset, Study

    return Study(name="s", space=lambda trial: {"backbone": "cnn_s3"},
                 dataset=Dataset(loader="folder", path=str(root), image_size=16, split="stratified",
                                 split_options={"val": 0.25, "test": 0.25}))


def test_prepare_ships_only_train_and_val_and_decodes_nothing_else(tmp_path, monkeypatch):
    import trainables.data
    from fixtures.datasets import make_folder
    from search.prepare import prepare_data

    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))  # nothing decoded yet: every decode is real
    decoded = []
    real = trainables.data.decode_image
    monkeypatch.setattr(trainables.data, "decode_image", lambda path, size: decoded.append(path) or real(path, size))
    prepared = prepare_data(folder_study(make_folder(tmp_path / "data", n=8)))

    splits = prepared.splits
    train, val = (splits[splits["split"] == s] for s in ("train", "val"))
    test = set(splits.loc[splits["split"] == "test", "path"])
    assert test and sorted(decoded) == sorted([*train["path"], *val["path"]]) and not test & set(decoded)
    assert sorted(prepared.arrays) == ["x_train", "x_val", "y_train", "y_val"]
    for name, rows in (("train", train), ("val", val)):
        assert len(prepared.arrays[f"x_{name}"]) == len(rows)
        assert np.array_equal(prepared.arrays[f"x_{name}"], np.stack([real(p, 16) for p in rows["path"]]))
        assert np.array_equal(prepared.arrays[f"y_{name}"], rows["label_index"].to_numpy())


def test_prepare_succeeds_when_the_test_images_are_garbage(tmp_path, monkeypatch):
    """Once the split is known, the test files are replaced with random bytes, and preparing still works.

    ``prepare_data`` checks every file's integrity (test included) before a
    search, and hashes files of equal size to find duplicates across splits;
    both are by design. The integrity result is remembered for files of
    unchanged size and modification time, so the garbage keeps both: what is
    left to read the test files is the search's own decoding, which would fail.
    """
    from fixtures.datasets import make_folder
    from search.prepare import prepare_data
    from trainables.data import decode_images
    from trainables.datasets import DatasetError

    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))
    study = folder_study(make_folder(tmp_path / "data", n=8))
    first = prepare_data(study)
    test = first.splits.loc[first.splits["split"] == "test", "path"].tolist()
    for i, path in enumerate(test):
        stat = os.stat(path)
        Path(path).write_bytes(np.random.default_rng(i).bytes(stat.st_size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for array in (tmp_path / "cache" / "decoded").glob("*.npy"):
        array.unlink()  # decode train and val again, for real

    again = prepare_data(study)
    assert again.splits["split"].tolist() == first.splits["split"].tolist()
    for key in ("x_train", "x_val"):
        assert np.array_equal(again.arrays[key], first.arrays[key])
    with pytest.raises(DatasetError, match=f"{len(test)} image"):  # what decoding the test split would have done
        decode_images(test, 16, use_cache=False)
