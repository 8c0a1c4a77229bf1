"""Subgroup results: the final model's test scores per sex, age band, body site, ... of the images.

A clinician asks whether the model works as well for women as for men, for the
over-60s, on acral sites. The answer is read from two files of the results folder:

- ``test_predictions.parquet``: the final model's rows (``final`` True) at its
  shipped decision (``predicted``: calibrated probabilities and the threshold
  fitted on validation, as ``analysis.evaluate`` scored it);
- ``splits.parquet``: each image's metadata columns (``trainables.datasets.
  metadata_columns``: HAM10000's age, sex, localization, dx_type; a folder
  study's ``options={"metadata": "meta.csv"}``), joined on the image name.

Each text column is split by its values (a missing value is its own subgroup,
``MISSING``); ``age`` into ``AGE_EDGES`` bands; any other numeric column at its
quartiles. Per subgroup, for a binary study with a positive class: sensitivity,
specificity and balanced accuracy; for more classes accuracy, balanced accuracy
and the positive class's recall if it has one. Balanced accuracy needs every class in the
subgroup (over fewer it is another quantity); it is n/a where one is absent.
Proportions (sensitivity, specificity, recall) get Wilson score intervals;
balanced accuracy a percentile bootstrap over the subgroup's images
(``analysis.bootstrap``, the evaluation's ``n_boot`` and seed).

A value behind fewer than ``MIN_N`` images (positives for sensitivity,
negatives for specificity, each class for balanced accuracy) is "too small to
judge". Otherwise a subgroup whose interval lies entirely below the overall
value (the same metric on the whole test split) is flagged "below overall".
Many subgroups are compared at once, so a flag is a reason to look closer, not
a finding.

``subgroup_results`` computes (data in, data out); ``subgroup_table`` shapes it
for display; ``subgroup_section`` (the report) and ``subgroup_card`` (the model
card) render it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.bootstrap import LEVEL, bootstrap_ci, wilson_interval
from analysis.document import Section
from analysis.errors import AnalysisError
from analysis.files import SPLITS, predictions_file
from analysis.records import latest_evaluation, read_evaluations
from analysis.tables import to_markdown

__all__ = ["AGE_COLUMN", "AGE_EDGES", "MIN_N", "MAX_LEVELS", "MISSING", "TOO_SMALL", "BELOW", "SECTION_TITLE",
           "NO_METADATA", "Subgroups", "SubgroupsError", "wilson_interval", "subgroup_labels", "subgroup_results",
           "final_model_subgroups", "subgroup_table", "subgroup_section", "subgroup_card"]

AGE_COLUMN = "age"
AGE_EDGES = (30, 45, 60, 75)  # bands <30, 30–44, 45–59, 60–74, ≥75 (years)
NUMERIC_BANDS = 4  # any other numeric metadata column: cut at its quartiles
MIN_N = 10  # fewer images than this behind a value (positives, negatives, a class): too small to judge
MAX_LEVELS = 20  # a text column with more values is an identifier, not a subgroup: left out, and said so
MISSING = "missing"  # the subgroup of images whose value is empty
TOO_SMALL = "too small to judge"
BELOW = "below overall"
OVERALL = "all images"
SECTION_TITLE = "Results by subgroup"
DIGITS = 3
NO_METADATA = ("The study's images carry no metadata (age, sex, body site, ...), so there are no subgroup results. "
               "HAM10000 ships them; a folder study adds them with `Dataset(loader=\"folder\", options={\"metadata\": "
               "\"meta.csv\"})`: a CSV in the dataset folder with a `file` column (each image's path relative to the "
               "folder, e.g. `benign/img_001.png`) and one column per attribute. `search.run` writes them into "
               "splits.parquet, so the study must be run again.")


class SubgroupsError(AnalysisError):
    """The results folder lacks what the subgroup results need. The message names the file and the fix."""


@dataclasses.dataclass
class Subgroups:
    """The final model's metrics per subgroup, at its shipped decision on the evaluated split."""

    table: pd.DataFrame  # one row per (attribute, subgroup, metric); the overall rows first (attribute OVERALL)
    metrics: list[str]  # in display order, e.g. ["sensitivity", "specificity", "balanced_accuracy"]
    attributes: list[str]  # the metadata columns split into subgroups
    left_out: dict[str, str]  # metadata column -> why it was not split
    positive: str | None  # the positive class, if the study has one
    level: float
    model: str = ""  # the final model's label
    split: str = "test"

    def flagged(self) -> pd.DataFrame:
        """The rows whose interval lies entirely below the overall value."""
        return self.table[self.table["verdict"] == BELOW]


# --------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------


