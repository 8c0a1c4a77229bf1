"""Held-out test evaluation: top-k by validation, sklearn-exact metrics, bootstrap intervals, a logged test split.

Also the other half of honest science: the search itself never decodes the test split.
"""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from analysis.bootstrap import _weighted_metrics, bootstrap_ci, point_metrics
from analysis.evaluate import EvaluateError, evaluate_top_k, main
from analysis.splits import decode_split, image_names, log_test_use, read_split

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
    assert list(predictions.columns) == ["trial", "members", "tta", "temperature", "threshold", "positive_class",
                                         "final", "path", "label", "label_index", "predicted",
                                         *(f"prob_{c}" for c in CLASSES)]
    names = image_names(folder, test_paths)  # relative to the dataset's root: the folder names no place
    assert not any(Path(n).is_absolute() for n in names) and len(set(names)) == len(names)
    for name, rows in predictions.groupby("trial"):
        assert rows["path"].tolist() == names
        assert np.allclose(rows[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert (table["n"] == len(test_paths)).all() and (table["split"] == "test").all()


def test_metrics_equal_sklearn_on_the_saved_predictions(evaluated):
    folder, table = evaluated
    predictions = pd.read_parquet(folder / "test_predictions.parquet")
    record = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    for _, ours in table.iterrows():
        rows = predictions[predictions["trial"] == ours["trial_name"]]
        y, probs = rows["label_index"].to_numpy(), rows[[f"prob_{c}" for c in CLASSES]].to_numpy()
        # metrics at the decision the model ships with: its (calibrated) probabilities and its threshold
        threshold = rows["threshold"].iloc[0]
        y_pred = (probs[:, 1] >= threshold).astype(int) if not np.isnan(threshold) else probs.argmax(axis=1)
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


def test_a_damaged_split_file_is_a_named_error_not_a_traceback(run_dir, tmp_path, capsys):
    """splits.parquet cut short by an interrupted copy: exit 2 naming the file, before any model is loaded."""
    folder = tmp_path / "tiny"
    shutil.copytree(run_dir, folder)
    data = (folder / "splits.parquet").read_bytes()
    (folder / "splits.parquet").write_bytes(data[: len(data) // 2])
    assert main([str(folder), "--top-k", "1"]) == 2
    err = capsys.readouterr().err
    assert "splits.parquet" in err and "is unreadable" in err and "Traceback" not in err
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
    bulk = _weighted_metrics(y, probs, probs.argmax(axis=1), counts, names, positive=None)
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
    from analysis.splits import located
    from trainables.data import cache_dir, cache_key

    splits = located(run_dir, pd.read_parquet(run_dir / "splits.parquet"))  # where the images are on this machine
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
    from trainables.near_duplicates import Settings

    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))  # nothing decoded yet: every decode is real
    decoded = []
    real = trainables.data.decode_image
    seen = []
    monkeypatch.setattr(trainables.data, "decode_image", lambda path, size: seen.append((path, size)) or real(path, size))
    prepared = prepare_data(folder_study(make_folder(tmp_path / "data", n=8)))

    splits = prepared.splits
    train, val = (splits[splits["split"] == s] for s in ("train", "val"))
    test = set(splits.loc[splits["split"] == "test", "path"])
    # The leakage audit's embedding sees every image at its own size (features only, nothing kept for training);
    # at the study's size only train and val are decoded.
    audit_size = Settings().embedding_size
    assert sorted(p for p, size in seen if size == audit_size) == sorted(splits["path"])
    decoded = [p for p, size in seen if size == 16]
    assert len(seen) == len(decoded) + len(splits)
    assert test and sorted(decoded) == sorted([*train["path"], *val["path"]]) and not test & set(decoded)
    assert sorted(prepared.arrays) == ["digest_x_train", "digest_x_val", "x_train", "x_val", "y_train", "y_val"]
    from trainables.data import data_digest

    assert all(prepared.arrays[f"digest_x_{s}"] == data_digest(prepared.arrays[f"x_{s}"]) for s in ("train", "val"))
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


# --------------------------------------------------------------------------
# the final model: validation predictions, calibration, operating point, ensemble and TTA (issue 15)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def final_stage(run_dir, tmp_path_factory):
    """A copy of the real tiny study, evaluated with every final-stage option at once."""
    folder = copy_run(run_dir, tmp_path_factory.mktemp("final") / "tiny")
    notes = []
    table = evaluate_top_k(folder, k=2, n_boot=300, seed=0, log=notes.append, ensemble=2, tta="flips",
                           target_sensitivity=0.9)
    return folder, table, notes


def val_probs(folder: Path, trial: str, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    rows = pd.read_parquet(folder / "val_predictions_cache.parquet")
    rows = rows[(rows["trial"] == trial) & (rows["tta"] == tta)]
    return rows["label_index"].to_numpy(), rows[[f"prob_{c}" for c in CLASSES]].to_numpy()


def test_validation_predictions_are_recomputed_exactly_as_the_trials_scored_them(final_stage):
    folder, _, notes = final_stage
    val_paths = image_names(folder, pd.read_parquet(folder / "splits.parquet").query("split == 'val'")["path"])
    cached = pd.read_parquet(folder / "val_predictions_cache.parquet")
    assert list(cached.columns) == ["trial", "path", "label", "label_index", *(f"prob_{c}" for c in CLASSES), "tta",
                                    "checkpoint"]
    board = pd.read_parquet(folder / "leaderboard.parquet").set_index("trial_name")
    from trainables.metrics import classification_metrics

    for (trial, tta), rows in cached.groupby(["trial", "tta"]):
        assert rows["path"].tolist() == val_paths
        if tta == "none":  # the checkpointed epoch's own validation scores, from the recomputed probabilities
            y, probs = val_probs(folder, trial)
            scores = classification_metrics(y, probs, CLASSES, positive=1)
            assert scores["balanced_accuracy"] == pytest.approx(board.loc[trial, "best_val_balanced_accuracy"], abs=1e-9)
            assert scores["loss"] == pytest.approx(board.loc[trial, "best_val_loss"], abs=1e-4)
    assert set(cached.loc[cached["tta"] == "flips", "trial"]) == set(expected_order(folder)[:2])
    assert any("computed and cached in val_predictions_cache.parquet" in n for n in notes)


def test_each_candidates_validation_score_is_recorded_and_a_worse_one_is_said(final_stage):
    """final_model.json holds every candidate's validation score; one below the single best gets a note."""
    from trainables.metrics import classification_metrics

    folder, _, notes = final_stage
    record = json.loads((folder / "final_model.json").read_text())["validation_scores"]
    best, second = expected_order(folder)[:2]
    expected = {}
    for label, members, tta in ((best, [best], "none"), ("ensemble of top 2", [best, second], "none"),
                                (f"{best} + TTA flips", [best], "flips"),
                                ("ensemble of top 2 + TTA flips", [best, second], "flips")):
        y = val_probs(folder, best)[0]
        probs = np.mean([val_probs(folder, m, tta)[1] for m in members], axis=0)
        expected[label] = classification_metrics(y, probs, CLASSES, positive=1)["balanced_accuracy"]
    assert record["metric"] == "balanced_accuracy"
    assert record["by_model"] == pytest.approx(expected, abs=1e-12)
    worse = [label for label, v in expected.items() if v < expected[best]]
    said = [n for n in notes if "below the single best trial" in n]
    assert bool(said) == bool(worse) and all(label in said[0] for label in worse)


def test_cached_validation_predictions_are_reused_unless_the_checkpoint_changed(final_stage, tmp_path):
    folder = shutil.copytree(final_stage[0], tmp_path / "tiny")
    cached = pd.read_parquet(folder / "val_predictions_cache.parquet")
    best = expected_order(folder)[0]
    cached.loc[cached["trial"] == best, "checkpoint"] = "trial_x/checkpoint_999999"  # as if a resume saved a better epoch
    cached.to_parquet(folder / "val_predictions_cache.parquet", index=False)
    notes = []
    evaluate_top_k(folder, k=2, n_boot=10, split="val", log=notes.append, ensemble=2, tta="flips")
    assert "note: validation predictions of 2 model/view set(s) computed" in "\n".join(notes)  # the best's 2, no more
    again = pd.read_parquet(folder / "val_predictions_cache.parquet")
    assert (folder / "val_predictions.parquet").is_file()  # --split val's own output, beside the cache
    assert len(again) == len(cached) and set(again.loc[again["trial"] == best, "checkpoint"]) != {"trial_x/checkpoint_999999"}


def test_temperature_and_threshold_are_fitted_on_validation_only_and_stored(final_stage):
    from analysis.calibration import apply_temperature, fit_temperature
    from analysis.operating_point import choose_threshold

    folder, _, _ = final_stage
    record = json.loads((folder / "final_model.json").read_text())
    top2 = expected_order(folder)[:2]
    assert record["trials"] == top2 and record["tta"] == "flips" and record["class_names"] == CLASSES
    assert record["model"] == "ensemble of top 2 + TTA flips" and record["positive_class"] == "malignant"
    y, first = val_probs(folder, top2[0], "flips")
    _, second = val_probs(folder, top2[1], "flips")
    ensemble = (first + second) / 2
    fit = fit_temperature(ensemble, y)
    assert record["temperature"] == pytest.approx(fit["temperature"], rel=1e-9)
    calibrated = apply_temperature(ensemble, fit["temperature"])
    expected = choose_threshold(calibrated[:, 1], y == 1, target_sensitivity=0.9)
    assert record["threshold"] == pytest.approx(expected["value"])
    reached = (calibrated[y == 1, 1] >= record["threshold"]).mean()
    assert reached >= 0.9 and record["validation"]["at_threshold"]["sensitivity"] == pytest.approx(reached)
    assert "target sensitivity 0.9" in record["threshold_rule"] and record["fitted_on"]["split"] == "val"
    for trial in expected_order(folder)[:2]:  # each trial alone, for search.predict
        yt, pt = val_probs(folder, trial)
        assert record["per_trial"][trial]["temperature"] == pytest.approx(fit_temperature(pt, yt)["temperature"])


def test_the_final_models_are_scored_beside_the_single_best_with_intervals(final_stage, run_dir):
    from analysis.calibration import apply_temperature, calibration_scores
    from analysis.operating_point import binary_at
    from trainables.checkpoint import load_classifier

    folder, table, _ = final_stage
    top2 = expected_order(folder)[:2]
    labels = [top2[0], "ensemble of top 2", f"{top2[0]} + TTA flips", "ensemble of top 2 + TTA flips"]
    assert table["trial_name"].tolist() == top2 + labels[1:]
    assert table["rank"].tolist()[:2] == [1, 2] and table["rank"].iloc[2:].isna().all()
    record = json.loads((folder / "test_evaluation.json").read_text())
    evaluation = record["evaluations"][-1]
    final = evaluation["final"]
    assert [m["label"] for m in final["models"]] == labels and final["model"] == labels[-1]
    assert len(record["test_split_log"]) == 1 and record["test_split_log"][0]["trials"] == top2  # read once

    predictions = pd.read_parquet(folder / "test_predictions.parquet")
    # each model's rows hold what it ships: calibrated by its own temperature; softmax(log p / T) undone by 1 / T
    shipped = {name: rows[[f"prob_{c}" for c in CLASSES]].to_numpy() for name, rows in predictions.groupby("trial")}
    called = {name: rows["predicted"].map(CLASSES.index).to_numpy() for name, rows in predictions.groupby("trial")}
    temperature = {name: rows["temperature"].iloc[0] for name, rows in predictions.groupby("trial")}
    probs = {name: apply_temperature(p, 1 / temperature[name]) for name, p in shipped.items()}
    y = predictions.loc[predictions["trial"] == top2[0], "label_index"].to_numpy()
    np.testing.assert_allclose(probs["ensemble of top 2"], (probs[top2[0]] + probs[top2[1]]) / 2, atol=1e-9)
    # TTA: the mean over the image and its three mirror images, straight from the checkpoint
    model = load_classifier(folder / evaluation["trials"][0]["checkpoint"])
    images = decode_split(read_split(folder, "test"), model.input_shape[1])
    views = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([model.predict(np.ascontiguousarray(v), verbose=0) for v in views], axis=0)
    np.testing.assert_allclose(probs[labels[2]], expected, atol=1e-5)
    assert not np.allclose(probs[labels[2]], probs[top2[0]], atol=1e-4)  # the views changed something

    for m in final["models"]:
        p = probs[m["label"]]
        # the metrics are at the shipped decision: the stored threshold on the calibrated probabilities
        assert (called[m["label"]] == (shipped[m["label"]][:, 1] >= m["operating_point"]["value"])).all()
        assert m["metrics"]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, called[m["label"]]))
        for name, value in m["metrics"].items():
            low, high = m["ci"][name]
            assert low is None or low - 1e-9 <= value <= high + 1e-9, (m["label"], name)
        c = m["calibration"]
        calibrated = apply_temperature(p, c["temperature"])
        assert c["before"] == pytest.approx(calibration_scores(p, y)) and c["after"] == pytest.approx(calibration_scores(calibrated, y))
        np.testing.assert_allclose(calibrated, shipped[m["label"]], atol=1e-9)
        op = m["operating_point"]
        assert op["class"] == "malignant" and op["rule"] == "target_sensitivity" and op["validation"]["sensitivity"] >= 0.9
        at = binary_at(y == 1, calibrated[:, 1], op["value"])
        # JSON has no NaN: a ratio undefined on the split (nothing called negative, so no NPV) is written null
        assert op["at_threshold"] == pytest.approx({k: None if np.isnan(v) else v for k, v in at.items()})
        for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            low, high = op["ci"][name]
            assert np.isnan(at[name]) or low - 1e-9 <= at[name] <= high + 1e-9, (m["label"], name)
        assert np.array(m["confusion_matrix"]).sum() == len(y)
    assert (folder / final["reliability_plot"]).stat().st_size > 1000
    final_model = json.loads((folder / "final_model.json").read_text())
    assert final["models"][-1]["calibration"]["temperature"] == final_model["temperature"]
    assert final["models"][-1]["operating_point"]["value"] == final_model["threshold"]


def test_an_ensemble_of_identical_models_equals_the_model(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "tiny")
    order = expected_order(folder)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    best = board.loc[board["trial_name"] == order[0], "checkpoint_path"].iloc[0]
    board.loc[board["trial_name"] == order[1], "checkpoint_path"] = best  # the second trial is the first's model
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    evaluate_top_k(folder, k=1, n_boot=200, log=lambda line: None, ensemble=2)
    single, ensemble = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]["final"]["models"]
    assert ensemble["label"] == "ensemble of top 2" and ensemble["trials"] == order[:2]
    # (p + p) / 2 == p exactly in floating point, so everything downstream is identical, not merely close
    for key in ("metrics", "ci", "calibration", "operating_point", "confusion_matrix"):
        assert ensemble[key] == single[key], key


