"""Metrics and their percentile bootstrap intervals, over resampled images.

``point_metrics`` is ``trainables.metrics.classification_metrics`` (what the
trials report on validation) plus per-class precision and F1, at a given
decision (``predicted``; the argmax when it is not given). ``bootstrap_ci``
resamples the images ``n_boot`` times with one seed (``resample_counts``), so for
one seed every interval of an evaluation, here and in ``analysis.operating_point``
and ``analysis.curves``, is computed on the same resamples and they pair.
"""

from __future__ import annotations

import math

import numpy as np

from analysis.errors import EvaluateError

__all__ = ["LEVEL", "point_metrics", "bootstrap_ci", "resample_counts", "percentile_interval", "wilson_interval"]

LEVEL = 0.95
_CELLS_PER_CHUNK = 4_000_000  # resamples x images held in memory at once (~32 MB of float64)


def point_metrics(y_true, probs, class_names: list[str], positive: int | None, predicted=None) -> dict[str, float]:
    """``classification_metrics`` plus per-class precision and F1 (recall is already there), the decision
    metrics at ``predicted`` (default: the argmax)."""
    from sklearn.metrics import precision_recall_fscore_support

    from trainables.metrics import classification_metrics

    predicted = np.asarray(probs).argmax(axis=1) if predicted is None else np.asarray(predicted)
    out = classification_metrics(y_true, probs, class_names, positive=positive, predicted=predicted)
    precision, _, f1, _ = precision_recall_fscore_support(
        y_true, predicted, labels=list(range(len(class_names))), zero_division=0)
    for name, p, f in zip(class_names, precision, f1):
        out[f"precision_{name}"] = float(p)
        out[f"f1_{name}"] = float(f)
    return out


def bootstrap_ci(y_true, probs, class_names: list[str], *, n_boot: int = 1000, seed: int = 0,
                 positive: int | None = None, level: float = LEVEL, predicted=None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval for every metric of ``point_metrics``, resampling images (the decision
    metrics at ``predicted``, default the argmax).

    ``n_boot`` resamples of the ``n`` images (with replacement) are drawn with
    ``numpy.random.default_rng(seed)``; each metric is computed on every
    resample exactly as ``point_metrics`` would (same zero-division and
    undefined-AUC rules), then the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles are taken, ignoring resamples where a metric is undefined.
    Computed from resample counts in bulk, not image copies: 1,000 resamples
    of 2,000 images take about a second.
    """
    if n_boot < 1:
        raise EvaluateError(f"n_boot must be >= 1, got {n_boot}; use at least 1000 for a 95% interval")
    if not 0 < level < 1:
        raise EvaluateError(f"level must be in (0, 1), got {level}; e.g. 0.95")
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = probs.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=np.int64)
    parts = [_weighted_metrics(y_true, probs, predicted, counts, class_names, positive)
             for counts in resample_counts(len(y_true), n_boot, seed)]
    return {name: percentile_interval(np.concatenate([p[name] for p in parts]), level) for name in parts[0]}


def percentile_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of ``values``, ignoring NaN (resamples where a
    metric is undefined); NaN, NaN when none is defined. The one interval rule of every analysis."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    return float(np.percentile(values, 100 * (1 - level) / 2)), float(np.percentile(values, 100 * (1 + level) / 2))


def wilson_interval(k, n, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (STARD-style reporting of sensitivity, specificity,
    PPV and NPV): unlike the bootstrap it stays informative at 0/n and n/n and at small n. NaN, NaN for n = 0."""
    from scipy.stats import norm

    if not n:
        return math.nan, math.nan
    z = float(norm.ppf((1 + level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = centre - half, centre + half
    # at 0/n and n/n one end is exactly 0 or 1; rounding leaves ~1e-17 there
    return (0.0 if k == 0 else max(0.0, low)), (1.0 if k == n else min(1.0, high))


def resample_counts(n: int, n_boot: int, seed: int):
    """The bootstrap's resamples of ``n`` images, in chunks: ``counts[r, i]`` = copies of image i in resample r.

    ``n_boot`` draws of ``n`` indices with replacement from
    ``numpy.random.default_rng(seed)``; every interval of an evaluation
    (``bootstrap_ci``, ``analysis.operating_point``) uses these, so for one
    seed all are computed on the same resamples.
    """
    if n_boot < 1:
        raise EvaluateError(f"n_boot must be >= 1, got {n_boot}; use at least 1000 for a 95% interval")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CELLS_PER_CHUNK // max(n, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picks = rng.integers(0, n, size=(b, n))
        yield np.bincount((picks + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)


def _weighted_metrics(y_true: np.ndarray, probs: np.ndarray, predicted: np.ndarray, counts: np.ndarray,
                      class_names: list[str], positive: int | None) -> dict[str, np.ndarray]:
    """``point_metrics`` for many resamples at once; ``counts[r, i]`` = copies of image i in resample r."""
    k = probs.shape[1]
    w = counts.astype(np.float64)
    total = w.sum(axis=1)
    cells = np.zeros((len(y_true), k * k))
    cells[np.arange(len(y_true)), y_true * k + predicted] = 1.0
    confusion = (w @ cells).reshape(-1, k, k)  # [r, true, predicted]
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, called = confusion.sum(axis=2), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(called > 0, tp / called, 0.0)
        f1 = np.where(support + called > 0, 2 * tp / (support + called), 0.0)
        present = support > 0
        # sklearn's balanced accuracy averages recall over the classes present in y_true
        balanced = np.where(present, recall, 0.0).sum(axis=1) / present.sum(axis=1)
    nll = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0))
    out = {
        "loss": (w @ nll) / total,
        "accuracy": tp.sum(axis=1) / total,
        "balanced_accuracy": balanced,
        "macro_f1": f1.mean(axis=1),
        "auc": _weighted_auc(y_true, probs, w, present, positive),
    }
    for c, name in enumerate(class_names):
        out[f"recall_{name}"] = recall[:, c]
        out[f"precision_{name}"] = precision[:, c]
        out[f"f1_{name}"] = f1[:, c]
    return out


def _weighted_auc(y_true, probs, w, present, positive) -> np.ndarray:
    """The AUC rule of ``classification_metrics``, per resample."""
    k = probs.shape[1]
    if k == 2:
        pos = k - 1 if positive is None else positive
        auc = _binary_auc(probs[:, pos], y_true == pos, w)
        auc[present.sum(axis=1) < 2] = np.nan
        return auc
    norm = probs / probs.sum(axis=1, keepdims=True)
    auc = np.mean([_binary_auc(norm[:, c], y_true == c, w) for c in range(k)], axis=0)
    auc[~present.all(axis=1)] = np.nan  # one-vs-rest needs every class present
    return auc


def _binary_auc(score: np.ndarray, is_pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC (ties count half), which equals the trapezoidal ROC AUC."""
    order = np.argsort(score, kind="stable")
    score, is_pos, w = score[order], is_pos[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * is_pos, starts, axis=1)
    neg = np.add.reduceat(w * ~is_pos, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))

