"""Validation metrics computed from predicted probabilities with scikit-learn.

The metric names are checked when a study loads, so scikit-learn is imported only to compute.
"""

from __future__ import annotations

import math

import numpy as np

BASE_METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auc")


def metric_names(class_names: list[str], prefix: str = "val_") -> list[str]:
    """Every metric a trial reports for these classes, e.g. ``val_recall_malignant``."""
    return [prefix + m for m in BASE_METRICS] + [f"{prefix}recall_{c}" for c in class_names]


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Whether metric ``value`` beats ``best`` (None: nothing yet) in ``mode`` ("max" or "min"); NaN never does."""
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def classification_metrics(y_true, probs, class_names: list[str], *, positive: int | None = None,
                           predicted=None) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro F1, AUC and per-class recall.

    The decision metrics are at ``predicted`` (class indices; default the argmax
    of ``probs``); loss and AUC are from ``probs``.

    AUC is the positive class's ROC AUC for two classes (``positive`` defaults
    to the last class), else one-vs-rest macro AUC. It is NaN when ``y_true``
    holds a single class.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=int)
    eps = 1e-7
    out = {
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0)))),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "auc": _auc(y_true, probs, labels, positive),
    }
    recalls = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out.update({f"recall_{c}": float(r) for c, r in zip(class_names, recalls)})
    return out


def _auc(y_true, probs, labels, positive) -> float:
    from sklearn import metrics as skm

    if len(np.unique(y_true)) < 2:
        return math.nan
    if len(labels) == 2:
        pos = labels[-1] if positive is None else positive
        return float(skm.roc_auc_score(y_true == pos, probs[:, pos]))
    if len(np.unique(y_true)) < len(labels):
        return math.nan  # one-vs-rest needs every class present
    norm = probs / probs.sum(axis=1, keepdims=True)
    return float(skm.roc_auc_score(y_true, norm, multi_class="ovr", average="macro", labels=labels))
