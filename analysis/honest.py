"""What the chosen model will score on new images: its validation score, corrected for having been chosen.

The final model is the best of many on validation: trials ranked by their validation
score, then the single best, an ensemble or test-time augmentation chosen on
validation again. Its validation score is the maximum of noisy estimates, so it is
biased up, the more so the more candidates and the fewer validation images (a
624-image X-ray study: best validation 0.975 on 94 images, test 0.872).

Bootstrap bias-corrected validation (BBC; Tsamardinos, Greasidou and Borboudakis,
Machine Learning 107, 2018) repeats the whole choice on bootstrap resamples of
the validation images and scores each resample's winner on the images that
resample left out: the mean of those out-of-bag scores estimates what the
selection procedure's model scores on images it was not chosen on. The interval
is the chosen model's own percentile bootstrap interval on validation, moved down
by the optimism that estimate measures: the out-of-bag scores' own percentiles
(kept as ``oob_ci``) rest on a third of the images each and are too wide
(benchmarks/honest_coverage.py, docs/honest-estimate.md: they covered the
external score in 98-100% of studies at 95%, the moved interval in 94-98%). No
model is retrained and the test split is not
read: it uses the validation predictions the evaluation already has, and those of
the other ranked trials (``MAX_PREDICTIONS`` bounds what is computed for them).

What it does not see: each trial's best epoch was also chosen on validation
(the checkpoint is that epoch's), so the correction is, if anything, too small.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_PREDICTIONS", "METHOD", "other_trials_predictions", "selection_corrected", "selection_estimate"]

# Validation images x trials predicted for the trials the evaluation did not load (one pass each, no TTA).
MAX_PREDICTIONS = 200_000
METHOD = "bootstrap bias-corrected validation (BBC, Tsamardinos et al. 2018): out-of-bag score of each resample's winner"
_FAST = ("accuracy", "balanced_accuracy", "macro_f1")


def selection_corrected(probs: dict[str, np.ndarray], y, metric: str, mode: str, class_names: list[str], *,
                        positive: int | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """BBC of choosing the best of ``probs`` (label -> validation probabilities) by ``metric`` (at the argmax).

    Returns ``estimate`` (the mean out-of-bag score of the resamples' winners), ``ci`` (the chosen
    candidate's percentile interval at ``level``, moved by ``validation - estimate``), ``oob_ci`` (the
    out-of-bag scores' percentiles), ``validation`` (the best candidate's score on all of ``y``, as
    chosen), ``optimism`` (how much better validation looks than the estimate, in the metric's
    direction), ``chosen`` (that candidate), ``candidates`` and ``n``.
    """
    from analysis.bootstrap import resample_counts

    y = np.asarray(y, dtype=int)
    labels = list(probs)
    stacked = np.stack([np.asarray(probs[name], dtype=np.float64) for name in labels])  # (M, n, C)
    predicted = stacked.argmax(axis=2)
    sign = 1.0 if mode == "max" else -1.0
    full = np.array([_score(metric, y, stacked[j], predicted[j], np.ones(len(y)), class_names, positive)
                     for j in range(len(labels))])
    chosen = int(np.nanargmax(sign * full)) if np.isfinite(full).any() else 0
    oob_scores, chosen_scores = [], []
    for counts in resample_counts(len(y), n_boot, seed):
        for w in counts:
            out = (w == 0).astype(np.float64)
            if out.sum() == 0:
                continue
            inside = np.array([_score(metric, y, stacked[j], predicted[j], w, class_names, positive)
                               for j in range(len(labels))])
            if not np.isfinite(inside).any():
                continue
            chosen_scores.append(inside[chosen])
            winner = int(np.nanargmax(sign * inside))
            oob_scores.append(_score(metric, y, stacked[winner], predicted[winner], out, class_names, positive))
    scores = np.array([s for s in oob_scores if math.isfinite(s)])
    own = np.array([s for s in chosen_scores if math.isfinite(s)])
    q = ((1 - level) / 2, (1 + level) / 2)
    estimate = float(scores.mean()) if len(scores) else math.nan
    oob_ci = [float(v) for v in np.quantile(scores, q)] if len(scores) else [math.nan, math.nan]
    shift = float(full[chosen]) - estimate
    ci = [float(v) - shift for v in np.quantile(own, q)] if len(own) and math.isfinite(shift) else [math.nan, math.nan]
    return {"metric": metric, "validation": float(full[chosen]), "estimate": estimate, "ci": ci, "oob_ci": oob_ci,
            "level": level, "optimism": shift * sign, "chosen": labels[chosen],
            "candidates": len(labels), "labels": labels, "n": int(len(y)), "n_boot": int(len(scores)), "method": METHOD}


def selection_estimate(ev, val: dict, candidates, y_val, extra: dict[str, np.ndarray]) -> dict:
    """``selection_corrected`` for an evaluation ``ev`` (``analysis.evaluate``): every candidate it chose among,
    and ``extra``: plain validation probabilities of the ranked trials it did not load (``other_trials_predictions``).

    Where the final model was given (``--ensemble 3 --tta flips``), not chosen, the only choice made on
    validation is the trials' ranking: then the candidates are the trials alone (``over``: "trials")."""
    chosen = ev.plan.chosen_on_validation
    probs = {name: val[(name, "none")] for name in ev.names}  # every loaded trial, plain: a candidate trial keeps its name
    if chosen:
        probs.update({c.label: c.probs(val) for c in candidates})
    probs.update({name: p for name, p in extra.items() if name not in probs})
    result = selection_corrected(probs, y_val, ev.metric, ev.study.get("mode", "max"), ev.classes,
                                 positive=ev.positive_for_auc, n_boot=ev.n_boot, seed=ev.seed, level=ev.level)
    result["trials"] = len(ev.models) + len(extra)
    result["over"] = "candidates" if chosen else "trials"
    return result