def test_search_predict_applies_what_the_evaluation_fitted(final_stage, tmp_path, capsys):
    """Through the real chain: search.predict on copies of the validation images gives the stored temperature
    applied to the validation predictions, and the stored threshold's decisions."""
    from analysis.calibration import apply_temperature
    from analysis.predict import main as predict

    folder, _, _ = final_stage
    best = expected_order(folder)[0]
    stored = json.loads((folder / "final_model.json").read_text())["per_trial"][best]
    images = tmp_path / "val"
    val = read_split(folder, "val")  # path: where each image is on this machine
    for i, path in enumerate(val["path"]):
        images.mkdir(exist_ok=True)
        shutil.copy(path, images / f"{i:04d}.png")
    assert predict([str(folder), str(images), "--out", str(tmp_path / "p.csv"), "--trial", best]) == 0
    out = capsys.readouterr().out
    assert f"temperature {stored['temperature']:.4f}" in out
    assert f"'malignant' when its calibrated probability >= {stored['threshold']['value']:.4f}" in out
    assert "final model is 'ensemble of top 2 + TTA flips'; this uses " + best + " alone" in out
    table = pd.read_csv(tmp_path / "p.csv").sort_values("file")
    _, raw = val_probs(folder, best)
    expected = apply_temperature(raw, stored["temperature"])
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), expected, atol=2e-5)
    called = np.where(expected[:, 1] >= stored["threshold"]["value"], "malignant", "benign")
    assert table["predicted"].tolist() == called.tolist()


