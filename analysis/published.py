"""Published results of the reference studies S1-S5, beside our own.

``published.csv`` holds one row per number the studies (and the stronger
published anchors) report, copied from ``shared/paper-tables.md``; empty
cells are numbers the source does not report. A row's ``protocol`` is the
split it was measured on: ``S1``...``S5`` for the studies' own protocols, the
anchor's own label otherwise (``Chowdhury2020``, ``ISIC2018-Task3``,
``DermaMNIST``). A difference is only meaningful under the same protocol, so
``compare`` computes a delta for those rows alone and labels the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

__all__ = ["PUBLISHED_CSV", "STUDY_KEYS", "METRICS", "published_rows", "study_key", "run_protocol",
           "reference_note", "compare"]

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
STUDY_KEYS = ("S1", "S2", "S3", "S4", "S5")
# Metric columns of published.csv; our evaluation (analysis.evaluate) uses the same names.
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc",
           "precision_benign", "recall_benign", "f1_benign",
           "precision_malignant", "recall_malignant", "f1_malignant")
SAME = "same protocol"
DIFFERENT = "different protocol"
NOT_MEASURED = "not measured by us"


def _table() -> pd.DataFrame:
    # Whole numbers stay integers; protocol keys stay strings.
    table = pd.read_csv(PUBLISHED_CSV, dtype={"study": str, "protocol": str, "split_reported": str})
    for col in ("image_size", "epochs", "n_eval", "train_time_s"):
        table[col] = table[col].astype("Int64")
    return table


def published_rows(study_key: str) -> pd.DataFrame:
    """Every published row for ``study_key`` (S1..S5): the study's own rows first, then the anchors."""
    key = str(study_key).strip().upper()
    if key not in STUDY_KEYS:
        raise ValueError(f"unknown study key {study_key!r}; valid: {', '.join(STUDY_KEYS)} "
                         "(the reference studies of shared/paper-tables.md)")
    table = _table()
    rows = table[table["study"] == key]
    own = rows["protocol"] == key
    return pd.concat([rows[own], rows[~own]], ignore_index=True)


def run_protocol(run_dir: str | Path) -> str:
    """The split protocol a results folder was made with: ``study.json``'s ``dataset.split``."""
    path = Path(run_dir).expanduser() / "study.json"
    try:
        return str(json.loads(path.read_text())["study"]["dataset"]["split"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read dataset.split from {str(path)!r} ({type(exc).__name__}: {exc}); "
                         "give a results folder written by python -m search.run") from None


def study_key(run_dir: str | Path) -> str | None:
    """``S1``..``S5`` when the run used that study's split protocol, else ``None`` (no published reference).

    Only the protocol decides: a study on HAM10000 with a ``grouped`` split
    measures something the papers did not, so no published number is its peer.
    """
    protocol = run_protocol(run_dir)
    return protocol if protocol in STUDY_KEYS else None


def reference_note(run_dir: str | Path) -> str:
    """One line for a report: which published reference applies to this run, or why none does."""
    protocol = run_protocol(run_dir)
    if protocol in STUDY_KEYS:
        return f"published reference: study {protocol} (same split protocol, {protocol}); see analysis/published.csv"
    return (f"no published reference applies: the run's split protocol is {protocol!r}, not one of "
            f"{', '.join(STUDY_KEYS)}; to show a study's numbers anyway (as a different protocol), "
            "call compare(ours, 'S2', protocol) with that study's key")


def compare(ours: pd.DataFrame, study_key: str | None, protocol: str, *, prefix: str = "",
            label: str = "trial_name") -> pd.DataFrame:
    """Published rows of ``study_key`` beside each of ``ours``, one row per (ours, published row, metric).

    ``ours`` holds one row per result of ours with metric columns named as in
    ``METRICS`` after ``prefix`` (e.g. the table of ``analysis.evaluate``, or
    leaderboard rows with ``prefix="best_val_"``); optional ``<metric>_ci_low``
    and ``<metric>_ci_high`` columns and a ``split`` column are carried along.
    ``protocol`` is the split protocol ours was measured under (``run_protocol``).
    Only metrics the published row reports appear. ``delta`` (ours minus
    published) is filled only where the protocols are the same; the others
    say ``different protocol``. ``study_key=None`` gives an empty table.
    """
    columns = ["ours", "split", "metric", "ours_value", "ours_ci_low", "ours_ci_high", "published_value",
               "delta", "comparison", "published_model", "published_config", "published_protocol",
               "published_split", "published_n", "citation"]
    if study_key is None:
        return pd.DataFrame(columns=columns)
    published = published_rows(study_key)
    have = [m for m in METRICS if prefix + m in ours.columns]
    if not have:
        raise ValueError(f"ours has no metric columns; expected some of {[prefix + m for m in METRICS]} "
                         f"(got {list(ours.columns)[:12]}); pass prefix='best_val_' for leaderboard rows")
    protocol = str(protocol).strip()
    rows = []
    for i, (_, mine) in enumerate(ours.iterrows()):
        name = str(mine[label]) if label in ours.columns else f"ours[{i}]"
        split = mine.get("split")
        split = None if split is None or pd.isna(split) else str(split)
        for _, theirs in published.iterrows():
            same = theirs["protocol"] == protocol
            for metric in METRICS:
                value = theirs[metric]
                if pd.isna(value):
                    continue  # the source does not report it
                mine_value = _number(mine.get(prefix + metric))
                if math.isnan(mine_value):
                    comparison = NOT_MEASURED
                elif not same:
                    comparison = DIFFERENT
                else:
                    comparison = _same_label(split, theirs["split_reported"])
                rows.append({
                    "ours": name, "split": split, "metric": metric, "ours_value": mine_value,
                    "ours_ci_low": _number(mine.get(f"{prefix}{metric}_ci_low")),
                    "ours_ci_high": _number(mine.get(f"{prefix}{metric}_ci_high")),
                    "published_value": float(value),
                    "delta": mine_value - float(value) if same else math.nan,
                    "comparison": comparison,
                    "published_model": theirs["model"], "published_config": theirs["config"],
                    "published_protocol": theirs["protocol"], "published_split": theirs["split_reported"],
                    "published_n": theirs["n_eval"], "citation": theirs["citation"],
                })
    return pd.DataFrame(rows, columns=columns)


def _same_label(ours_split: str | None, their_split) -> str:
    """Same protocol; say so when the two numbers still come from different splits (our test vs their val)."""
    if ours_split is None or pd.isna(their_split) or ours_split == their_split:
        return SAME
    return f"{SAME}; ours on {ours_split}, published on {their_split}"


def _number(value) -> float:
    try:
        return math.nan if value is None or pd.isna(value) else float(value)
    except (TypeError, ValueError):
        return math.nan
