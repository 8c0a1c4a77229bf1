"""Temperature scaling fitted on validation, calibration scores, and the ``final_model.json`` record.

A classifier's softmax outputs are often over-confident. Temperature scaling
(Guo et al., 2017) divides the model's logits by one number ``T`` fitted on
the validation split by minimising the negative log-likelihood: ``T > 1``
softens the probabilities, ``T < 1`` sharpens them, and the argmax (so every
argmax metric) never changes. The models store softmax probabilities, not
logits; ``log p`` serves as the logits, since softmax ignores a constant added
to every logit of an image.

Scores (all on probabilities, lower is better):

- ``nll``: mean negative log-likelihood of the true class (probabilities clipped at 1e-7,
  as ``trainables.metrics`` computes ``loss``);
- ``ece``: expected calibration error of the top-label confidence, over
  ``ECE_BINS`` = 15 equal-width bins ``(i/15, (i+1)/15]``: the share of images in a
  bin times the gap between its accuracy and its mean confidence, summed;
- ``brier``: mean over images of the squared distance between the probability
  vector and the one-hot label; halved for two classes, so it equals the usual
  positive-class Brier score (scikit-learn's ``brier_score_loss`` convention).

``final_model.json`` in the results folder is the one record of what was
fitted on validation for the final model (written by ``analysis.evaluate``):
its trials, test-time augmentation, temperature and decision threshold, and
the same per trial, which ``search.predict`` applies to the trial it uses.
Read it with ``read_final_model``; ``trial_calibration`` gives one trial's part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from analysis.files import FINAL_MODEL

__all__ = ["ECE_BINS", "FINAL_MODEL", "T_BOUNDS", "CalibrationError", "apply_temperature", "brier",
           "calibration_scores", "diagram_bins", "MIN_PER_BIN", "ece", "fit_temperature", "nll", "read_final_model", "reliability_bins",
           "trial_calibration"]

ECE_BINS = 15
T_BOUNDS = (0.1, 10.0)  # a fitted T at a bound means the validation set could not pin it down
_EPS = 1e-7  # the clip of trainables.metrics' loss
_LOG_FLOOR = 1e-12  # log(0) would make a logit of -inf


class CalibrationError(ValueError):
    """A stored calibration record is unusable. The message names the file, the field and the fix."""


# --------------------------------------------------------------------------
# temperature scaling
# --------------------------------------------------------------------------


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)``, row by row; ``temperature`` 1 returns the (renormalised) input."""
    probs = np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(probs, _LOG_FLOOR, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)  # exp of large logits would overflow
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(probs, y_true) -> dict:
    """The temperature that minimises the NLL of ``y_true`` under ``probs`` (validation predictions).

    Minimises over ``log T`` in ``log(T_BOUNDS)`` with
    ``scipy.optimize.minimize_scalar`` (bounded): the NLL is smooth in
    ``log T`` and one-dimensional, so this finds the optimum to ~1e-5 in a few
    dozen evaluations. Returns ``temperature``, ``nll_before``, ``nll_after``,
    ``n`` and ``at_bound`` (True when the optimum lies at a bound, e.g. on a
    validation set the model separates perfectly, where the NLL keeps falling
    as ``T`` goes to 0: such a temperature is not a measurement).
    """
    from scipy.optimize import minimize_scalar

    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("no validation predictions to fit a temperature on")
    low, high = (math.log(b) for b in T_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(apply_temperature(probs, math.exp(log_t)), y_true),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    temperature = float(math.exp(result.x))
    before, after = nll(probs, y_true), nll(apply_temperature(probs, temperature), y_true)
    if after > before:  # never worse than leaving the model as it is (T = 1 is inside the bounds)
        temperature, after = 1.0, nll(apply_temperature(probs, 1.0), y_true)
    at_bound = min(abs(result.x - low), abs(result.x - high)) < 1e-3
    return {"temperature": temperature, "nll_before": before, "nll_after": after, "n": int(len(y_true)),
            "at_bound": bool(at_bound)}


# --------------------------------------------------------------------------
# calibration scores
# --------------------------------------------------------------------------


def nll(probs, y_true) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], _EPS, 1.0))))