def _cells(card: str, section: str, first: str) -> list[str]:
    """The cells of the Markdown table row, in ``## section`` of ``card``, whose first cell is ``first``."""
    text = card.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_the_model_card_holds_the_evaluations_numbers(final_stage, tmp_path):
    from analysis.model_card import build_card

    folder, _, _ = final_stage
    best_name = expected_order(folder)[0]
    card = (folder / "model_card.md").read_text()
    evaluation = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    final_model = json.loads((folder / "final_model.json").read_text())
    for heading in ("Intended use and users", "Data", "Protocol", "Model", "Results", "Calibration", "Failure modes",
                    "Limitations", "Export", "Software"):
        assert f"\n## {heading}\n" in card, heading

    from analysis.tables import decimals_for

    d = decimals_for(1 / evaluation["n"])  # the card's decimals follow what one test image moves
    assert d < 4

    def ci(value, interval):
        if value is None:  # undefined on the split (e.g. NPV where nothing is called negative): no number, no interval
            return "n/a"
        return f"{value:.{d}f} [{interval[0]:.{d}f}, {interval[1]:.{d}f}]"

    for m in evaluation["final"]["models"]:
        label = m["label"] + (" (final)" if m["label"] == evaluation["final"]["model"] else "")
        assert _cells(card, "Results", label)[1:] == [ci(m["metrics"][n], m["ci"][n])
                                           for n in ("accuracy", "balanced_accuracy", "macro_f1", "auc")]
        c = m["calibration"]
        assert _cells(card, "Calibration", m["label"])[1:4] == [f"{c['temperature']:.4f}", f"{c['before']['ece']:.{d}f}",
                                                 f"{c['after']['ece']:.{d}f}"]
    op = evaluation["final"]["models"][-1]["operating_point"]
    row = next(line for line in card.splitlines() if line.startswith("| sensitivity |"))
    values = card.splitlines()[card.splitlines().index(row) + 2]
    assert [c.strip() for c in values.strip("|").split("|")] == [
        ci(op["at_threshold"][n], op["ci"][n]) for n in ("sensitivity", "specificity", "ppv", "npv", "f1")]
    assert f"threshold {final_model['threshold']:.4f} (target sensitivity 0.9 on validation)" in card
    splits = pd.read_parquet(folder / "splits.parquet")
    assert _cells(card, "Data", "all")[1:4] == [str((splits["split"] == s).sum()) for s in ("train", "val", "test")]

    copy = shutil.copytree(folder, tmp_path / "tiny")
    final_model["temperature"] = 1.2345  # generated from the files: a change shows, nothing is fixed text
    (copy / "final_model.json").write_text(json.dumps(final_model))
    assert "- temperature: 1.2345 (" in build_card(copy)

    # The export section states what the exported file outputs and how it decides, from its sidecar.
    (copy / "export").mkdir()
    (copy / "export" / "best.onnx.json").write_text(json.dumps({
        "format": "onnx", "model": best_name, "trials": [best_name], "tta": None, "verification": {"split": "val", "ok": True},
        "output": "calibrated probabilities softmax(log p / 1.2345)", "decision": "predict 'malignant' when >= 0.4"}))
    (copy / "export" / "final.onnx.json").write_text(json.dumps({
        "format": "onnx", "model": final_model["model"], "trials": final_model["trials"], "tta": final_model["tta"],
        "verification": {"split": "val", "ok": True}}))
    card = build_card(copy)
    assert (f"- best.onnx.json: format onnx, {best_name} ({best_name}), NOT the final model (exported before the "
            "last evaluation, or --trial); verified on val: ok") in card
    assert f"- final.onnx.json: format onnx, {final_model['model']} ({', '.join(final_model['trials'])}), the final model" in card
    assert "  - outputs calibrated probabilities softmax(log p / 1.2345)" in card
    assert "  - decision: predict 'malignant' when >= 0.4" in card

    # The leakage audit's figures come from near_duplicates.parquet: plant a cross-split pair and see it stated.
    from trainables.near_duplicates import contamination

    train, test = (splits.loc[splits["split"] == s, "path"].iloc[0] for s in ("train", "test"))
    planted = pd.DataFrame({"path_a": [train], "path_b": [test], "split_a": ["train"], "split_b": ["test"],
                            "cross_split": [True], "same_label": [True], "label_conflict": [False],
                            "hash_distance": [3], "cluster": [0]})
    planted.to_parquet(copy / "near_duplicates.parquet")
    f = contamination(planted, splits)
    assert f["cross_split_pairs"] == 1 and f["test_with_train_near_duplicate"] == 1
    assert (f"- near-duplicate images: 1 pair(s) in 1 cluster(s), 1 across splits, 0 label conflict(s); "
            f"{f['val_share_with_train_near_duplicate']:.1%} of val images have a near-duplicate in train; "
            f"{f['test_share_with_train_near_duplicate']:.1%} of test images") in build_card(copy)