def subgroup_labels(values: pd.Series, column: str) -> pd.Series | None:
    """Each image's subgroup of metadata ``column`` (text; ``MISSING`` for an empty value), in display order as
    an ordered categorical; None when the column has too many values (``MAX_LEVELS``) to be a grouping."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
        if column == AGE_COLUMN:
            edges = [-math.inf, *AGE_EDGES, math.inf]
            names = [f"<{AGE_EDGES[0]}"] + [f"{a}–{b - 1}" for a, b in zip(AGE_EDGES, AGE_EDGES[1:])] \
                + [f"≥{AGE_EDGES[-1]}"]
            bands = pd.cut(numbers, edges, right=False, labels=names)
        elif numbers.nunique() <= MAX_LEVELS:
            bands = numbers.map(lambda v: f"{v:g}", na_action="ignore")
            names = [f"{v:g}" for v in sorted(numbers.dropna().unique())]
        else:
            bands = pd.qcut(numbers, NUMERIC_BANDS, duplicates="drop")
            names = [str(c) for c in bands.cat.categories]
            bands = bands.astype("string")
        labels = pd.Series(bands, index=values.index).astype("string").fillna(MISSING)
        order = [n for n in names if n in set(labels)]
    else:
        labels = values.astype("string").str.strip().replace("", pd.NA).fillna(MISSING)
        counts = labels.value_counts()
        if len(counts) > MAX_LEVELS:
            return None
        order = sorted(counts.index, key=lambda v: (v == MISSING, -counts[v], v))  # largest first, missing last
    if MISSING in set(labels) and MISSING not in order:
        order.append(MISSING)
    return pd.Series(pd.Categorical(labels, categories=order, ordered=True), index=values.index)


def subgroup_results(rows: pd.DataFrame, class_names: list[str], positive: str | None, *, attributes: list[str],
                     level: float = LEVEL, n_boot: int = 1000, seed: int = 0) -> Subgroups:
    """The metrics of ``rows`` (one per image: ``label_index``, ``predicted`` (a class name), ``prob_<class>``
    and the metadata columns ``attributes``) on all of them and per subgroup of each attribute."""
    y = rows["label_index"].to_numpy(dtype=np.int64)
    index = {c: i for i, c in enumerate(class_names)}
    predicted = rows["predicted"].astype(str).map(index).to_numpy(dtype=np.int64)
    probs = rows[[f"prob_{c}" for c in class_names]].to_numpy(dtype=np.float64)
    pos = index[positive] if positive in index else None
    metrics = _metric_names(class_names, pos)
    score = dict(class_names=class_names, positive=pos, level=level, n_boot=n_boot, seed=seed)
    overall = _scores(y, predicted, probs, np.ones(len(y), bool), **score)
    out = [_row(OVERALL, "", m, overall[m], None) for m in metrics]
    used, left_out = [], {}
    for column in attributes:
        labels = subgroup_labels(rows[column], column)
        if labels is None:
            left_out[column] = f"more than {MAX_LEVELS} values: an identifier, not a grouping"
            continue
        used.append(column)
        for group in labels.cat.categories:
            mine = (labels == group).to_numpy()
            values = _scores(y, predicted, probs, mine, **score)
            out += [_row(column, str(group), m, values[m], overall[m]["value"]) for m in metrics]
    return Subgroups(pd.DataFrame(out), metrics, used, left_out, positive if pos is not None else None, level)


def _metric_names(class_names: list[str], pos: int | None) -> list[str]:
    if len(class_names) == 2:
        return ["balanced_accuracy"] if pos is None else ["sensitivity", "specificity", "balanced_accuracy"]
    # Accuracy beside balanced accuracy: with 7 classes nearly every subgroup lacks a rare one, where balanced
    # accuracy is undefined (HAM10000 by site: 10 of 14 sites), while accuracy is a proportion of every subgroup.
    return ["accuracy", "balanced_accuracy"] + ([] if pos is None else [f"recall_{class_names[pos]}"])


def _scores(y, predicted, probs, mine, *, class_names, positive, level, n_boot, seed) -> dict[str, dict]:
    """Each metric of the images ``mine``: value, interval, n, and how many images it rests on (``behind``)."""
    y, predicted, probs = y[mine], predicted[mine], probs[mine]
    n, k = len(y), len(class_names)
    support = np.bincount(y, minlength=k)
    hits = np.bincount(y[predicted == y], minlength=k)
    out = {}
    # Balanced accuracy only where every class is present: over fewer classes (a subgroup of benign lesions
    # only) it would be another quantity, not comparable with the value on all images.
    if support.all():
        ba = float(np.mean(hits / support))
        low, high = bootstrap_ci(y, probs, class_names, n_boot=n_boot, seed=seed, positive=positive, level=level,
                                 predicted=predicted)["balanced_accuracy"]
    else:
        ba, low, high = math.nan, math.nan, math.nan
    out["balanced_accuracy"] = {"value": ba, "low": low, "high": high, "n": n, "behind": int(support.min())}
    right = int(hits.sum())
    low, high = wilson_interval(right, n, level)
    out["accuracy"] = {"value": right / n if n else math.nan, "low": low, "high": high, "n": n, "behind": n}
    if positive is not None:
        for name, c in _proportions(class_names, positive):
            value = hits[c] / support[c] if support[c] else math.nan
            low, high = wilson_interval(int(hits[c]), int(support[c]), level)
            out[name] = {"value": value, "low": low, "high": high, "n": n, "behind": int(support[c])}
    return out


def _proportions(class_names: list[str], positive: int) -> list[tuple[str, int]]:
    """(metric, the class whose recall it is): sensitivity and specificity for two classes, else the positive's recall."""
    if len(class_names) == 2:
        return [("sensitivity", positive), ("specificity", 1 - positive)]
    return [(f"recall_{class_names[positive]}", positive)]


