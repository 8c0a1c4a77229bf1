"""The answer first: one paragraph a clinician reads before anything else, in the report and the model card.

What the final model detects, on which data (source, n, prevalence), at which
threshold, with its sensitivity and specificity and their intervals, its
calibration in one number, and the main caveats. ``headline`` computes the facts
from the latest final evaluation (``test_evaluation.json``) and ``study.json``;
``headline_text`` writes them as the paragraph. Every number is the record's own,
so the first screen and the tables below it cannot disagree.
"""

from __future__ import annotations

import dataclasses

from analysis.files import shown_path
from analysis.intended_use import intended_use
from analysis.operating_point import rule_text
from analysis.records import final_evaluated
from analysis.tables import decimals_for

__all__ = ["Headline", "SMALL_N", "headline", "headline_text", "selection_text"]

SMALL_N = 200  # test images below which the intervals are wide enough to say so first
FEW_POSITIVES = 50  # positives below which a sensitivity rests on few images


@dataclasses.dataclass(frozen=True)
class Headline:
    model: str
    classes: list[str]
    split: str
    n: int
    data: str  # the dataset, as the study names it
    positive: str | None
    positives: int | None
    prevalence: float | None  # of the positive class in the evaluated split
    threshold: float | None
    rule: str | None
    sensitivity: tuple | None  # (value, low, high)
    specificity: tuple | None
    validation_sensitivity: float | None  # where the threshold was fitted
    balanced_accuracy: tuple
    ece: float | None
    caveats: list[str]
    selection: dict | None = None  # the validation score corrected for the choice (analysis.honest), if recorded


def headline(study: dict, evaluation: dict, record: dict | None = None) -> Headline | None:
    """The facts of the first paragraph; None before a final model was evaluated."""
    chosen = final_evaluated(evaluation)
    if chosen is None:
        return None
    ds = study.get("dataset") or {}
    n, split = int(evaluation.get("n") or 0), evaluation.get("split", "test")
    op = chosen.get("operating_point")
    triple = (lambda name, values, ci: (values[name], *ci[name][:2]))
    positives = prevalence = None
    if op:
        at = op["at_threshold"]
        positives = int(at["tp"] + at["fn"])
        prevalence = positives / n if n else None
    caveats = _caveats(study, evaluation, chosen, record, n, positives)
    return Headline(
        model=chosen["label"], classes=list(chosen.get("class_names") or []), split=split, n=n,
        data=f"the {ds.get('loader')} data set" + (f" ({shown_path(ds['path'])})" if ds.get("path") else ""),
        positive=op["class"] if op else None, positives=positives, prevalence=prevalence,
        threshold=op["value"] if op else None, rule=rule_text(op) if op else None,
        sensitivity=triple("sensitivity", op["at_threshold"], op["ci"]) if op else None,
        specificity=triple("specificity", op["at_threshold"], op["ci"]) if op else None,
        validation_sensitivity=(op.get("validation") or {}).get("sensitivity") if op else None,
        balanced_accuracy=triple("balanced_accuracy", chosen["metrics"], chosen["ci"]),
        ece=(chosen.get("calibration") or {}).get("after", {}).get("ece"), caveats=caveats,
        selection=(evaluation.get("final") or {}).get("selection_corrected"))