def test_the_report_shows_the_final_model_beside_the_test_evaluation(final_stage, tmp_path):
    from analysis.report import write_report

    folder = shutil.copytree(final_stage[0], tmp_path / "tiny")
    markdown, _ = write_report(folder)
    text = markdown.read_text()
    section = text.split("\n## Final model: ensemble, calibration, operating point\n", 1)[1].split("\n## ", 1)[0]
    final = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]["final"]
    assert text.index("## Held-out test evaluation") < text.index("## Final model")
    assert f"**{final['model']}**" in section and "report_files/reliability_test.png" in section
    c = final["models"][-1]["calibration"]
    assert f"{c['before']['ece']:.4f} / {c['after']['ece']:.4f}" in section and "model_card.md" in section


# --------------------------------------------------------------------------
# the final model: bad input gets a named error before any work
# --------------------------------------------------------------------------


def test_an_ensemble_larger_than_the_trials_with_checkpoints_is_refused_before_any_work(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "tiny")
    with pytest.raises(EvaluateError, match=r"--ensemble 99: only 4 trial\(s\) .* use --ensemble 4 or less"):
        evaluate_top_k(folder, ensemble=99)
    with pytest.raises(EvaluateError, match="--positive-class: unknown class 'malignent'; did you mean 'malignant'"):
        evaluate_top_k(folder, positive_class="malignent")
    for name in ("test_evaluation.json", "val_predictions_cache.parquet", "final_model.json"):
        assert not (folder / name).exists(), name


