"""The records ``analysis.evaluate`` writes, read back: one definition of "the latest evaluation".

``<split>_evaluation.json`` holds ``test_split_log`` (every look at the test
split) and ``evaluations`` (one entry appended per evaluation). Each evaluation
has ``trials`` (the top-k trials, each scored at its shipped decision) and
``final`` (the candidates and the chosen final model, ``final.models``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError
from analysis.operating_point import rule_text
from analysis.files import evaluation_file

__all__ = ["read_evaluations", "latest_evaluation", "best_evaluated", "final_evaluated", "format_table", "format_final",
           "with_ci"]


def read_evaluations(run_dir: str | Path, split: str = "test") -> dict | None:
    """``RUN_DIR/<split>_evaluation.json`` (None if absent).

    A damaged one is an ``AnalysisError`` naming it: read as absent, a report would say the test split
    was never read, when its log says otherwise.
    """
    path = Path(run_dir) / evaluation_file(split)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnalysisError(f"{str(path)!r} is unreadable ({type(exc).__name__}: {exc}); it logs every use of the "
                            f"{split} split, so restore it from the original folder rather than deleting it") from None
    if not isinstance(record, dict):
        raise AnalysisError(f"{str(path)!r} holds no evaluation record (a JSON object); restore it from the original folder")
    return record


def latest_evaluation(record: dict | None, *, final: bool = False) -> dict | None:
    """The newest entry of ``evaluations`` (with ``final``: the newest that scored a final model); None if
    there is none. A record that is itself one evaluation (it has ``trials``) is returned as is."""
    if not record:
        return None
    if record.get("trials"):
        return record if record.get("final") or not final else None
    evaluations = [e for e in record.get("evaluations") or [] if e.get("trials") and (e.get("final") or not final)]
    return evaluations[-1] if evaluations else None


def best_evaluated(evaluation: dict | None) -> dict | None:
    """The evaluated trial that ranked first on validation (``rank`` 1)."""
    trials = (evaluation or {}).get("trials") or []
    if not trials:
        return None
    return sorted(trials, key=lambda t: t.get("rank", 0))[0]


def final_evaluated(evaluation: dict | None) -> dict | None:
    """The final model's scores in ``evaluation`` (at its shipped decision); None before any final model."""
    final = (evaluation or {}).get("final") or {}
    return next((m for m in final.get("models") or [] if m.get("label") == final.get("model")), None)
def format_table(table: pd.DataFrame, metric_column: str) -> str:
    """One line per trial: validation score, then each test metric as ``value [low, high]``."""
    shown = [m for m in ("accuracy", "balanced_accuracy", "macro_f1", "auc") if m in table.columns]
    shown += [c for c in table.columns if c.startswith("recall_") and not c.endswith(("_low", "_high"))]
    out = table[["rank", "trial_name", "backbone"]].copy()
    out["rank"] = ["" if pd.isna(r) else str(int(r)) for r in table["rank"]]  # ensembles and TTA have none
    out["backbone"] = ["" if b is None or pd.isna(b) else b for b in table["backbone"]]
    if metric_column in table.columns:
        out[metric_column] = table[metric_column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4f}")
    for m in shown:
        out[m] = [with_ci(v, lo, hi) for v, lo, hi in zip(table[m], table[f"{m}_ci_low"], table[f"{m}_ci_high"])]
    return out.to_string(index=False)


def with_ci(value, low, high) -> str:
    if pd.isna(value):
        return "n/a"
    return f"{value:.4f} [{low:.3f}, {high:.3f}]" if not pd.isna(low) else f"{value:.4f}"


def format_final(final: dict, split: str, level: float) -> str:
    """The final model on the evaluated split: calibration before and after, and its operating point."""
    models = {m["label"]: m for m in final["models"]}
    chosen = models[final["model"]]
    pct = int(round(100 * level))
    lines = [f"final model: {final['model']} (final_model.json; temperature and threshold fitted on validation)"]
    if final.get("fitted_on_evaluated_split"):
        lines.append("caution: fitted and scored on the same (validation) split: optimistic")
    s = final.get("selection_corrected")
    if s and s.get("estimate") is not None:
        lines.append(f"selection-corrected {s['metric']}: validation {s['validation']:.4f} as chosen among "
                     f"{s['candidates']} candidates ({s.get('trials', '?')} trials); on new images "
                     f"{with_ci(s['estimate'], *s['ci'])} (BBC, {s['n_boot']} resamples of {s['n']} images)")
    refit = final.get("refit") or {}
    if refit.get("done"):
        before = models.get(refit["before"]["model"], {}).get("metrics", {})
        after = chosen.get("metrics", {})
        lines.append(f"refit on train + val ({refit['n_train']} images; temperature and threshold kept from "
                     f"validation): " + ", ".join(f"{name} {before[name]:.4f} -> {after[name]:.4f}" for name in
                                                  ("accuracy", "balanced_accuracy") if name in before and name in after)
                     + f" on {split} ({refit['before']['model']} before the refit)")
    elif refit:
        lines.append(f"refit: {refit['why']}")
    lines.append(f"calibration on {split} (ECE: top-label confidence, 15 equal-width bins; Brier: sklearn's):")
    for m in final["models"]:
        c = m["calibration"]
        lines.append(f"  {m['label']}: T = {c['temperature']:.3f}" + (" (at its bound: the validation set could not "
                     "pin it down)" if c["validation"].get("at_bound") else "")
                     + f"; ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}, "
                     f"Brier {c['before']['brier']:.4f} -> {c['after']['brier']:.4f}, "
                     f"NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}")
    point = chosen.get("operating_point")
    if point:
        v, t, ci = point["validation"], point["at_threshold"], point["ci"]
        lines.append(f"operating point for {point['class']}: threshold {point['value']:.4f} ({rule_text(point)}); on "
                     f"validation sensitivity {v['sensitivity']:.4f}, specificity {v['specificity']:.4f}")
        lines.append(f"  on {split} ({pct}% intervals): " + ", ".join(
            f"{name} {with_ci(t[name], *ci[name])}" for name in ("sensitivity", "specificity", "ppv", "npv", "f1")))
        lines.append(f"  confusion at the threshold: TP {t['tp']}, FN {t['fn']}, FP {t['fp']}, TN {t['tn']}")
        if point.get("rule") == "target_sensitivity":
            met = "met" if t["sensitivity"] >= point["target"] else "NOT met"
            lines.append(f"  target sensitivity {point['target']} on validation; on {split} it reached "
                         f"{t['sensitivity']:.4f} ({met})")
    for name, o in (chosen.get("one_vs_rest") or {}).items():
        lines.append(f"  {name} vs rest at the shipped decision: sensitivity {with_ci(o['sensitivity'], *o['ci']['sensitivity'])}, "
                     f"specificity {with_ci(o['specificity'], *o['ci']['specificity'])}")
    return "\n".join(lines)