def other_trials_predictions(ev, predict) -> dict[str, np.ndarray]:
    """Plain validation probabilities of the ranked trials ``ev`` did not load, best first, while
    ``MAX_PREDICTIONS`` allows. ``predict(models)``: ``analysis.evaluate.validation_predictions`` for
    ``Loaded`` models, called one model at a time so that only one extra model is held at once."""
    from analysis.errors import ResultsFolderError
    from analysis.reader import Loaded, load_trial_model, ranked_trials, trial_from_row

    ranked, _ = ranked_trials(ev.run_dir, ev.study)
    loaded = set(ev.names)
    rest = [row for _, row in ranked.iterrows() if row["trial_name"] not in loaded]
    room = max(0, MAX_PREDICTIONS // max(len(ev.val_rows), 1) - len(loaded))
    if len(rest) > room:
        ev.log(f"note: the selection correction leaves out {len(rest) - room} lower-ranked trial(s) "
               f"(MAX_PREDICTIONS {MAX_PREDICTIONS:,} validation predictions), so it is a little too small")
    out = {}
    for row in rest[:room]:
        try:
            trial = trial_from_row(ev.run_dir, ev.study, row)
            model, class_names, size = load_trial_model(trial, ev.run_dir, ev.study)
        except ResultsFolderError as exc:
            ev.log(f"note: {row['trial_name']} left out of the selection correction ({exc})")
            continue
        if class_names == ev.classes:
            out.update({name: p for (name, _), p in predict([Loaded(row, trial, model, class_names, size)]).items()})
        del model
    if out:
        ev.log(f"note: {len(out)} more ranked trial(s) predicted on validation for the selection correction "
               "(cached in val_predictions_cache.parquet)")
    return out


def _score(metric: str, y, probs, predicted, w, class_names, positive) -> float:
    """``metric`` of ``predicted`` (and ``probs``) with image weights ``w``, as ``classification_metrics``
    computes it unweighted; the decision metrics from the weighted confusion matrix (fast)."""
    k = len(class_names)
    if metric in _FAST or metric.startswith("recall_"):
        cm = np.bincount(y * k + predicted, weights=w, minlength=k * k).reshape(k, k)
        support, called, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
        total = cm.sum()
        if total == 0:
            return math.nan
        recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
        if metric == "accuracy":
            return float(hits.sum() / total)
        if metric == "balanced_accuracy":
            return float(recall[support > 0].mean())  # sklearn: the classes present
        if metric == "macro_f1":
            precision = np.divide(hits, called, out=np.zeros(k), where=called > 0)
            denominator = precision + recall
            return float(np.divide(2 * precision * recall, denominator, out=np.zeros(k), where=denominator > 0).mean())
        name = metric.removeprefix("recall_")
        return float(recall[class_names.index(name)]) if name in class_names else math.nan
    keep = w > 0
    if metric == "loss":
        p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
        return float(np.average(-np.log(p[keep]), weights=w[keep]))
    if metric == "auc":
        from sklearn.metrics import roc_auc_score

        yk, pk, wk = y[keep], probs[keep], w[keep]
        if len(np.unique(yk)) < 2:
            return math.nan
        if k == 2:
            pos = k - 1 if positive is None else positive
            return float(roc_auc_score(yk == pos, pk[:, pos], sample_weight=wk))
        if len(np.unique(yk)) < k:
            return math.nan
        return float(roc_auc_score(yk, pk / pk.sum(axis=1, keepdims=True), multi_class="ovr", sample_weight=wk))
    return math.nan