def brier(probs, y_true) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    onehot = np.eye(probs.shape[1])[y_true]
    score = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    return score / 2 if probs.shape[1] == 2 else score


def reliability_bins(probs, y_true, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin ``(i/n, (i+1)/n]``: ``count``, mean ``confidence``, ``accuracy``
    (NaN for an empty bin), and the bin ``edges``."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": mean_conf,
            "accuracy": accuracy}


MIN_PER_BIN = 10  # images per bin of the reliability diagram: fewer make a bin's accuracy noise


def diagram_bins(probs, y_true, min_per_bin: int = MIN_PER_BIN, max_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """The reliability diagram's bins: equal-count (each about ``n / k`` images, at least ``min_per_bin``; at most
    ``max_bins``), so a small test set draws few well-filled bins instead of 15 mostly empty ones. Per bin:
    ``count``, mean ``confidence``, ``accuracy`` and its Wilson interval ``low``/``high``, and the ``edges``."""
    from analysis.bootstrap import wilson_interval

    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true, dtype=np.int64)
    k = int(max(1, min(max_bins, len(confidence) // min_per_bin)))
    order = np.argsort(confidence, kind="stable")
    groups = [g for g in np.array_split(order, k) if len(g)]
    edges = [0.0] + [float(confidence[g].max()) for g in groups[:-1]] + [1.0]
    count = np.array([len(g) for g in groups], dtype=np.float64)
    hits = np.array([correct[g].sum() for g in groups], dtype=np.float64)
    intervals = np.array([wilson_interval(h, c) for h, c in zip(hits, count)]).reshape(-1, 2)
    return {"edges": np.array(edges), "count": count, "confidence": np.array([confidence[g].mean() for g in groups]),
            "accuracy": hits / count, "low": intervals[:, 0], "high": intervals[:, 1]}


def ece(probs, y_true, n_bins: int = ECE_BINS) -> float:
    bins = reliability_bins(probs, y_true, n_bins)
    filled = bins["count"] > 0
    share = bins["count"][filled] / bins["count"].sum()
    return float(np.sum(share * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])))


def calibration_scores(probs, y_true) -> dict[str, float]:
    """``nll``, ``ece`` and ``brier`` of one set of predictions."""
    return {"nll": nll(probs, y_true), "ece": ece(probs, y_true), "brier": brier(probs, y_true)}


# --------------------------------------------------------------------------
# the final_model.json record
# --------------------------------------------------------------------------


def read_final_model(run_dir: str | Path) -> dict | None:
    """``RUN_DIR/final_model.json``, or None when there is none (no final evaluation has run yet)."""
    path = Path(run_dir) / FINAL_MODEL
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{str(path)!r} is unreadable ({exc}); run python -m analysis.evaluate "
                               f"{run_dir} again to rewrite it") from None
    if not isinstance(record, dict) or not isinstance(record.get("per_trial"), dict):
        raise CalibrationError(f"{str(path)!r} has no 'per_trial' record; run python -m analysis.evaluate "
                               f"{run_dir} again to rewrite it")
    return record


def trial_calibration(record: dict | None, trial: str, class_names: list[str]) -> dict | None:
    """What was fitted on validation for ``trial`` alone: ``temperature`` and ``threshold`` (or None).

    None when ``record`` is None or does not cover ``trial``. A record made for
    other classes (another study copied in) is refused, naming both.
    """
    if record is None:
        return None
    if list(record.get("class_names") or []) != list(class_names):
        raise CalibrationError(f"{FINAL_MODEL} was fitted for classes {record.get('class_names')} but the model "
                               f"has {class_names}; run python -m analysis.evaluate on this results folder again")
    entry = record["per_trial"].get(trial)
    if entry is None:
        return None
    temperature = entry.get("temperature")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise CalibrationError(f"{FINAL_MODEL}: per_trial.{trial}.temperature is {temperature!r}, not a positive "
                               "number; run python -m analysis.evaluate again to rewrite it")
    return {"temperature": float(temperature), "threshold": entry.get("threshold")}