def _row(attribute: str, group: str, metric: str, values: dict, overall: float | None) -> dict:
    if values["behind"] < MIN_N:
        verdict = TOO_SMALL
    elif overall is not None and values["high"] < overall:
        verdict = BELOW
    else:
        verdict = ""
    return {"attribute": attribute, "subgroup": group, "metric": metric, **values, "verdict": verdict}


# --------------------------------------------------------------------------
# from the results folder
# --------------------------------------------------------------------------


def final_model_subgroups(run_dir: str | Path, evaluation: dict | None = None) -> Subgroups | None:
    """``subgroup_results`` for the final model of ``evaluation`` (default: the latest that scored one), read
    from ``<split>_predictions.parquet`` and ``splits.parquet``; None when the images carry no metadata."""
    from trainables.datasets import metadata_columns

    from analysis.splits import read_splits, split_class_names

    run_dir = Path(run_dir)
    if evaluation is None:
        evaluation = latest_evaluation(read_evaluations(run_dir), final=True)
    final = (evaluation or {}).get("final")
    if not final:
        raise SubgroupsError(f"{str(run_dir)!r} holds no evaluation of a final model; run python -m analysis.evaluate "
                             f"{run_dir} first")
    splits = read_splits(run_dir / SPLITS)
    attributes = metadata_columns(splits)
    if not attributes:
        return None
    split = evaluation.get("split", "test")
    path = run_dir / predictions_file(split)
    if not path.is_file():
        raise SubgroupsError(f"{str(path)!r} is missing; run python -m analysis.evaluate {run_dir} to write it")
    table = pd.read_parquet(path)
    mine = table["final"].astype(bool) if "final" in table.columns else table["trial"].astype(str) == str(final["model"])
    rows = table[mine].reset_index(drop=True)
    if rows.empty:
        raise SubgroupsError(f"{str(path)!r} holds no predictions of the final model {final['model']!r}; run "
                             f"python -m analysis.evaluate {run_dir} again")
    meta = splits[splits["split"] == split][["path", *attributes]].astype({"path": str})
    rows = rows.astype({"path": str}).drop(columns=[c for c in attributes if c in rows.columns])
    rows = rows.merge(meta, on="path", how="left", validate="many_to_one")
    positive = evaluation.get("positive_class")
    if "positive_class" in rows.columns and rows["positive_class"].notna().any():
        positive = str(rows["positive_class"].dropna().iloc[0])  # the class its threshold is for, as shipped
    result = subgroup_results(rows, split_class_names(run_dir), positive, attributes=attributes,
                              level=float(evaluation.get("level", LEVEL)), n_boot=int(evaluation.get("n_boot", 1000)),
                              seed=int(evaluation.get("seed", 0)))
    return dataclasses.replace(result, model=str(final["model"]), split=split)


# --------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------


_WORDS = {"sensitivity": "sensitivity", "specificity": "specificity", "balanced_accuracy": "balanced accuracy",
          "accuracy": "accuracy"}
_BEHIND = {"sensitivity": "positive(s)", "specificity": "negative(s)", "balanced_accuracy": "image(s) of its rarest class"}


def _words(metric: str) -> str:
    return _WORDS.get(metric) or f"recall of {metric.removeprefix('recall_')}"


def _cell(row) -> str:
    if pd.isna(row["value"]):
        return f"n/a ({row['behind']} {_BEHIND.get(row['metric'], 'image(s)')})"
    text = f"{row['value']:.{DIGITS}f} [{row['low']:.{DIGITS}f}, {row['high']:.{DIGITS}f}]"
    if row["verdict"] == TOO_SMALL:
        return f"{text} {TOO_SMALL} ({row['behind']} {_BEHIND.get(row['metric'], 'image(s)')})"
    return f"{text} {BELOW}" if row["verdict"] == BELOW else text  # plain: the HTML shows table cells as typed


