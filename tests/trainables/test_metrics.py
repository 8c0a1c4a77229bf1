"""Reported metrics equal hand-computed values and scikit-learn on known predictions."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from trainables.metrics import classification_metrics, metric_names


def test_binary_metrics_by_hand():
    y = [0, 0, 0, 1, 1]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    m = classification_metrics(y, probs, ["benign", "malignant"])
    # predictions 0, 0, 1, 1, 0: two of three benign right, one of two malignant right
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["recall_benign"] == pytest.approx(2 / 3)
    assert m["recall_malignant"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    f1_benign = 2 * (2 / 3 * 2 / 3) / (2 / 3 + 2 / 3)  # precision 2/3, recall 2/3
    f1_malignant = 2 * (1 / 2 * 1 / 2) / (1 / 2 + 1 / 2)  # precision 1/2, recall 1/2
    assert m["macro_f1"] == pytest.approx((f1_benign + f1_malignant) / 2)
    # AUC: of the 6 (malignant, benign) pairs, the malignant score is higher in 4
    assert m["auc"] == pytest.approx(4 / 6)
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.3, 0.8, 0.3]))
    assert m["loss"] == pytest.approx(expected_loss)


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    probs = rng.dirichlet(np.ones(4), size=200)
    probs[np.arange(200), y] += 0.3  # some signal
    probs /= probs.sum(axis=1, keepdims=True)
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["loss"] == pytest.approx(skm.log_loss(y, probs))
    for i, name in enumerate(names):
        assert m[f"recall_{name}"] == pytest.approx(np.mean(pred[y == i] == i))


def test_auc_ranks_probabilities_independently_of_the_threshold():
    y = [0, 0, 1, 1]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # argmax says benign for all
    m = classification_metrics(y, probs, ["benign", "malignant"])
    assert m["accuracy"] == pytest.approx(0.5) and m["recall_malignant"] == 0.0
    assert m["auc"] == pytest.approx(1.0)


def test_auc_is_nan_for_a_single_class():
    m = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["benign", "malignant"])
    assert math.isnan(m["auc"])


def test_metric_names():
    assert metric_names(["benign", "malignant"]) == [
        "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auc",
        "val_recall_benign", "val_recall_malignant",
    ]