def test_a_folder_without_checkpoints_is_refused_before_any_work(tmp_path):
    from fixtures.runs import make_run_dir

    folder = make_run_dir(tmp_path)  # trials with scores, none with a checkpoint
    with pytest.raises(EvaluateError, match="no trial of .* has a checkpoint .*--resume"):
        evaluate_top_k(folder, ensemble="auto")
    assert sorted(p.name for p in folder.iterdir()) == ["epochs.parquet", "leaderboard.parquet", "splits.parquet",
                                                        "study.json"]


@pytest.mark.parametrize("options, match", [
    ({"target_sensitivity": 0.95}, r"--target-sensitivity is for one positive class .* 3 classes .*--positive-class"),
    ({"target_specificity": 0.9}, "--target-specificity is for one positive class"),
    ({"target_sensitivity": 1.2, "positive_class": "b"}, "strictly between 0 and 1, got 1.2"),
    ({"ensemble": 0}, "--ensemble must be a number of trials"),
    ({"ensemble": "three"}, "--ensemble must be a number of trials .* got 'three'"),
    ({"tta": "rotate"}, "--tta must be one of flips, dihedral"),
])
def test_options_that_do_not_fit_the_study_are_named(options, match):
    from analysis.selection import plan_final

    with pytest.raises(EvaluateError, match=match):
        plan_final({"dataset": {}}, ["a", "b", "c"], 3, Path("/r"), **options)


