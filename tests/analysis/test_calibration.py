"""Temperature scaling and calibration scores, on constructed predictions (numpy only: fast)."""

import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from analysis.calibration import (ECE_BINS, CalibrationError, apply_temperature, brier, ece, fit_temperature, nll,
                                  read_final_model, reliability_bins, trial_calibration)


def overconfident(n: int, k: int = 2, seed: int = 0, sharpen: float = 4.0):
    """Labels drawn from calibrated probabilities, then the probabilities sharpened: a model too sure of itself."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.0, size=(n, k))
    true_p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in true_p])
    return y, apply_temperature(true_p, 1 / sharpen), true_p


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model_and_keeps_the_argmax(k):
    y, probs, _ = overconfident(2000, k=k, seed=k)
    fit = fit_temperature(probs, y)
    calibrated = apply_temperature(probs, fit["temperature"])
    assert fit["temperature"] == pytest.approx(4.0, rel=0.15)  # it undoes the sharpening it was built with
    assert fit["nll_after"] < fit["nll_before"] - 0.1
    assert nll(calibrated, y) == pytest.approx(fit["nll_after"])
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert ece(calibrated, y) < ece(probs, y) and brier(calibrated, y) < brier(probs, y)
    assert not fit["at_bound"]


def test_a_calibrated_model_keeps_a_temperature_near_one():
    y, _, true_p = overconfident(4000, seed=3)
    fit = fit_temperature(true_p, y)
    assert fit["temperature"] == pytest.approx(1.0, abs=0.1)


def test_a_perfectly_separated_validation_set_is_flagged_at_the_bound():
    y = np.array([0, 1] * 20)
    probs = np.where(np.eye(2)[y] == 1, 0.8, 0.2)
    fit = fit_temperature(probs, y)
    assert fit["at_bound"] and fit["temperature"] == pytest.approx(0.1, rel=1e-2)


def test_scores_equal_sklearn_and_the_ece_is_the_binned_gap():
    y, probs, _ = overconfident(500, k=3, seed=1)
    assert nll(probs, y) == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-9)
    assert brier(probs, y) == pytest.approx(brier_score_loss(y, probs, labels=[0, 1, 2]), rel=1e-9)
    y2, probs2, _ = overconfident(500, k=2, seed=1)
    assert brier(probs2, y2) == pytest.approx(brier_score_loss(y2, probs2[:, 1]), rel=1e-9)  # the positive-class one

    # by hand: confidence 0.9 right 3 times of 4, 0.6 right 1 of 2 -> (4/6)|0.75-0.9| + (2/6)|0.5-0.6|
    probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2)
    y = np.array([0, 0, 0, 1, 1, 0])
    assert ece(probs, y) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1)
    bins = reliability_bins(probs, y)
    assert len(bins["count"]) == ECE_BINS and bins["count"].sum() == 6
    assert bins["count"][13] == 4 and bins["count"][8] == 2  # (13/15, 14/15] holds 0.9; (8/15, 9/15] holds 0.6
    assert np.isnan(bins["accuracy"][0])  # an empty bin has no accuracy


def test_a_bin_edge_belongs_to_the_lower_bin():
    probs = np.array([[1 / 3, 2 / 3], [0.0, 1.0]])
    bins = reliability_bins(probs, np.array([1, 1]), n_bins=3)
    assert bins["count"].tolist() == [0, 1, 1]


def test_the_final_model_record_is_read_per_trial_and_refused_for_other_classes(tmp_path):
    assert read_final_model(tmp_path) is None
    record = {"class_names": ["a", "b"], "per_trial": {"t1": {"temperature": 1.5, "threshold": None}}}
    (tmp_path / "final_model.json").write_text(json.dumps(record))
    loaded = read_final_model(tmp_path)
    assert trial_calibration(loaded, "t1", ["a", "b"]) == {"temperature": 1.5, "threshold": None}
    assert trial_calibration(loaded, "t2", ["a", "b"]) is None
    with pytest.raises(CalibrationError, match=r"classes \['a', 'b'\] but the model has \['b', 'a'\]"):
        trial_calibration(loaded, "t1", ["b", "a"])
    record["per_trial"]["t1"]["temperature"] = -1
    (tmp_path / "final_model.json").write_text(json.dumps(record))
    with pytest.raises(CalibrationError, match="per_trial.t1.temperature is -1"):
        trial_calibration(read_final_model(tmp_path), "t1", ["a", "b"])
    (tmp_path / "final_model.json").write_text("{broken")
    with pytest.raises(CalibrationError, match="unreadable .* analysis.evaluate"):
        read_final_model(tmp_path)


def test_the_diagram_draws_equal_count_bins_of_at_least_ten_images_with_wilson_intervals():
    from analysis.calibration import MIN_PER_BIN, diagram_bins

    y, probs, _ = overconfident(120, k=2, seed=3)
    bins = diagram_bins(probs, y)
    assert len(bins["count"]) == 120 // MIN_PER_BIN and bins["count"].sum() == 120
    assert bins["count"].min() >= MIN_PER_BIN and bins["count"].max() - bins["count"].min() <= 1  # equal count
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    first = np.argsort(confidence, kind="stable")[: int(bins["count"][0])]
    assert bins["accuracy"][0] == pytest.approx(correct[first].mean())
    assert (bins["low"] <= bins["accuracy"]).all() and (bins["accuracy"] <= bins["high"]).all()
    assert len(diagram_bins(probs[:15], y[:15])["count"]) == 1  # 15 images: one bin, not 15 near-empty ones


def test_the_wilson_interval_matches_its_closed_form_and_stays_inside_zero_one():
    from analysis.bootstrap import wilson_interval

    low, high = wilson_interval(8, 10)  # the textbook example: 0.4902 to 0.9433
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 12)[0] == 0.0 and 0 < wilson_interval(0, 12)[1] < 0.3  # informative at 0/n
    assert wilson_interval(12, 12)[1] == 1.0 and wilson_interval(12, 12)[0] > 0.7
    assert all(np.isnan(wilson_interval(0, 0)))
