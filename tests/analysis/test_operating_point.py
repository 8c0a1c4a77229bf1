"""The operating point: thresholds chosen on constructed validation scores, metrics and intervals at them."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from analysis.operating_point import (OperatingPointError, binary_at, binary_ci, choose_threshold, decide,
                                      one_vs_rest, one_vs_rest_ci)


def scores(n_pos=40, n_neg=60, seed=0):
    """Overlapping positive and negative scores, all distinct."""
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.normal(1.0, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)])
    return 1 / (1 + np.exp(-s)), np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


@pytest.mark.parametrize("target", [0.95, 0.9, 0.5, 0.05])
def test_a_target_sensitivity_is_met_exactly_on_validation_at_the_best_specificity(target):
    s, pos = scores()
    t = choose_threshold(s, pos, target_sensitivity=target)
    reached = t["validation"]["sensitivity"]
    assert reached == pytest.approx(np.ceil(target * 40) / 40)  # 40 positives: the smallest attainable >= target
    assert (s[pos] >= t["value"]).mean() == reached and t["rule"] == "target_sensitivity" and t["target"] == target
    above = s[s > t["value"]].min()  # the next threshold up misses the target
    assert (s[pos] >= above).mean() < target


@pytest.mark.parametrize("target", [0.95, 0.8])
def test_a_target_specificity_is_met_exactly_at_the_best_sensitivity(target):
    s, pos = scores(seed=1)
    t = choose_threshold(s, pos, target_specificity=target)
    assert t["validation"]["specificity"] == pytest.approx(np.ceil(target * 60) / 60)
    below = s[s < t["value"]].max()
    assert (s[~pos] < below).mean() < target  # one step lower loses it


def test_youden_maximises_sensitivity_plus_specificity():
    s, pos = scores(seed=2)
    t = choose_threshold(s, pos)
    best = max((s[pos] >= c).mean() + (s[~pos] < c).mean() for c in s)
    v = t["validation"]
    assert t["rule"] == "youden" and v["sensitivity"] + v["specificity"] == pytest.approx(best)


def test_metrics_at_the_threshold_equal_sklearn_and_the_interval_holds_them():
    s, pos = scores(seed=3)
    t = 0.55
    called = s >= t
    m = binary_at(pos, s, t)
    tn, fp, fn, tp = confusion_matrix(pos, called).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["sensitivity"] == pytest.approx(recall_score(pos, called))
    assert m["specificity"] == pytest.approx(recall_score(~pos, ~called))
    assert m["ppv"] == pytest.approx(precision_score(pos, called))
    assert m["npv"] == pytest.approx(precision_score(~pos, ~called))
    assert m["f1"] == pytest.approx(f1_score(pos, called))
    ci = binary_ci(pos, s, t, n_boot=500, seed=0)
    for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
        assert ci[name][0] <= m[name] <= ci[name][1], name
    assert ci == binary_ci(pos, s, t, n_boot=500, seed=0)


def test_no_called_positive_leaves_the_ppv_undefined_not_zero():
    s, pos = scores()
    m = binary_at(pos, s, 2.0)
    assert np.isnan(m["ppv"]) and m["sensitivity"] == 0 and m["specificity"] == 1


def test_one_vs_rest_at_the_argmax_with_intervals():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    out = one_vs_rest(y, predicted, ["a", "b", "c"])
    ci = one_vs_rest_ci(y, predicted, ["a", "b", "c"], n_boot=300)
    for c, name in enumerate("abc"):
        assert out[name]["sensitivity"] == pytest.approx(recall_score(y == c, predicted == c))
        assert out[name]["specificity"] == pytest.approx(recall_score(y != c, predicted != c))
        assert ci[name]["sensitivity"][0] <= out[name]["sensitivity"] <= ci[name]["sensitivity"][1]


def test_decide_calls_the_positive_class_at_its_threshold_else_the_best_other():
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.3, 0.35, 0.35]])
    assert decide(probs, 1, 0.3).tolist() == [1, 0, 1]
    assert decide(probs, 1, 0.9).tolist() == [0, 0, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({"target_sensitivity": 1.0}, "--target-sensitivity must be strictly between 0 and 1, got 1.0"),
    ({"target_sensitivity": 0}, "--target-sensitivity must be strictly between 0 and 1, got 0"),
    ({"target_specificity": -0.5}, "--target-specificity must be strictly between 0 and 1"),
    ({"target_sensitivity": 0.9, "target_specificity": 0.9}, "not both"),
])
def test_bad_targets_are_named(kwargs, match):
    s, pos = scores()
    with pytest.raises(OperatingPointError, match=match):
        choose_threshold(s, pos, **kwargs)


def test_a_validation_set_without_positives_cannot_set_a_threshold():
    with pytest.raises(OperatingPointError, match="no images of the positive class"):
        choose_threshold(np.array([0.1, 0.2]), np.array([False, False]))
