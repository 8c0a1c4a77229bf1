"""The operating point: a decision threshold for one positive class, chosen on validation.

A model's argmax is one operating point among many. A screening test wants a
stated sensitivity for the positive class (``malignant``, ``mel``); a
confirmatory one a stated specificity. ``choose_threshold`` picks the
threshold on the validation split's (calibrated) positive-class probability:

- ``target_sensitivity S``: the highest threshold whose validation sensitivity
  is at least ``S`` (so the best specificity that keeps the target);
- ``target_specificity S``: the lowest threshold whose validation specificity
  is at least ``S`` (the best sensitivity that keeps it);
- neither: Youden's J, the threshold maximising sensitivity + specificity - 1
  (ties to the higher sensitivity).

A threshold is one of the validation scores (scikit-learn's ``roc_curve``
convention) and the rule is ``positive iff score >= threshold``, so the
target is met on validation exactly as stated; on test it is measured, not
promised (``sensitivity`` at that threshold, with its interval).

For more than two classes, ``decide`` calls the positive class when its
probability reaches the threshold and otherwise the most probable other class.

Test metrics at the threshold (sensitivity, specificity, PPV, NPV, F1 and the
confusion counts) come with percentile bootstrap intervals drawn from
``analysis.evaluate.resample_counts``: the same resamples (and seed) as every
other interval of the evaluation, so they are paired with them.
"""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import percentile_interval, resample_counts, wilson_interval

__all__ = ["BINARY_METRICS", "OperatingPointError", "binary_at", "binary_ci", "weighted_binary", "wilson_intervals", "choose_threshold", "decide",
           "one_vs_rest", "one_vs_rest_ci", "rule_text"]

BINARY_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")


class OperatingPointError(ValueError):
    """A target or class that cannot define an operating point. The message names the flag, the value and the fix."""


# --------------------------------------------------------------------------
# choosing the threshold (validation only)
# --------------------------------------------------------------------------


def check_target(flag: str, value: float | None) -> None:
    """A target must lie strictly between 0 and 1: 0 asks nothing, 1 asks every positive of every future set."""
    if value is not None and not 0 < value < 1:
        raise OperatingPointError(f"{flag} must be strictly between 0 and 1, got {value}; e.g. {flag} 0.95")


def choose_threshold(scores, is_positive, *, target_sensitivity: float | None = None,
                     target_specificity: float | None = None) -> dict:
    """The threshold on ``scores`` (validation) for the rule above; with what it reached on validation.

    Returns ``value``, ``rule`` (``target_sensitivity``, ``target_specificity``
    or ``youden``), ``target`` (or None) and ``validation``: the
    ``binary_at`` metrics at ``value`` on these scores.
    """
    from sklearn.metrics import roc_curve

    check_target("--target-sensitivity", target_sensitivity)
    check_target("--target-specificity", target_specificity)
    if target_sensitivity is not None and target_specificity is not None:
        raise OperatingPointError("give --target-sensitivity or --target-specificity, not both: one threshold "
                                  "cannot promise both on new images")
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        raise OperatingPointError(f"the validation split holds {'only' if is_positive.all() else 'no'} images of "
                                  "the positive class; a threshold needs both positives and negatives there")
    fpr, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    # roc_curve's first threshold is +inf (nothing positive); a finite one just above the top score does the same
    thresholds = thresholds.copy()
    thresholds[0] = np.nextafter(scores.max(), np.inf)
    sensitivity, specificity = tpr, 1.0 - fpr  # thresholds descend, so sensitivity rises along the arrays
    if target_sensitivity is not None:
        i = int(np.flatnonzero(sensitivity >= target_sensitivity - 1e-12)[0])  # highest threshold reaching it
        rule, target = "target_sensitivity", target_sensitivity
    elif target_specificity is not None:
        i = int(np.flatnonzero(specificity >= target_specificity - 1e-12)[-1])  # lowest threshold keeping it
        rule, target = "target_specificity", target_specificity
    else:
        j = sensitivity + specificity - 1.0
        i = int(np.flatnonzero(j >= j.max() - 1e-12)[-1])  # ties: the lower threshold, the higher sensitivity
        rule, target = "youden", None
    value = float(thresholds[i])
    return {"value": value, "rule": rule, "target": target, "validation": binary_at(is_positive, scores, value)}