def _caveats(study, evaluation, chosen, record, n, positives) -> list[str]:
    out = []
    use = intended_use(study)
    if use["warning"]:
        out.append(f"**{use['warning']}**: the images are generated, so these numbers say nothing about patients")
    if evaluation.get("final", {}).get("fitted_on_evaluated_split") or evaluation.get("split") == "val":
        out.append("scored on the validation split the model was chosen on: optimistic")
    if n and n < SMALL_N:
        out.append(f"only {n} {evaluation.get('split', 'test')} images: one image moves a proportion by "
                   f"{1 / n:.{decimals_for(1 / n)}f}, and the intervals are wide")
    if positives is not None and positives < FEW_POSITIVES:
        out.append(f"the sensitivity rests on {positives} positive images")
    ds = study.get("dataset") or {}
    if ds.get("split") != "grouped" and not use["synthetic"]:
        out.append("the split is by image, not by patient or lesion: images of one patient may sit in train and "
                   "test (use a grouped split where the data has ids)")
    reads = len((record or {}).get("test_split_log") or [])
    if reads > 1:
        out.append(f"the test split has been read {reads} times: choices made after a look are fitted to it")
    op = chosen.get("operating_point") or {}
    if op.get("rule") == "target_sensitivity" and op["at_threshold"]["sensitivity"] < op["target"]:
        out.append(f"the target sensitivity {op['target']} met on validation was not reached on "
                   f"{evaluation.get('split', 'test')}")
    return out


def selection_text(s: dict) -> str:
    """The selection-corrected estimate in one sentence (``analysis.honest.selection_corrected``'s record)."""
    d = decimals_for(1 / s["n"]) if s.get("n") else 3
    name = str(s["metric"]).replace("_", " ")
    low, high = s["ci"]
    interval = f" ({round(100 * s.get('level', 0.95))}% CI {low:.{d}f}–{high:.{d}f})" if low is not None else ""
    describes = f" It describes {s['describes']}." if s.get("describes") else ""
    if s.get("over") == "trials":  # the final model was given; only the trials' ranking was a choice
        return (f"The best of {s['candidates']} trials on {s['n']} validation images scored {name} "
                f"{s['validation']:.{d}f} at its most probable class (the rule the ranking uses); corrected for that choice, expect about **{s['estimate']:.{d}f}**"
                f"{interval} from the best trial on new images like these (bootstrap bias-corrected validation; "
                f"the final model's ensemble and views were given, not chosen).{describes}")
    return (f"Chosen as the best of {s['candidates']} candidates on {s['n']} validation images, where it scored "
            f"{name} {s['validation']:.{d}f} at its most probable class (the rule the choice uses, not the shipped "
            f"threshold); corrected for that choice, expect about **{s['estimate']:.{d}f}**"
            f"{interval} on new images like these (bootstrap bias-corrected validation).{describes}")


def headline_text(h: Headline) -> str:
    """The paragraph, in Markdown."""
    d = decimals_for(1 / h.n) if h.n else 3

    def ci(t):
        value, low, high = t
        if value is None:  # undefined on this split (no positives, say): JSON null in the record
            return "n/a"
        return f"{value:.{d}f} (95% CI {low:.{d}f}–{high:.{d}f})" if low is not None and high is not None else \
            f"{value:.{d}f}"

    if h.positive:
        what = f"The final model ({h.model}) calls **{h.positive}** against {', '.join(c for c in h.classes if c != h.positive)}"
        rule = f" when its calibrated probability is at least {h.threshold:.4f} ({h.rule})"
        held = (f"{h.n} held-out {h.split} images of {h.data}, {h.positives} of them {h.positive} "
                f"(prevalence {100 * h.prevalence:.1f}%)")
        scores = (f"**sensitivity {ci(h.sensitivity)}**, **specificity {ci(h.specificity)}**, balanced accuracy "
                  f"{ci(h.balanced_accuracy)}")
    else:
        what = f"The final model ({h.model}) assigns one of {len(h.classes)} classes ({', '.join(h.classes)})"
        rule = " by its most probable class"
        held = f"{h.n} held-out {h.split} images of {h.data}"
        scores = f"**balanced accuracy {ci(h.balanced_accuracy)}**"
    text = f"{what}{rule}. On {held}: {scores}."
    if h.selection and h.selection.get("estimate") is not None:
        text += " " + selection_text(h.selection)
    if h.ece is not None:
        text += f" Calibration: expected calibration error {h.ece:.{d}f} after temperature scaling."
    if h.caveats:
        text += " Read with care: " + "; ".join(h.caveats) + "."
    return text