def subgroup_table(result: Subgroups) -> pd.DataFrame:
    """One line per subgroup (the overall line first): its n, and per metric ``value [low, high]`` with its
    verdict ("too small to judge", "below overall") beside it."""
    lines = []
    keys = ["attribute", "subgroup"]
    for (attribute, group), rows in result.table.groupby(keys, sort=False):
        by = rows.set_index("metric")
        line = {"attribute": attribute, "subgroup": group, "n": int(rows["n"].iloc[0])}
        if "sensitivity" in by.index:
            line["positives / negatives"] = f"{by.loc['sensitivity', 'behind']} / {by.loc['specificity', 'behind']}"
        line.update({_words(m): _cell(by.loc[m].to_dict() | {"metric": m}) for m in result.metrics})
        lines.append(line)
    return pd.DataFrame(lines)


def _what(result: Subgroups) -> str:
    pct = int(round(100 * result.level))
    metrics = ", ".join(_words(m) for m in result.metrics)
    bands = f"; {AGE_COLUMN} in bands" if AGE_COLUMN in result.attributes else ""
    return (f"{result.model or 'The final model'} on the {result.split} split, at its shipped decision (the calibrated "
            f"probabilities and the decision rule written to final_model.json, fitted on validation): {metrics} "
            f"per subgroup of the images' metadata ({', '.join(result.attributes)}{bands}). Intervals: "
            f"{pct}% Wilson score intervals for proportions, a {pct}% percentile bootstrap for balanced accuracy. "
            f"A value resting on fewer than {MIN_N} images (positives, negatives, or the rarest class) is "
            f"\"{TOO_SMALL}\"; a subgroup whose interval lies entirely below the value on all images is "
            f"**{BELOW}**. Many subgroups are compared at once, so expect some flags by chance: a flag is a reason "
            "to look closer, not a finding.")


def _flag_text(result: Subgroups) -> str:
    flagged = result.flagged()
    if flagged.empty:
        return "No subgroup's interval lies entirely below the value on all images."
    return "Below overall: " + "; ".join(
        f"{r.attribute} = {r.subgroup}: {_words(r.metric)} {r.value:.{DIGITS}f} [{r.low:.{DIGITS}f}, "
        f"{r.high:.{DIGITS}f}] (n = {r.n})" for r in flagged.itertuples()) + "."


def _left_out_text(result: Subgroups) -> str | None:
    if not result.left_out:
        return None
    return "Not split into subgroups: " + "; ".join(f"{c} ({why})" for c, why in result.left_out.items()) + "."


def _read(run_dir: Path, evaluation: dict | None) -> tuple[Subgroups | None, str | None]:
    """(the results, None), or (None, the sentence to show instead)."""
    if not (evaluation or {}).get("final"):
        return None, ("Not computed yet: the subgroup results are the final model's on the test split, from "
                      "`python -m analysis.evaluate RUN_DIR` (test_predictions.parquet).")
    try:
        result = final_model_subgroups(run_dir, evaluation)
    except AnalysisError as exc:
        return None, f"Subgroup results could not be computed: {exc}"
    return (result, None) if result is not None else (None, NO_METADATA)


def subgroup_section(run, evaluation: dict | None) -> Section:
    """The report's section (``run``: an ``analysis.tables.Run``)."""
    s = Section(SECTION_TITLE)
    result, instead = _read(Path(run.path), evaluation)
    if result is None:
        s.text(instead)
        return s
    s.text(_what(result))
    s.text(_flag_text(result))
    left_out = _left_out_text(result)
    if left_out:
        s.text(left_out)
    table = subgroup_table(result)
    for attribute, rows in table.groupby("attribute", sort=False):
        s.sub("All images" if attribute == OVERALL else f"By {attribute}")
        s.table(rows.drop(columns=["attribute"]))
    return s


def subgroup_card(run_dir: str | Path, evaluation: dict | None) -> str:
    """The model card's part, in Markdown."""
    lines = ["## Subgroups", f"_From {predictions_file((evaluation or {}).get('split', 'test'))} and {SPLITS}._", ""]
    result, instead = _read(Path(run_dir), evaluation)
    if result is None:
        return "\n".join(lines + [instead])
    lines += [_what(result), "", _flag_text(result)]
    left_out = _left_out_text(result)
    if left_out:
        lines += ["", left_out]
    lines += ["", to_markdown(subgroup_table(result))]
    return "\n".join(lines)
