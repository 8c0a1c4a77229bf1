"""The selection-corrected estimate (analysis.honest): validation selection flatters; BBC says by how much."""

import numpy as np
import pytest

from analysis.honest import _score, selection_corrected
from trainables.metrics import classification_metrics

CLASSES = ["benign", "malignant"]


def noisy_models(rng, y, n_models: int, skill: float):
    """Models that are each right on an image with probability ``skill``, independently: equally good."""
    out = {}
    for j in range(n_models):
        right = rng.random(len(y)) < skill
        called = np.where(right, y, 1 - y)
        p = np.where(called == 1, 0.8, 0.2)
        out[f"m{j}"] = np.stack([1 - p, p], axis=1)
    return out


def test_the_best_of_many_equal_models_is_corrected_down_to_what_they_score():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    models = noisy_models(rng, y, 30, 0.70)  # every model's true accuracy is 0.70
    result = selection_corrected(models, y, "accuracy", "max", CLASSES, n_boot=300, seed=0)
    assert result["validation"] > 0.76  # the winner of 30 looks better than any model is
    assert result["estimate"] < result["validation"] - 0.04 and result["optimism"] > 0.04
    assert abs(result["estimate"] - 0.70) < 0.04  # BBC lands near the truth
    low, high = result["ci"]
    assert low < 0.70 < high
    assert result["candidates"] == 30 and result["n"] == 120 and result["n_boot"] == 300
    # The interval is the chosen model's own bootstrap interval, moved down by the optimism
    from analysis.bootstrap import bootstrap_ci

    own = bootstrap_ci(y, models[result["chosen"]], CLASSES, n_boot=300, seed=0)["accuracy"]
    shift = result["validation"] - result["estimate"]
    assert result["ci"] == pytest.approx([own[0] - shift, own[1] - shift], abs=1e-9)
    oob_low, oob_high = result["oob_ci"]
    assert oob_high - oob_low > high - low  # out of bag, a third of the images each: wider


def test_one_candidate_needs_almost_no_correction():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    models = noisy_models(rng, y, 1, 0.8)
    result = selection_corrected(models, y, "accuracy", "max", CLASSES, n_boot=300, seed=0)
    assert abs(result["optimism"]) < 0.01


def test_a_clearly_better_model_is_chosen_and_its_score_stands():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    models = noisy_models(rng, y, 5, 0.6)
    models.update({"best": noisy_models(rng, y, 1, 0.95)["m0"]})
    result = selection_corrected(models, y, "balanced_accuracy", "max", CLASSES, n_boot=300, seed=0)
    assert result["chosen"] == "best" and abs(result["optimism"]) < 0.02


def test_a_loss_is_minimised():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    models = noisy_models(rng, y, 10, 0.7)
    result = selection_corrected(models, y, "loss", "min", CLASSES, n_boot=200, seed=0)
    assert result["estimate"] > result["validation"] and result["optimism"] > 0  # the best loss flatters too


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "macro_f1", "recall_malignant", "loss", "auc"])
def test_unit_weights_give_the_trainers_own_metric(metric):
    """The fast weighted scores agree with trainables.metrics (what the leaderboard and selection use)."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    names = ["a", "b", "malignant"]
    expected = classification_metrics(y, probs, names)[metric]
    assert _score(metric, y, probs, probs.argmax(1), np.ones(90), names, None) == pytest.approx(expected, abs=1e-9)
    # and integer weights are copies of images
    w = rng.integers(0, 3, 90).astype(float)
    rows = np.repeat(np.arange(90), w.astype(int))
    copied = classification_metrics(y[rows], probs[rows], names)[metric]
    assert _score(metric, y, probs, probs.argmax(1), w, names, None) == pytest.approx(copied, abs=1e-9)