def rule_text(threshold: dict) -> str:
    """``target sensitivity 0.95 on validation``, ``Youden's J on validation``."""
    rule = threshold.get("rule")
    if rule == "youden":
        return "Youden's J on validation"
    if rule in ("target_sensitivity", "target_specificity"):
        return f"{rule.replace('_', ' ')} {threshold.get('target')} on validation"
    return str(rule or "given")


# --------------------------------------------------------------------------
# deciding
# --------------------------------------------------------------------------


def decide(probs, positive: int, threshold: float) -> np.ndarray:
    """Class indices: ``positive`` where its probability reaches ``threshold``, else the most probable other class."""
    probs = np.asarray(probs, dtype=np.float64)
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


# --------------------------------------------------------------------------
# metrics at the threshold, with intervals
# --------------------------------------------------------------------------


def binary_at(is_positive, scores, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1 and ``tp``/``fp``/``tn``/``fn`` for ``score >= threshold``.

    A ratio with an empty denominator (no predicted positives for PPV) is NaN: undefined, not 0.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    counts = np.ones((1, len(is_positive)))
    values = weighted_binary(is_positive, called, counts)
    return {name: float(v[0]) if name in BINARY_METRICS else int(v[0]) for name, v in values.items()}


def binary_ci(is_positive, scores, threshold: float, *, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``binary_at``'s ratios, over the evaluation's shared resamples."""
    is_positive = np.asarray(is_positive, dtype=bool)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    parts = [weighted_binary(is_positive, called, counts)
             for counts in resample_counts(len(is_positive), n_boot, seed)]
    return _percentiles(parts, BINARY_METRICS, level)


def wilson_intervals(at: dict, level: float) -> dict[str, list[float]]:
    """Wilson intervals of sensitivity, specificity, PPV and NPV from the confusion counts at the threshold."""
    tp, fn, fp, tn = at["tp"], at["fn"], at["fp"], at["tn"]
    return {name: list(wilson_interval(k, n, level)) for name, k, n in
            (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn))}


def one_vs_rest(y_true, predicted, class_names: list[str]) -> dict[str, dict]:
    """Per class, that class against the rest at the given predictions (e.g. the argmax): ``binary_at``'s metrics."""
    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    counts = np.ones((1, len(y_true)))
    out = {}
    for c, name in enumerate(class_names):
        values = weighted_binary(y_true == c, predicted == c, counts)
        out[name] = {m: float(v[0]) if m in BINARY_METRICS else int(v[0]) for m, v in values.items()}
    return out


def one_vs_rest_ci(y_true, predicted, class_names: list[str], *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, dict[str, tuple[float, float]]]:
    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    parts: dict[str, list] = {name: [] for name in class_names}
    for counts in resample_counts(len(y_true), n_boot, seed):
        for c, name in enumerate(class_names):
            parts[name].append(weighted_binary(y_true == c, predicted == c, counts))
    return {name: _percentiles(parts[name], BINARY_METRICS, level) for name in class_names}


def weighted_binary(is_positive: np.ndarray, called: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics for many resamples at once; ``counts[r, i]`` = copies of image i in resample r."""
    w = counts.astype(np.float64)
    tp, fn = w @ (is_positive & called), w @ (is_positive & ~called)
    fp, tn = w @ (~is_positive & called), w @ (~is_positive & ~called)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _percentiles(parts: list[dict], names, level: float) -> dict[str, tuple[float, float]]:
    return {name: percentile_interval(np.concatenate([p[name] for p in parts]), level) for name in names}
