"""Choosing the final model on validation: the plan, the ensemble size per family, temperature and threshold.

Everything here reads validation predictions only. ``plan_final`` checks every
option against the study before any model loads; ``ensemble_sizes`` picks the
ensemble size separately for the plain and the test-time-augmented family;
``fit_on_validation`` fits a temperature (``analysis.calibration``) and then a
threshold (``analysis.operating_point``); ``choose_final`` takes the candidate
the options ask for, or with an ``auto`` option the best on validation;
``final_model_record`` is the content of ``final_model.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import operating_point as op
from analysis.bootstrap import point_metrics
from analysis.calibration import ECE_BINS, T_BOUNDS, apply_temperature, fit_temperature
from analysis.errors import EvaluateError
from analysis.final_model import TTA_MODES, combine
from analysis.splits import now

__all__ = ["TTA_AUTO", "TTA_AUTO_MODE", "AUTO_ENSEMBLE_MAX", "CHOSEN_ON_VALIDATION", "FinalPlan", "Candidate",
           "parse_ensemble", "plan_final", "choose_ensemble_size", "ensemble_sizes", "candidates_for",
           "fit_on_validation", "choose_final", "say_choice", "final_model_record", "per_trial_entry"]

TTA_AUTO = "auto"  # --tta auto: with and without dihedral TTA, whichever scores higher on validation
TTA_AUTO_MODE = "dihedral"
AUTO_ENSEMBLE_MAX = 5  # --ensemble auto tries the top 1..5 trials


def parse_ensemble(value) -> int | str | None:
    """``--ensemble``: None (the single best), a number of top trials >= 1, or ``"auto"`` (chosen on validation)."""
    if value is None or value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvaluateError(f"--ensemble must be a number of trials (>= 1) or 'auto', got {value!r}") from None
    if number < 1 or str(number) != str(value).strip():
        raise EvaluateError(f"--ensemble must be a number of trials (>= 1) or 'auto', got {value!r}")
    return number


@dataclass(frozen=True)
class FinalPlan:
    """What the final stage fits and scores, checked against the folder before any model is loaded."""

    ensemble: int | str | None
    tta: str | None
    positive: int | None  # index of the class a threshold is chosen for; None: argmax only
    target_sensitivity: float | None
    target_specificity: float | None
    n_members_max: int  # trials the ensemble may draw on

    @property
    def tta_mode(self) -> str | None:
        """The test-time views the TTA candidates use (``--tta auto`` tries dihedral)."""
        return TTA_AUTO_MODE if self.tta == TTA_AUTO else self.tta

    @property
    def chosen_on_validation(self) -> bool:
        """Whether the final model is the candidate that scores best on validation (an ``auto`` option), rather
        than exactly the combination asked for."""
        return self.ensemble == "auto" or self.tta == TTA_AUTO


def plan_final(study: dict, class_names: list[str], n_with_checkpoint: int, run_dir: Path, *, ensemble=None,
               tta: str | None = None, target_sensitivity: float | None = None,
               target_specificity: float | None = None, positive_class: str | None = None) -> FinalPlan:
    """Every option of the final stage checked against the study: a named error before any work."""
    ensemble = parse_ensemble(ensemble)
    if tta is not None and tta not in (*TTA_MODES, TTA_AUTO):
        raise EvaluateError(f"--tta must be one of {', '.join((*TTA_MODES, TTA_AUTO))}, got {tta!r}")
    try:
        op.check_target("--target-sensitivity", target_sensitivity)
        op.check_target("--target-specificity", target_specificity)
    except op.OperatingPointError as exc:
        raise EvaluateError(str(exc)) from None
    if target_sensitivity is not None and target_specificity is not None:
        raise EvaluateError("give --target-sensitivity or --target-specificity, not both: one threshold cannot "
                            "promise both on new images")
    if n_with_checkpoint == 0:
        raise EvaluateError(f"no trial of {str(run_dir)!r} has a checkpoint (leaderboard.parquet records none); "
                            "a trial saves one after its first epoch: let the study run (python -m search.run "
                            "STUDY_FILE --resume) before evaluating it")
    if isinstance(ensemble, int) and ensemble > n_with_checkpoint:
        raise EvaluateError(f"--ensemble {ensemble}: only {n_with_checkpoint} trial(s) of {str(run_dir)!r} have a "
                            f"checkpoint; use --ensemble {n_with_checkpoint} or less, or --ensemble auto")
    if positive_class is not None:  # by class_name: 'bénin' typed in NFC names the class a folder gave in NFD
        from trainables.datasets._registry import class_name

        same = [c for c in class_names if class_name(c) == class_name(positive_class)]
        if not same:
            from trainables.checks import unknown_name_message

            raise EvaluateError("--positive-class: " + unknown_name_message("class", positive_class, class_names))
        positive_class = same[0]
    target = target_sensitivity is not None or target_specificity is not None
    if len(class_names) == 2:
        name = positive_class or study.get("dataset", {}).get("positive_class")
        positive = class_names.index(name) if name in class_names else 1
    elif positive_class is not None:
        positive = class_names.index(positive_class)
    elif target:
        flag = "--target-sensitivity" if target_sensitivity is not None else "--target-specificity"
        raise EvaluateError(f"{flag} is for one positive class against the rest, and the study has "
                            f"{len(class_names)} classes {class_names}; name it with --positive-class "
                            f"(e.g. --positive-class {class_names[0]}), or leave the target out for per-class "
                            "one-vs-rest sensitivity and specificity at the argmax")
    else:
        positive = None
    n_members = ensemble if isinstance(ensemble, int) else min(AUTO_ENSEMBLE_MAX, n_with_checkpoint) \
        if ensemble == "auto" else 1
    return FinalPlan(ensemble, tta, positive, target_sensitivity, target_specificity, n_members)


@dataclass(frozen=True)
class Candidate:
    """One model the final stage may ship: the mean of ``members``' probabilities over the views of ``tta``."""

    label: str
    members: tuple[str, ...]
    tta: str | None

    def probs(self, predictions: dict) -> np.ndarray:
        """Its uncalibrated probabilities, from per-(trial, view) predictions."""
        return combine([predictions[(n, self.tta or "none")] for n in self.members], None)