def test_a_multiclass_study_gets_a_threshold_only_for_a_named_class():
    from analysis.selection import plan_final

    assert plan_final({"dataset": {}}, ["a", "b", "c"], 3, Path("/r")).positive is None
    assert plan_final({"dataset": {}}, ["a", "b", "c"], 3, Path("/r"), positive_class="c",
                      target_sensitivity=0.9).positive == 2
    binary = plan_final({"dataset": {"positive_class": "benign"}}, CLASSES, 3, Path("/r"), ensemble="auto")
    assert binary.positive == 0 and binary.n_members_max == 3


@pytest.mark.parametrize("argv, message", [
    (["--target-sensitivity", "1.5"], "--target-sensitivity must be strictly between 0 and 1, got 1.5"),
    (["--target-specificity", "0"], "--target-specificity must be strictly between 0 and 1, got 0.0"),
    (["--ensemble", "0"], "--ensemble must be a number of trials (>= 1) or 'auto', got '0'"),
    (["--tta", "rot"], "invalid choice: 'rot'"),
])
def test_bad_final_stage_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["runs/x", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------
# the final model: ensembles and TTA views on constructed data
# --------------------------------------------------------------------------


def test_auto_picks_the_ensemble_size_that_scores_best_on_validation():
    from analysis.selection import choose_ensemble_size

    y = np.array([0, 1] * 10)
    right = np.eye(2)[y] * 0.6 + 0.2
    wrong_on_first_half = right.copy()
    wrong_on_first_half[:10] = right[:10, ::-1]
    # the first alone is right everywhere; adding the others makes the first half a tie, then wrong
    members = [right, wrong_on_first_half, wrong_on_first_half]
    k, scores = choose_ensemble_size(members, y, CLASSES, {"metric": "val_balanced_accuracy", "mode": "max"}, 1)
    assert k == 1 and scores[1] == 1.0 and scores[3] < 1.0
    k, _ = choose_ensemble_size([wrong_on_first_half, right, right], y, CLASSES,
                                {"metric": "val_balanced_accuracy", "mode": "max"}, 1)
    assert k == 3  # 2 ties 0.5+0.5 -> uncertain; 3 is right everywhere
    k, _ = choose_ensemble_size([right, right], y, CLASSES, {"metric": "val_loss", "mode": "min"}, 1)
    assert k == 1  # identical members: a tie, to the smaller ensemble


def test_the_final_model_is_the_best_on_validation_only_with_an_auto_option():
    from analysis.selection import FinalPlan, choose_final

    candidates = [("best", ["a"], None), ("ensemble of top 2", ["a", "b"], None), ("best + TTA dihedral", ["a"],
                  "dihedral"), ("ensemble of top 2 + TTA dihedral", ["a", "b"], "dihedral")]
    scores = {"best": 0.80, "ensemble of top 2": 0.84, "best + TTA dihedral": 0.84,
              "ensemble of top 2 + TTA dihedral": 0.82}

    def plan(ensemble, tta):
        return FinalPlan(ensemble, tta, None, None, None, 2)

    assert choose_final(candidates, scores, plan("auto", "auto"))[0] == "ensemble of top 2"  # a tie: the simpler
    assert choose_final(candidates, scores, plan(2, "auto"))[0] == "ensemble of top 2"
    assert choose_final(candidates, scores, plan(2, "dihedral"))[0] == "ensemble of top 2 + TTA dihedral"  # as asked
    assert choose_final(candidates, {**scores, "best": math.nan}, plan("auto", None))[0] == "ensemble of top 2"
    losses = {"best": 0.3, "ensemble of top 2": 0.2, "best + TTA dihedral": 0.25, "ensemble of top 2 + TTA dihedral": 0.4}
    assert choose_final(candidates, losses, plan("auto", "auto"), "min")[0] == "ensemble of top 2"
    assert plan("auto", "auto").tta_mode == "dihedral" and plan(None, "flips").tta_mode == "flips"


def test_auto_options_make_the_final_model_the_candidate_best_on_validation(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path / "tiny")
    notes = []
    evaluate_top_k(folder, k=2, n_boot=50, seed=0, log=notes.append, ensemble="auto", tta="auto")
    final_model = json.loads((folder / "final_model.json").read_text())
    by_model = final_model["validation_scores"]["by_model"]
    assert any(label.endswith("+ TTA dihedral") for label in by_model)  # --tta auto tries dihedral
    best = max(by_model.values())
    chosen = next(label for label in by_model if by_model[label] == best)  # the first (simplest) of the best
    evaluation = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]["final"]
    assert evaluation["model"] == chosen and evaluation["chosen_by"].startswith("auto: the candidate with the best")
    assert final_model["tta"] == ("dihedral" if chosen.endswith("TTA dihedral") else None)
    assert final_model["chosen_by"] == evaluation["chosen_by"]
    assert any(f"final model {chosen!r}, chosen on validation" in n for n in notes)
    # chosen on validation among every candidate: the correction repeats that choice over all of them and the trials
    s = evaluation["selection_corrected"]
    board = pd.read_parquet(folder / "leaderboard.parquet")
    assert s["over"] == "candidates" and set(s["labels"]) == set(by_model) | set(board["trial_name"])
    assert s["candidates"] == len(s["labels"]) and s["trials"] == len(board)
    assert s["validation"] == pytest.approx(max(best, s["validation"]))  # the best of all it chose among


