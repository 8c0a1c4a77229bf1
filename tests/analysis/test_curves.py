"""analysis.curves: ROC and precision-recall curves with bootstrap bands and the validation-chosen operating point."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from analysis import curves as C
from fixtures.runs import make_run_dir

PNG = b"\x89PNG\r\n\x1a\n"


def _predictions(n=300, k=2, shift=1.2, seed=0):
    """Labels and softmax probabilities of a model that is right more often than not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += shift
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def _inside(values, band, tol=1e-9) -> bool:
    low, high = band
    return bool(np.all((low - tol <= values) & (values <= high + tol)))


def test_the_band_contains_the_curve_and_the_areas_are_scikit_learns():
    y, probs = _predictions()
    c = C.class_curves(y == 1, probs[:, 1], name="malignant", n_boot=500, seed=3)
    assert _inside(c.roc_on_grid, c.roc_band) and _inside(c.pr_on_grid, c.pr_band)
    assert np.all(c.roc_band[0] <= c.roc_band[1]) and np.all(c.pr_band[0] <= c.pr_band[1])
    assert c.auc == pytest.approx(roc_auc_score(y == 1, probs[:, 1]), abs=1e-12)
    assert c.average_precision == pytest.approx(average_precision_score(y == 1, probs[:, 1]), abs=1e-12)
    assert c.auc_ci[0] <= c.auc <= c.auc_ci[1] and c.average_precision_ci[0] <= c.average_precision <= c.average_precision_ci[1]
    assert c.roc_on_grid[0] >= 0 and c.roc_on_grid[-1] == 1.0 and c.n_boot == 500
    assert (c.n_positive, c.n_negative) == (int((y == 1).sum()), int((y == 0).sum()))


def test_the_band_uses_the_evaluations_own_resamples():
    """Same seed, same resamples: the AUC interval equals analysis.evaluate's for the same predictions."""
    from analysis.bootstrap import bootstrap_ci

    y, probs = _predictions(n=120, seed=5)
    c = C.class_curves(y == 1, probs[:, 1], n_boot=400, seed=11)
    low, high = bootstrap_ci(y, probs, ["benign", "malignant"], n_boot=400, seed=11, positive=1)["auc"]
    assert c.auc_ci == pytest.approx((low, high), abs=1e-12)