def choose_ensemble_size(member_probs: list[np.ndarray], y_val, class_names: list[str], study: dict,
                         positive: int | None) -> tuple[int, dict[int, float]]:
    """The k (1..len(member_probs)) whose mean of the top-k validation probabilities scores best on the study's
    metric; ties go to the lower validation loss, then to the smaller k. Returns k and each k's score."""
    metric = str(study.get("metric", "val_balanced_accuracy")).removeprefix("val_")
    mode = study.get("mode", "max")
    scores, keys = {}, {}
    for k in range(1, len(member_probs) + 1):
        values = point_metrics(y_val, np.mean(member_probs[:k], axis=0), class_names, positive)
        score = values.get(metric, math.nan)
        scores[k] = score
        bad = math.inf if math.isnan(score) else (-score if mode == "max" else score)
        keys[k] = (bad, values["loss"], k)
    return min(keys, key=keys.get), scores


def ensemble_sizes(plan: FinalPlan, names: list[str], val: dict, y_val, classes: list[str], study: dict,
                   positive: int | None, log=print) -> dict[str, dict]:
    """The ensemble size of each family: ``"none"`` (no TTA) and, with TTA, its mode; each chosen on that
    family's own validation predictions (``--ensemble auto``), or the size given."""
    families = ["none"] + ([plan.tta_mode] if plan.tta_mode else [])
    out = {}
    for family in families:
        if plan.ensemble == "auto":
            pool = names[:plan.n_members_max]
            k, scores = choose_ensemble_size([val[(n, family)] for n in pool], y_val, classes, study, positive)
            out[family] = {"k": k, "chosen": f"auto: best validation {study.get('metric')} of the mean of the top "
                           f"1..{len(pool)} trials (ties: lower validation loss, then smaller k)",
                           "validation_scores": {str(n): v for n, v in scores.items()}}
            what = "without TTA" if family == "none" else f"with TTA {family}"
            log(f"note: --ensemble auto chose k={k} {what} on validation ({study.get('metric')}: "
                + ", ".join(f"k={n} {v:.4f}" for n, v in scores.items()) + ")")
        else:
            k = plan.ensemble if isinstance(plan.ensemble, int) else 1
            out[family] = {"k": k, "chosen": "given (--ensemble)" if plan.ensemble else "the single best trial"}
    return out


def candidates_for(names: list[str], sizes: dict[str, dict], tta_mode: str | None) -> list[Candidate]:
    """The candidates, simplest first: the single best, its family's ensemble, and the same with TTA."""
    best = names[0]
    out = [Candidate(best, (best,), None)]
    if sizes["none"]["k"] > 1:
        k = sizes["none"]["k"]
        out.append(Candidate(f"ensemble of top {k}", tuple(names[:k]), None))
    if tta_mode:
        out.append(Candidate(f"{best} + TTA {tta_mode}", (best,), tta_mode))
        k = sizes[tta_mode]["k"]
        if k > 1:
            out.append(Candidate(f"ensemble of top {k} + TTA {tta_mode}", tuple(names[:k]), tta_mode))
    return out