def test_tta_views_are_the_symmetries_of_the_square():
    from analysis.final_model import tta_views

    image = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)  # no symmetry of its own
    for mode, n in (("flips", 4), ("dihedral", 8)):
        views = tta_views(image, mode)
        assert len(views) == n and len({v.tobytes() for v in views}) == n
        assert all(v.shape == image.shape for v in views) and np.array_equal(views[0], image)
        assert {v.tobytes() for v in views} >= {image[:, :, ::-1].tobytes(), image[:, ::-1].tobytes()}
    assert {v.tobytes() for v in tta_views(image, "flips")} <= {v.tobytes() for v in tta_views(image, "dihedral")}
    assert tta_views(image, None)[0] is image


def test_a_multiclass_final_model_gets_one_vs_rest_and_a_threshold_for_the_named_class():
    from analysis.calibration import apply_temperature
    from analysis.evaluate import Shipped, score_model
    from analysis.selection import Candidate, fit_on_validation, plan_final
    from analysis.operating_point import decide, one_vs_rest
    from analysis.splits import jsonable

    names = ["a", "b", "c"]
    y_val, p_val = synthetic(300, k=3, seed=5)
    y, p = synthetic(200, k=3, seed=6)
    plan = plan_final({"dataset": {}}, names, 3, Path("/r"), positive_class="c", target_sensitivity=0.9)
    fitted = fit_on_validation(p_val, y_val, plan)
    assert fitted["threshold"]["validation"]["sensitivity"] >= 0.9
    shipped = Shipped(Candidate("m", ("t",), None), fitted, p, positive=plan.positive)
    record = score_model(shipped, y, names, n_boot=200, seed=0, level=0.95, positive_for_auc=None)
    calibrated = apply_temperature(p, fitted["temperature"]["temperature"])
    called = decide(calibrated, 2, fitted["threshold"]["value"])
    assert record["operating_point"]["class"] == "c"
    assert record["confusion_matrix"] == skm.confusion_matrix(y, called, labels=[0, 1, 2]).tolist()
    assert record["operating_point"]["at_threshold"]["sensitivity"] == pytest.approx((called[y == 2] == 2).mean())
    assert record["metrics"]["recall_c"] == pytest.approx((called[y == 2] == 2).mean())  # at the shipped decision
    assert record["confusion_matrix_argmax"] == skm.confusion_matrix(y, calibrated.argmax(axis=1), labels=[0, 1, 2]).tolist()
    expected = one_vs_rest(y, called, names)
    for c in names:
        assert record["one_vs_rest"][c]["sensitivity"] == pytest.approx(expected[c]["sensitivity"])
        low, high = record["one_vs_rest"][c]["ci"]["specificity"]
        assert low <= record["one_vs_rest"][c]["specificity"] <= high
    json.dumps(jsonable(record), allow_nan=False)  # what test_evaluation.json stores


