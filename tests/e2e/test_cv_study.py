"""End to end with real Ray: a cross-validated study (cv_folds=2) reports fold means and its trials are fold ensembles."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.e2e


def test_a_cross_validated_study_reports_fold_means_and_predicts_with_the_fold_ensemble(tmp_path):
    import keras

    from analysis.splits import located
    from analysis.results import load_results
    from fixtures.studies import TINY_STUDY
    from analysis.predict import main as predict
    from search.run import main
    from trainables.checkpoint import fold_folders
    from trainables.data import decode_images
    from trainables.metrics import classification_metrics

    body = TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "2").replace(
        "    max_concurrent=2,\n", "    max_concurrent=2,\n    cv_folds=2,\n")
    study = tmp_path / "tiny_cv.py"
    study.write_text("from search import Dataset, Study\n" + body)
    assert main([str(study), "--storage", str(tmp_path / "runs"), "--seed", "1"]) == 0
    folder = tmp_path / "runs" / "tiny"

    splits = pd.read_parquet(folder / "splits.parquet")
    pool = splits["split"].isin(["train", "val"])
    assert splits.loc[pool, "fold"].isin([0, 1]).all() and splits.loc[~pool, "fold"].isna().all()
    board = pd.read_parquet(folder / "leaderboard.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert len(board) == 2 and {"best_val_balanced_accuracy_std", "best_val_loss_std"} <= set(board.columns)
    assert {"val_balanced_accuracy_std", "train_loss_std"} <= set(epochs.columns)

    # The best trial's checkpoint holds its 2 fold models; the leaderboard's score is their mean on their own folds.
    best = board.iloc[0]
    checkpoint = folder / best["checkpoint_path"]
    assert json.loads((checkpoint / "trial.json").read_text())["cv_folds"] == 2
    subs = fold_folders(checkpoint)
    assert [p.name for p in subs] == ["fold_0", "fold_1"] and all((p / "model.keras").is_file() for p in subs)
    rows = located(folder, splits[pool].reset_index(drop=True))  # path: where each image is on this machine
    images = decode_images(rows["path"].tolist(), 32)
    classes = ["benign", "malignant"]
    members = [keras.saving.load_model(p / "model.keras", compile=False) for p in subs]
    scores = [classification_metrics(rows["label_index"][rows["fold"] == f].to_numpy(),
                                     members[f].predict(images[(rows["fold"] == f).to_numpy()], verbose=0),
                                     classes, positive=1)["balanced_accuracy"] for f in (0, 1)]
    assert best["best_val_balanced_accuracy"] == pytest.approx(np.mean(scores), abs=1e-6)
    assert best["best_val_balanced_accuracy_std"] == pytest.approx(np.std(scores, ddof=1), abs=1e-6)

    # load_model() and search.predict give the fold ensemble: the mean of the fold models' probabilities.
    expected = np.mean([m.predict(images[:8], verbose=0) for m in members], axis=0)
    model = load_results(folder).load_model()
    np.testing.assert_allclose(model.predict(images[:8], verbose=0), expected, atol=1e-5)
    shown = tmp_path / "images"
    shown.mkdir()
    for path in rows["path"][:8]:
        (shown / Path(path).name).write_bytes(Path(path).read_bytes())
    out = tmp_path / "preds.csv"
    assert predict([str(folder), str(shown), "--out", str(out)]) == 0
    preds = pd.read_csv(out).set_index("file").loc[[Path(p).name for p in rows["path"][:8]]]
    np.testing.assert_allclose(preds[["prob_benign", "prob_malignant"]].to_numpy(), expected, atol=1e-4)