def fit_on_validation(probs: np.ndarray, y_val: np.ndarray, plan: FinalPlan) -> dict:
    """Temperature (validation NLL), then the threshold on the calibrated validation probabilities."""
    fit = fit_temperature(probs, y_val)
    threshold = None
    if plan.positive is not None:
        calibrated = apply_temperature(probs, fit["temperature"])
        try:
            threshold = op.choose_threshold(calibrated[:, plan.positive], y_val == plan.positive,
                                            target_sensitivity=plan.target_sensitivity,
                                            target_specificity=plan.target_specificity)
        except op.OperatingPointError as exc:
            raise EvaluateError(f"cannot choose a threshold on the validation split: {exc}") from None
    return {"temperature": fit, "threshold": threshold}


CHOSEN_ON_VALIDATION = ("auto: the candidate with the best validation score of the study's metric (ties: the "
                        "simpler, i.e. fewer members, then no TTA)")


def choose_final(candidates: list, val_scores: dict[str, float], plan: FinalPlan, mode: str = "max"):
    """The final model among ``candidates`` (simplest first): with an ``auto`` option, the best on validation
    (a tie keeps the simpler); otherwise the last, the full combination the user asked for."""
    if not plan.chosen_on_validation:
        return candidates[-1]
    sign = -1.0 if mode == "min" else 1.0
    label = (lambda c: c[0]) if candidates and isinstance(candidates[0], tuple) else (lambda c: c.label)
    score = {name: sign * v if v == v else -math.inf for name, v in val_scores.items()}  # NaN never wins
    return max(candidates, key=lambda c: (score[label(c)], -candidates.index(c)))


def say_choice(plan: FinalPlan, final: Candidate, val_scores: dict, best: str, metric: str, log=print) -> None:
    """Say which candidate became the final model and why; or, for a combination asked for, when validation
    already says it does not help."""
    if plan.chosen_on_validation:
        log(f"note: final model {final.label!r}, chosen on validation ({metric}: "
            + ", ".join(f"{label} {v:.4f}" for label, v in val_scores.items()) + ")")
        return
    # the user asked for these options: told when validation already says they do not help
    worse = [label for label in val_scores if label != best and val_scores[label] < val_scores[best]]
    if worse:
        log(f"note: on validation, {', '.join(f'{lbl} ({val_scores[lbl]:.4f})' for lbl in worse)} "
            f"score{'s' if len(worse) == 1 else ''} below the single best trial ({val_scores[best]:.4f}) on "
            f"{metric}: the option(s) you asked for do not help here; the final model is still {final.label!r} "
            "(--ensemble auto or --tta auto choose on validation)")


def final_model_record(study: dict, class_names: list[str], plan: FinalPlan, final: Candidate, fitted: dict,
                       per_trial: dict, n_val: int, ensemble: dict, checkpoints: dict) -> dict:
    """The content of ``final_model.json``: everything fitted on validation, and how."""
    threshold = fitted["threshold"]
    family = ensemble.get(final.tta or "none", {})
    return {
        "written_at": now(), "by": "analysis.evaluate", "study": study.get("name"), "class_names": class_names,
        "positive_class": None if plan.positive is None else class_names[plan.positive],
        "model": final.label, "trials": list(final.members), "checkpoints": [checkpoints[t] for t in final.members],
        "tta": final.tta, "temperature": fitted["temperature"]["temperature"],
        "threshold": None if threshold is None else threshold["value"],
        "threshold_rule": None if threshold is None else op.rule_text(threshold),
        "decision": ("argmax of the calibrated probabilities" if threshold is None else
                     f"{class_names[plan.positive]} if its calibrated probability >= threshold, else the most "
                     "probable other class"),
        "ensemble": {"k": len(final.members), "chosen": family.get("chosen"),
                     "validation_scores": family.get("validation_scores"), "by_family": ensemble},
        "fitted_on": {"split": "val", "n": n_val,
                      "temperature": f"minimises the validation NLL over log T (scipy.optimize.minimize_scalar, "
                                     f"bounded, T in [{T_BOUNDS[0]}, {T_BOUNDS[1]}]); probabilities are "
                                     "softmax(log p / T)",
                      "threshold": None if threshold is None else
                      f"{op.rule_text(threshold)}, on the calibrated validation probability of "
                      f"{class_names[plan.positive]}; positive iff probability >= threshold"},
        "validation": {"temperature_fit": fitted["temperature"],
                       "at_threshold": None if threshold is None else threshold["validation"]},
        "ece_bins": ECE_BINS,
        "per_trial": per_trial,
    }


def per_trial_entry(fitted: dict, class_names: list[str], plan: FinalPlan) -> dict:
    threshold = fitted["threshold"]
    return {"temperature": fitted["temperature"]["temperature"],
            "nll_before": fitted["temperature"]["nll_before"], "nll_after": fitted["temperature"]["nll_after"],
            "threshold": None if threshold is None else {
                "class": class_names[plan.positive], "value": threshold["value"], "rule": op.rule_text(threshold),
                "validation": threshold["validation"]}}


