"""PPV and NPV where the model will be used: at the prevalence of the intended setting, not the test set's.

Sensitivity and specificity are properties of the model at its threshold; PPV
and NPV also depend on how common the positive class is. A balanced test set
(as the embedded data and melanoma10k are) gives a PPV near 0.9 that falls to
about 0.15 at a 2% prevalence. So every PPV and NPV here says which prevalence
it holds at: the test set's own, the one stated for the intended setting
(``--prevalence``, ``Study(prevalence=...)``), or, when none is stated, each of
``TYPICAL_PREVALENCES``.

At prevalence ``p`` (Bayes' rule on sensitivity ``se`` and specificity ``sp``):

    PPV = se p / (se p + (1 - sp)(1 - p))
    NPV = sp (1 - p) / (sp (1 - p) + (1 - se) p)

The intervals come from the evaluation's bootstrap resamples of the test images
(``analysis.bootstrap.resample_counts``): each resample's sensitivity and
specificity give its PPV and NPV at ``p``; the prevalence itself is taken as
stated, without uncertainty.
"""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import percentile_interval, resample_counts
from analysis.errors import EvaluateError
from analysis.operating_point import weighted_binary

__all__ = ["TYPICAL_PREVALENCES", "PrevalenceError", "check_prevalence", "ppv_npv", "at_prevalences",
           "prevalences_for", "stated_prevalence", "prevalence_frame", "PREVALENCE_NOTE"]

PREVALENCE_NOTE = ("PPV and NPV depend on how common the positive class is: each holds only at the prevalence "
                   "beside it (sensitivity and specificity do not).")

TYPICAL_PREVALENCES = (0.01, 0.05, 0.20)  # shown when no prevalence is stated: screening, referral, specialist


class PrevalenceError(EvaluateError):
    """A prevalence that cannot be used. The message names the flag, the value and the fix."""


def check_prevalence(value, where: str = "--prevalence") -> float | None:
    """``value`` as a float strictly between 0 and 1 (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise PrevalenceError(f"{where}: bad value {value!r}; give the positive class's share in the intended "
                              "setting, strictly between 0 and 1 (e.g. 0.02 for 2%)")
    return float(value)


def stated_prevalence(given: float | None, record: dict) -> tuple[float | None, str | None]:
    """The intended setting's prevalence: ``--prevalence``, else the study's ``prevalence``; with where it came from."""
    if given is not None:
        return check_prevalence(given), "--prevalence"
    study = record.get("study") or {}
    if study.get("prevalence") is not None:
        return check_prevalence(study["prevalence"], "Study(prevalence=...)"), "Study(prevalence=...)"
    return None, None


def ppv_npv(sensitivity, specificity, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV at ``prevalence`` from sensitivity and specificity (arrays or numbers); NaN where undefined."""
    se, sp, p = np.asarray(sensitivity, dtype=np.float64), np.asarray(specificity, dtype=np.float64), prevalence
    with np.errstate(divide="ignore", invalid="ignore"):
        called_positive = se * p + (1 - sp) * (1 - p)
        called_negative = sp * (1 - p) + (1 - se) * p
        ppv = np.where(called_positive > 0, se * p / np.where(called_positive > 0, called_positive, 1), np.nan)
        npv = np.where(called_negative > 0, sp * (1 - p) / np.where(called_negative > 0, called_negative, 1), np.nan)
    return ppv, npv


def prevalences_for(stated: float | None, test_prevalence: float) -> list[dict]:
    """The prevalences to report: the test set's, then the stated one or, without one, the typical ones."""
    rows = [{"prevalence": float(test_prevalence), "source": "test set"}]
    if stated is not None:
        rows.append({"prevalence": float(stated), "source": "stated"})
    else:
        rows += [{"prevalence": p, "source": "typical"} for p in TYPICAL_PREVALENCES]
    return rows


def at_prevalences(is_positive, called, prevalences: list[dict], *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> list[dict]:
    """PPV and NPV with intervals at each of ``prevalences`` (``prevalences_for``), for the decisions ``called``
    (True: called positive) on images whose truth is ``is_positive``; the same resamples as every other interval."""
    is_positive, called = np.asarray(is_positive, dtype=bool), np.asarray(called, dtype=bool)
    # the confusion counts of operating_point, once on the images and on each shared resample
    point = weighted_binary(is_positive, called, np.ones((1, len(is_positive))))
    se, sp = point["sensitivity"], point["specificity"]
    parts = [weighted_binary(is_positive, called, counts) for counts in resample_counts(len(is_positive), n_boot, seed)]
    boot_se = np.concatenate([p["sensitivity"] for p in parts])
    boot_sp = np.concatenate([p["specificity"] for p in parts])
    out = []
    for row in prevalences:
        p = row["prevalence"]
        ppv, npv = ppv_npv(se[0], sp[0], p)
        boot_ppv, boot_npv = ppv_npv(boot_se, boot_sp, p)
        out.append({**row, "ppv": float(ppv), "npv": float(npv),
                    "ci": {"ppv": list(percentile_interval(boot_ppv, level)),
                           "npv": list(percentile_interval(boot_npv, level))}})
    return out


def prevalence_frame(rows: list[dict], digits: int = 3):
    """``at_prevalences``' rows as a table: prevalence, where it comes from, PPV and NPV with their intervals."""
    import pandas as pd

    def missing(v) -> bool:
        return v is None or v != v  # NaN, or null in the JSON record

    def cell(value, interval):
        low, high = (list(interval or []) + [None, None])[:2]
        if missing(value):
            return "n/a"
        return f"{value:.{digits}f}" if missing(low) or missing(high) else \
            f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    return pd.DataFrame([{"prevalence": f"{100 * r['prevalence']:.1f}%",
                          "holds at": {"test set": "the test set's", "stated": "the intended setting (stated)"}.get(
                              r["source"], "typical (none stated)"),
                          "PPV": cell(r["ppv"], r["ci"]["ppv"]), "NPV": cell(r["npv"], r["ci"]["npv"])} for r in rows])