def test_the_curve_is_read_on_the_grid_through_ties():
    # scores 0.9 (+), 0.8 (+ and -, tied), 0.3 (-): vertices (0, 0), (0, .5), (.5, 1), (1, 1)
    c = C.class_curves([1, 1, 0, 0], [0.9, 0.8, 0.8, 0.3], n_boot=50)
    on = dict(zip(np.round(C.ROC_GRID, 2), c.roc_on_grid))
    assert on[0.0] == 0.5 and on[0.25] == pytest.approx(0.75) and on[0.5] == 1.0 and on[1.0] == 1.0
    # precision at the highest threshold that reaches the recall: 1 up to recall .5, then 2/3 (the tie)
    pr = dict(zip(np.round(C.PR_GRID, 2), c.pr_on_grid))
    assert pr[0.5] == 1.0 and pr[0.51] == pytest.approx(2 / 3) and pr[1.0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("where", ["between scores", "a score", "above every score", "below every score"])
def test_the_operating_point_lies_on_the_roc_curve_at_the_thresholds_fpr_and_tpr(where):
    from analysis.operating_point import binary_at

    y, probs = _predictions(seed=1)
    scores = probs[:, 1]
    ordered = np.sort(np.unique(scores))
    threshold = {"between scores": (ordered[150] + ordered[151]) / 2, "a score": ordered[200],
                 "above every score": 1.0, "below every score": 0.0}[where]
    c = C.class_curves(y == 1, scores, threshold=threshold, n_boot=50)
    at = binary_at(y == 1, scores, threshold)
    assert c.point["kind"] == "threshold" and c.point["threshold"] == threshold
    assert c.point["tpr"] == pytest.approx(at["sensitivity"]) and c.point["fpr"] == pytest.approx(1 - at["specificity"])
    # a vertex of scikit-learn's curve: the one of the lowest test score still >= the threshold
    fpr, tpr, thresholds = roc_curve(y == 1, scores, drop_intermediate=False)
    i = int(np.flatnonzero(thresholds >= threshold)[-1])
    assert (c.point["fpr"], c.point["tpr"]) == pytest.approx((fpr[i], tpr[i]))
    if at["tp"] + at["fp"]:
        assert c.point["recall"] == pytest.approx(at["sensitivity"]) and c.point["precision"] == pytest.approx(at["ppv"])


def test_multiclass_gives_one_curve_per_class_and_two_classes_one(tmp_path):
    names = ["nv", "mel", "bcc", "akiec"]
    y, probs = _predictions(n=400, k=4, seed=2)
    curves = C.curves_for(y, probs, names, positive=1, threshold=0.4, n_boot=100)
    assert [c.name for c in curves] == names
    assert [c.point["kind"] for c in curves] == ["argmax", "threshold", "argmax", "argmax"]
    for c, cls in zip(curves, range(4)):
        assert c.auc == pytest.approx(roc_auc_score(y == cls, probs[:, cls]))
        assert _inside(c.roc_on_grid, c.roc_band) and _inside(c.pr_on_grid, c.pr_band)
    argmax = probs.argmax(axis=1)
    assert curves[0].point["tpr"] == pytest.approx(((argmax == 0) & (y == 0)).sum() / (y == 0).sum())
    roc, pr = C.roc_plot(curves, tmp_path), C.pr_plot(curves, tmp_path)
    assert roc.path.read_bytes()[:8] == PNG and pr.path.read_bytes()[:8] == PNG
    yb, pb = _predictions(seed=4)
    (only,) = C.curves_for(yb, pb, ["benign", "malignant"], threshold=0.5, n_boot=50)
    assert only.name == "malignant" and only.point["kind"] == "threshold"


def test_a_class_without_positives_is_a_named_error():
    with pytest.raises(C.CurvesError, match="'mel'.*no images of it"):
        C.class_curves([0, 0, 0], [0.1, 0.2, 0.3], name="mel", n_boot=10)


# --------------------------------------------------------------------------
# from a results folder
# --------------------------------------------------------------------------


def _evaluated_folder(tmp_path, temperature=2.0, threshold=0.6):
    """A synthetic folder with what analysis.evaluate writes for the final model: predictions (calibrated, as the
    model ships them) and the record."""
    from analysis.calibration import apply_temperature
    from analysis.operating_point import binary_at

    folder = make_run_dir(tmp_path)
    y, probs = _predictions(n=80, seed=7)
    shipped = apply_temperature(probs, temperature)
    rows = pd.DataFrame({"trial": "trial_004_mobilenet_v2", "path": [f"x/{i}.png" for i in range(80)],
                         "label": np.array(["benign", "malignant"])[y], "label_index": y,
                         "predicted": np.array(["benign", "malignant"])[(shipped[:, 1] >= threshold).astype(int)],
                         "prob_benign": shipped[:, 0], "prob_malignant": shipped[:, 1]})
    other = rows.assign(trial="trial_001_mobilenet_v2", prob_benign=0.5, prob_malignant=0.5)
    pd.concat([other, rows]).to_parquet(folder / "test_predictions.parquet", index=False)
    final = {"model": "trial_004_mobilenet_v2", "models": [{
        "label": "trial_004_mobilenet_v2", "calibration": {"temperature": temperature},
        "operating_point": {"class": "malignant", "value": threshold, "rule": "youden", "target": None,
                            "at_threshold": binary_at(y == 1, probs[:, 1], threshold)}}]}
    evaluation = {"split": "test", "n": 80, "n_boot": 200, "seed": 0, "level": 0.95, "positive_class": "malignant",
                  "trials": [{"rank": 1, "trial_name": "trial_004_mobilenet_v2", "class_names": ["benign", "malignant"]}],
                  "final": final}
    (folder / "test_evaluation.json").write_text(json.dumps({"evaluations": [evaluation]}))
    return folder, y, probs


def test_the_final_models_curves_use_its_calibrated_probabilities_and_threshold(tmp_path):
    from analysis.calibration import apply_temperature

    folder, y, probs = _evaluated_folder(tmp_path)
    plots, curves, info = C.curve_plots(folder)
    (c,) = curves
    calibrated = apply_temperature(probs, 2.0)[:, 1]
    called = calibrated >= 0.6
    assert c.point["tpr"] == pytest.approx((called & (y == 1)).sum() / (y == 1).sum())
    assert c.point["fpr"] == pytest.approx((called & (y == 0)).sum() / (y == 0).sum())
    assert c.point["rule"] == "youden" and "Youden's J on validation" in C._point_label(c.point)
    assert info["model"] == "trial_004_mobilenet_v2" and info["n"] == 80 and info["n_boot"] == 200
    assert [p.path for p in plots] == [folder / "report_files" / "roc_test.png", folder / "report_files" / "pr_test.png"]
    assert all(p.path.read_bytes()[:8] == PNG for p in plots) and "\n" not in plots[0].title


def test_a_folder_without_a_final_evaluation_says_how_to_get_one(tmp_path, capsys):
    folder = make_run_dir(tmp_path)
    plots, curves, info = C.curve_plots(folder)
    assert curves == [] and info is None
    assert all(p.path is None and "python -m analysis.evaluate" in p.note for p in plots)
    assert C.main([str(folder)]) == 2 and "python -m analysis.evaluate" in capsys.readouterr().err
    assert not (folder / "report_files").exists()


def test_the_command_line_prints_the_areas_and_writes_the_pngs(tmp_path, capsys):
    folder, _, _ = _evaluated_folder(tmp_path)
    assert C.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "malignant vs rest: AUC " in out and "average precision" in out and "roc_test.png" in out