@pytest.mark.parametrize("limit, what", [(2_000, "val_predictions_cache.parquet"), (30_000, None)])
def test_a_folder_that_cannot_be_written_is_a_named_error_not_a_traceback(run_dir, tmp_path, limit, what):
    """Writes that fail (a read-only or full disk; here RLIMIT_FSIZE, which root cannot bypass as it can
    permissions): exit 2 and one line naming the file, whatever write fails first, and no partial file."""
    from fixtures.runs import files_under, run_with_file_size_limit

    folder = copy_run(run_dir, tmp_path / "tiny")
    (folder / "val_predictions_cache.parquet").unlink(missing_ok=True)
    before = files_under(folder)
    done = run_with_file_size_limit(["-m", "analysis.evaluate", folder, "--top-k", "1", "--bootstrap", "10"], limit)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    assert error.startswith("error: cannot write '") and "writable" in error, error
    if what:
        assert what in error
    assert not [p for p in folder.rglob("*.tmp*")]  # written whole or not at all
    assert set(files_under(folder)) >= set(before)


def test_the_choice_is_corrected_for_on_every_trial_and_said_first(final_stage):
    """BBC over the ranked trials, those the evaluation did not load too. Here the final model's ensemble and views
    were given (--ensemble 2 --tta flips), so the trials' ranking is the only choice made on validation."""
    from analysis.honest import selection_corrected

    folder, _, _ = final_stage
    evaluation = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    s = evaluation["final"]["selection_corrected"]
    board = pd.read_parquet(folder / "leaderboard.parquet")
    evaluated = [t["trial_name"] for t in evaluation["trials"]]
    others = [t for t in board["trial_name"] if t not in evaluated]
    assert len(others) == len(board) - 2 >= 1  # k = 2 were loaded; the rest were predicted for the correction
    assert s["trials"] == len(board) and s["over"] == "trials" and sorted(s["labels"]) == sorted(board["trial_name"])
    # Recomputed from the cached validation predictions: the same numbers
    probs = {name: val_probs(folder, name)[1] for name in evaluated}
    for name in others:
        probs[name] = val_probs(folder, name)[1]
    y = val_probs(folder, evaluated[0])[0]
    expected = selection_corrected(probs, y, "balanced_accuracy", "max", CLASSES, positive=1, n_boot=300, seed=0)
    for key in ("validation", "estimate", "optimism", "chosen", "candidates", "n", "n_boot"):
        assert s[key] == pytest.approx(expected[key]), key
    assert s["ci"] == pytest.approx(expected["ci"])
    assert s["ci"][0] <= s["estimate"] <= s["ci"][1] and s["n"] == len(y)
    from analysis.results import load_results

    assert load_results(folder).expected_score == s  # final_model.json's, for the Python API
    # The first paragraph of the model card says it, in the record's own numbers
    from analysis.files import MODEL_CARD
    from analysis.headline import selection_text

    card = (folder / MODEL_CARD).read_text()
    first = card.split("\n## ")[1]
    assert selection_text(s) in first and f"{s['estimate']:.{decimals(s['n'])}f}" in selection_text(s), first


def decimals(n: int) -> int:
    from analysis.tables import decimals_for

    return decimals_for(1 / n)
