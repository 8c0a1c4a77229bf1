"""The report's held-out sections: the test evaluation, the final model, its curves and Grad-CAM panel, the
published rows beside ours, and what the sample sizes can resolve.

Each section reads the records ``analysis.evaluate`` wrote (``analysis.records``)
and never reads the test split itself.
"""

from __future__ import annotations


import pandas as pd

from analysis import published
from analysis import tables as T
from analysis.tables import decimals_for
from analysis.curves import curve_plots
from analysis.document import Section
from analysis.explain import explain_section
from analysis.figures import Plot
from analysis.files import PLOTS_DIR
from analysis.operating_point import BINARY_METRICS, rule_text
from analysis.prevalence import PREVALENCE_NOTE, prevalence_frame
from analysis.records import best_evaluated, final_evaluated, latest_evaluation, read_evaluations

__all__ = ["test_section", "final_model_section", "curves_section", "explain_part", "published_section",
           "evaluation_table", "per_class_table", "validation_resolution", "test_resolution", "decimals_for",
           "image_step", "split_class_counts", "confusion_table", "CONFUSION_TITLE", "ci_cell", "ci_text", "short", "EXPLAIN_TITLE"]


def split_class_counts(run: T.Run, split: str) -> dict[str, int]:
    """Images per class in ``split`` (splits.parquet), in class order; empty when the folder does not say."""
    if run.splits is None or not {"split", "label"} <= set(run.splits.columns):
        return {}
    counts = run.splits.loc[run.splits["split"] == split, "label"].astype(str).value_counts()
    ordered = {c: int(counts[c]) for c in T.class_names(run) if c in counts.index}
    return ordered if sum(ordered.values()) == int(counts.sum()) else {str(k): int(v) for k, v in counts.items()}


def image_step(metric: str, counts: dict[str, int]) -> tuple[float, str, str] | None:
    """The most one image of a split with ``counts`` per class can move ``metric``: ``(step, "1/120", what)``.

    Accuracy: 1/n. Balanced accuracy: 1/(k x n_c) for an image of class c, so
    1/(k x the smallest class). Recall of a class: 1/n_c. None for metrics
    without a fixed step per image (AUC, F1, loss).
    """
    name = str(metric)
    for prefix in ("best_", "last_", "val_", "test_"):
        name = name.removeprefix(prefix)
    present = {c: n for c, n in counts.items() if n > 0}
    total = sum(present.values())
    if not total:
        return None
    if name == "accuracy":
        return 1 / total, f"1/{total}", "one image"
    if name == "balanced_accuracy":
        k, smallest = len(present), min(present, key=present.get)
        n = present[smallest]
        what = "one image" if k * n == total else f"one image of the smallest class, {smallest} ({n} images): 1/({k} x {n})"
        return 1 / (k * n), f"1/{k * n}", what
    if name.startswith("recall_") and name[len("recall_"):] in present:
        n = present[name[len("recall_"):]]
        return 1 / n, f"1/{n}", f"one {name[len('recall_'):]} image"
    return None


def _images(gap: float, step: float) -> str:
    count = gap / step
    return f"{round(count)}" if abs(count - round(count)) < 0.05 else f"about {count:.1f}"


def validation_resolution(run: T.Run) -> str | None:
    """What one validation image is worth on the study's metric, and whether the top trials can be told apart."""
    counts = split_class_counts(run, "val")
    if not counts:
        return None
    n = sum(counts.values())
    words = T.label(run.metric)
    held = f"the validation split holds {n} images ({', '.join(f'{c} {k}' for c, k in counts.items())})"
    step = image_step(run.metric, counts)
    if step is None:
        acc = image_step("accuracy", counts)
        return (f"Resolution: {held}; one image is {acc[1]} = {acc[0]:.{decimals_for(acc[0])}f} of validation "
                f"accuracy. The study's metric, {words}, has no fixed step per image.")
    d = decimals_for(step[0])
    text = f"Resolution: {held}; one image is {step[1]} = {step[0]:.{d}f} of {words}" + \
        (f" ({step[2]})" if step[2] != "one image" else "") + "."
    ranked = T.scored(run)
    scores = pd.to_numeric(ranked[run.score_column], errors="coerce").dropna().to_numpy(dtype=float) \
        if run.score_column in ranked.columns else []
    if len(scores) >= 2:
        close = int(((abs(scores - scores[0])) <= step[0] + 1e-9).sum())
        if close >= 2:
            text += (f" The top {close} trials are within {step[1]} = {step[0]:.{d}f} of each other on {words}: one "
                     "image; they cannot be told apart (their order is the tie rule's: the lower validation loss first).")
        else:
            gap = abs(scores[0] - scores[1])
            text += (f" The best trial leads the next by {gap:.{d}f}: {_images(gap, step[0])} image(s) at {step[1]} "
                     "each.")
    return text


def test_resolution(run: T.Run, evaluation: dict) -> str | None:
    """What one test image is worth, and how wide the best trial's test interval is (in images)."""
    split = evaluation.get("split", "test")
    counts = split_class_counts(run, split)
    n = evaluation.get("n")
    if not counts or (n and sum(counts.values()) != n):
        best = best_evaluated(evaluation) or {}
        report = best.get("classification_report") or {}
        counts = {c: int((report.get(c) or {}).get("support", 0)) for c in best.get("class_names") or []}
    step = image_step("accuracy", counts)
    if step is None:
        return None
    d = decimals_for(step[0])
    text = f"Resolution on {split}: {sum(counts.values())} images; one image is {step[1]} = {step[0]:.{d}f} of accuracy"
    balanced = image_step("balanced_accuracy", counts)
    if balanced and balanced[1] != step[1]:
        text += f" and up to {balanced[1]} = {balanced[0]:.{d}f} of balanced accuracy ({balanced[2]})"
    text += "."
    best = best_evaluated(evaluation)
    metric = str(evaluation.get("metric") or run.metric).removeprefix("val_")
    if best and metric not in (best.get("metrics") or {}):
        metric = "balanced_accuracy"
    low, high = ((best or {}).get("ci") or {}).get(metric, [None, None])[:2]
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        pct = int(round(100 * evaluation.get("level", 0.95)))
        width = high - low
        metric_step = image_step(metric, counts)
        in_images = f", {_images(width, metric_step[0])} images' worth" if metric_step else ""
        text += (f" The {pct}% interval of {best.get('trial_name')}'s {T.label(split + '_' + metric)} is "
                 f"{width:.{d}f} wide [{low:.{d}f}, {high:.{d}f}]{in_images}: trials closer than that on {split} are "
                 "not told apart by this test set.")
    return text


def published_section(run: T.Run, evaluation: dict | None) -> Section:
    s = Section("Published results beside ours")
    try:
        key, protocol = published.study_key(run.path), published.run_protocol(run.path)
        s.text(published.reference_note(run.path) + ".")
    except ValueError as exc:
        s.text(f"No published comparison: {exc}")
        return s
    if key is None:
        return s
    ours, prefix, what = _ours_for_published(run, evaluation)
    if ours.empty:
        s.text("No result of ours to compare yet.")
        return s
    try:
        table = published.compare(ours, key, protocol, prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still matters
        s.text(f"Comparing with the published rows of {key} failed: {type(exc).__name__}: {exc}")
        return s
    s.text(f"Ours: {what}. `delta` = ours minus published, filled only under the same split protocol "
           f"({protocol}); other rows are published anchors under their own protocol, shown for scale.")
    s.table(_published_table(table))
    return s


def _ours_for_published(run: T.Run, evaluation: dict | None) -> tuple[pd.DataFrame, str, str]:
    """Our rows for published.compare: the test evaluation's final model (the model that ships) if there is one,
    else validation bests."""
    final = final_evaluated(evaluation)
    best = final or best_evaluated(evaluation)
    if best is not None and best.get("metrics"):
        row = {"trial_name": best.get("label") or best.get("trial_name"), "split": evaluation.get("split", "test")}
        for m, v in best["metrics"].items():
            row[m] = v
            low_high = (best.get("ci") or {}).get(m)
            if low_high:
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low_high
        what = f"the final model, {row['trial_name']}," if final else "the best trial on validation,"
        return pd.DataFrame([row]), "", (f"{what} scored on the {row['split']} split at the decision it ships with "
                                         "(95% CI)")
    table = T.best_per_backbone(run)
    table = table.assign(split="val")
    return table, "best_val_", ("each backbone's best trial on the validation split (no test evaluation yet: "
                                "published numbers are mostly on test, so read these as optimistic)")


def _published_table(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "ours": table["ours"], "split": table["split"], "metric": table["metric"],
        "ours value": [ci_text(v, lo, hi) for v, lo, hi in zip(table["ours_value"], table["ours_ci_low"], table["ours_ci_high"])],
        "published": table["published_value"].map(lambda v: T.format_value(v, "published")),
        "delta": table["delta"].map(lambda v: "" if pd.isna(v) else f"{v:+.4f}"),
        "comparison": table["comparison"],
        "published model": table["published_model"].astype(str) + " (" + table["published_protocol"].astype(str) + ")",
        "published config": table["published_config"].map(lambda v: short(v, 70)),
        "n": table["published_n"].map(lambda v: T.format_value(v, "n")),
        "citation": table["citation"],
    })
    return out


def short(text, width: int) -> str:
    text = "" if text is None or (isinstance(text, float) and text != text) else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def ci_text(value, low, high) -> str:
    if value is None or pd.isna(value):
        return ""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def ci_cell(value, low, high, digits: int = 4) -> str:
    """A value over its interval on a second line (``"0.875\\n[0.817, 0.933]"``): one cell, two lines in HTML,
    one line in Markdown."""
    if value is None or pd.isna(value):
        return ""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f}\n[{low:.{digits}f}, {high:.{digits}f}]"


def test_section(run: T.Run, record: dict | None, evaluation: dict | None, eval_error: str | None) -> Section:
    s = Section("Held-out test evaluation")
    if eval_error:
        s.text(f"The test evaluation requested with --evaluate failed: `{eval_error}`")
    if evaluation is None:
        val = read_evaluations(run.path, "val")
        if record is not None:
            s.text("test_evaluation.json logs a use of the test split but holds no finished evaluation.")
        s.text("Not run yet: `python -m analysis.evaluate RUN_DIR` (or `python -m analysis.report RUN_DIR "
               "--evaluate`). The search never loads the test split; only this evaluation does.")
        if latest_evaluation(val) is not None:
            s.text("A validation-split evaluation (val_evaluation.json) exists; it is not shown here: the trials "
                   "were chosen on that split, so its scores are optimistic.")
        _test_log(s, record)
        return s
    n = evaluation.get("n")
    level = evaluation.get("level", 0.95)
    split = evaluation.get("split", "test")
    s.text(f"The top {len(evaluation.get('trials') or [])} trial(s) by {T.label(evaluation.get('metric') or run.metric)}, "
           f"scored on the held-out {split} split ({n} images), evaluated "
           f"{evaluation.get('evaluated_at', '?')}. Under each {split} value: its {int(round(100 * level))}% percentile "
           f"bootstrap interval over {evaluation.get('n_boot')} resamples of the images (seed {evaluation.get('seed')}); "
           f"values carry the decimals one image can move.")
    for note in evaluation.get("notes") or []:
        s.text(f"Note: {note}")
    resolution = validation_resolution(run)
    if resolution:
        s.text(resolution)
    resolution = test_resolution(run, evaluation)
    if resolution:
        s.text(resolution)
    s.table(evaluation_table(evaluation, run))
    confusion = confusion_table(evaluation)
    if confusion is not None:
        s.sub(CONFUSION_TITLE.format(model=(final_evaluated(evaluation) or {}).get("label", "the final model"),
                                     split=split))
        s.text(f"Decision: {evaluation.get('decision') or 'the argmax'}. Rows: the true class; columns: the class "
               "the shipped model calls.")
        s.table(confusion)
    per_class = per_class_table(evaluation, run)
    if per_class is not None:
        shown = final_evaluated(evaluation) or best_evaluated(evaluation) or {}
        s.sub(f"Per class: {shown.get('label') or shown.get('trial_name', 'the best trial')} on {split}, at the "
              "decision it ships with")
        s.table(per_class)
    _test_log(s, record)
    return s


def final_model_section(run: T.Run, evaluation: dict | None) -> Section:
    """analysis.evaluate's final model: each candidate beside the single best, calibration, operating point."""
    s = Section("Final model: ensemble, calibration, operating point")
    final = (evaluation or {}).get("final")
    if not final:
        s.text("Not evaluated yet: `python -m analysis.evaluate RUN_DIR` fits a temperature and a threshold on "
               "validation (`--ensemble K|auto`, `--tta flips|dihedral`, `--target-sensitivity S` add to it) and "
               "scores the final model on test.")
        return s
    split = evaluation.get("split", "test")
    d = decimals_for(1 / evaluation["n"]) if evaluation.get("n") else 4
    s.text(f"Final model: **{final['model']}** ({final.get('chosen_by') or 'chosen on validation'}), written to "
           "final_model.json: the one model `search.predict`, `analysis.export`, `Results.predict` and every table "
           "here serve. Decision: " + (evaluation.get("decision") or "see final_model.json") + ". Ensemble size, "
           f"temperature and threshold are fitted on the validation split only; scores are on {split}, at each "
           "model's shipped decision, over their bootstrap intervals. ECE: top-label confidence, 15 equal-width "
           "bins. Brier: halved for two classes (scikit-learn's).")
    if (run.path / "model_card.md").is_file():
        s.text("The model card, with intended use, data, results at the operating point and limitations: "
               "[model_card.md](model_card.md).")
    rows = []
    for m in final.get("models") or []:
        c, metrics, ci = m["calibration"], m["metrics"], m["ci"]
        rows.append({"model": m["label"] + (" (final)" if m["label"] == final["model"] else ""),
                     T.label(f"{split}_balanced_accuracy"): ci_cell(metrics.get("balanced_accuracy"),
                                                                    *ci["balanced_accuracy"][:2], digits=d),
                     T.label(f"{split}_auc"): ci_cell(metrics.get("auc"), *ci["auc"][:2], digits=d),
                     "temperature": f"{c['temperature']:.3f}",
                     "ECE before / after": f"{c['before']['ece']:.4f} / {c['after']['ece']:.4f}",
                     "Brier before / after": f"{c['before']['brier']:.4f} / {c['after']['brier']:.4f}"})
    s.table(pd.DataFrame(rows))
    chosen = next((m for m in final.get("models") or [] if m["label"] == final["model"]), None) or {}
    op = chosen.get("operating_point")
    if op:
        at, ci = op["at_threshold"], op["ci"]
        s.sub(f"Operating point for {op['class']}: threshold {op['value']:.4f} ({rule_text(op)})")
        s.table(pd.DataFrame([{"": split, **{T.label(m): ci_cell(at[m], *ci[m][:2], digits=d) for m in BINARY_METRICS},
                               "TP / FN / FP / TN": f"{at['tp']} / {at['fn']} / {at['fp']} / {at['tn']}"},
                              {"": "validation", **{T.label(m): ci_cell(op["validation"][m], None, None, d) or "n/a"
                                                   for m in BINARY_METRICS},
                               "TP / FN / FP / TN": " / ".join(str(op["validation"].get(k, "")) for k in
                                                               ("tp", "fn", "fp", "tn"))}]))
        if op.get("wilson"):  # STARD-style: proportions with Wilson intervals, beside the bootstrap
            s.text(f"{int(round(100 * evaluation.get('level', 0.95)))}% Wilson intervals of the {split} proportions "
                   "(from the confusion counts; beside the bootstrap's above, and informative at 0/n and n/n): "
                   + ", ".join(f"{T.label(m)} [{lo:.{d}f}, {hi:.{d}f}]" for m, (lo, hi) in op["wilson"].items()
                               if lo is not None and hi is not None) + ".")
        if op.get("at_prevalence"):
            s.sub(f"PPV and NPV where the model is used ({op['class']} at its threshold, sensitivity and specificity "
                  f"from {split})")
            s.text(PREVALENCE_NOTE + " The first row is this test set's; the others are "
                   + ("the intended setting's, stated for the study." if any(r["source"] == "stated" for r in
                                                                          op["at_prevalence"]) else
                      "typical settings, as none was stated (`Study(prevalence=...)` or `--prevalence P`)."))
            s.table(prevalence_frame(op["at_prevalence"], d))
    if chosen.get("one_vs_rest"):
        s.sub("Per class, one vs rest at the shipped decision")
        s.table(pd.DataFrame([{"class": c, T.label("sensitivity"): ci_cell(o["sensitivity"], *o["ci"]["sensitivity"][:2], digits=d),
                               T.label("specificity"): ci_cell(o["specificity"], *o["ci"]["specificity"][:2], digits=d)}
                              for c, o in chosen["one_vs_rest"].items()]))
    if final.get("reliability_plot") and (run.path / final["reliability_plot"]).is_file():
        s.plot(Plot("reliability", "Reliability diagram", run.path / final["reliability_plot"],
                    "before and after temperature scaling"))
    return s


def curves_section(run: T.Run, evaluation: dict | None) -> Section:
    """The final model's ROC and precision-recall curves on test (analysis.curves), with the operating point."""
    s = Section("ROC and precision-recall curves")
    if not (evaluation or {}).get("final"):
        s.text("Not drawn yet: the curves are the final model's on the test split, from `python -m "
               "analysis.evaluate RUN_DIR` (test_predictions.parquet and test_evaluation.json).")
        return s
    plots, curves, info = curve_plots(run.path, evaluation, run.path / PLOTS_DIR)
    if not curves:
        for p in plots:
            s.plot(p)
        return s
    d = decimals_for(1 / info["n"]) if info.get("n") else 4
    pct = int(round(100 * info["level"]))
    op = info["threshold"]
    s.text(f"{info['model']} on the {info['split']} split ({info['n']} images), its calibrated probabilities "
           f"(T = {info['temperature']:.3f}, the ones the threshold applies to); "
           + ("the positive class against the rest" if len(info["classes"]) == 2 else "each class against the rest")
           + f". Bands and intervals: {pct}% percentile bootstrap over the evaluation's own {info['n_boot']} "
           f"resamples (seed {info['seed']}), so they pair with the tables above. "
           + (f"The star is the threshold {op['value']:.4f} chosen on validation, where it falls on the "
              f"{info['split']} images." if op else "Circles: the argmax decision, one class against the rest."))
    rows = []
    for c in curves:
        row = {"class": c.name, "positive / negative": f"{c.n_positive} / {c.n_negative}",
               T.label(f"{info['split']}_auc"): ci_cell(c.auc, *c.auc_ci, digits=d),
               T.label(f"{info['split']}_average_precision"): ci_cell(c.average_precision, *c.average_precision_ci,
                                                                      digits=d)}
        if c.point:
            row["marked point: sensitivity / specificity"] = (f"{c.point['tpr']:.{d}f} / {1 - c.point['fpr']:.{d}f}"
                                                               f"\n({'threshold' if c.point['kind'] == 'threshold' else 'argmax'})")
        rows.append(row)
    s.table(pd.DataFrame(rows))
    if len(curves) == 1:  # one panel each: ROC and precision-recall side by side
        s.row(plots)
    else:
        for p in plots:
            s.plot(p)
    return s


EXPLAIN_TITLE = "Where the model looks"


def explain_part(run: T.Run, evaluation: dict | None) -> Section:
    """The Grad-CAM panel, ``analysis.explain.explain_section(run, evaluation)``; an error becomes a note."""
    s = Section(EXPLAIN_TITLE)
    try:
        made = explain_section(run, evaluation)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still matters
        s.text(f"Not drawn: {type(exc).__name__}: {exc}")
        return s
    s.blocks = list(getattr(made, "blocks", None) or [])
    if not s.blocks:
        s.text("Not drawn: analysis.explain returned nothing to show.")
    return s


def _test_log(s: Section, record: dict | None) -> None:
    log = (record or {}).get("test_split_log") or []
    if log:
        when = ", ".join(str(e.get("test_split_used_at", "?")) for e in log[-5:])
        s.text(f"The test split has been read {len(log)} time(s) (test_split_log in test_evaluation.json; "
               f"latest: {when}). Each look at the test set makes it a little less held out.")


TEST_TABLE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def evaluation_table(evaluation: dict, run: T.Run) -> pd.DataFrame:
    """One row per evaluated trial: rank, trial, its validation score, then each test metric over its interval.

    At most 8 columns, so it fits a 1280 px window: per-class recall is in the
    per-class table, except the positive class's (binary studies).
    """
    split = evaluation.get("split", "test")
    positive = evaluation.get("positive_class")
    shown = [*TEST_TABLE_METRICS, *([f"recall_{positive}"] if positive else [])]
    metric = evaluation.get("metric") or run.metric
    score_column = f"best_{metric}"
    val_step = image_step(metric, split_class_counts(run, "val"))
    val_digits = decimals_for(val_step[0]) if val_step else 4
    n = evaluation.get("n")
    test_digits = decimals_for(1 / n) if n else 4
    rows = []
    for t in sorted(evaluation.get("trials") or [], key=lambda t: t.get("rank", 0)):
        metrics, ci = t.get("metrics") or {}, t.get("ci") or {}
        value = t.get(score_column)
        row = {"rank": t.get("rank"), "trial": t.get("trial_name"),
               T.label(score_column): "" if value is None or pd.isna(value) else f"{value:.{val_digits}f}"}
        for m in shown:
            low, high = (ci.get(m) or [None, None])[:2]
            row[T.label(f"{split}_{m}")] = ci_cell(metrics.get(m), low, high, digits=test_digits)
        rows.append(row)
    return pd.DataFrame(rows)


CONFUSION_TITLE = "Confusion matrix of {model} at its shipped decision, on {split}"


def confusion_table(evaluation: dict) -> pd.DataFrame | None:
    """The final model's confusion matrix at its shipped decision (rows true, columns called), from the record."""
    final = final_evaluated(evaluation)
    if not final or not final.get("confusion_matrix") or not final.get("class_names"):
        return None
    names = final["class_names"]
    rows = [{"true class": c, **{f"called {d}": str(int(n)) for d, n in zip(names, counts)}}
            for c, counts in zip(names, final["confusion_matrix"])]
    return pd.DataFrame(rows)


def per_class_table(evaluation: dict, run: T.Run | None = None) -> pd.DataFrame | None:
    """Precision, recall and F1 per class for the final model (the best trial before one was fitted) at its
    shipped decision, each over its interval, and the support."""
    best = final_evaluated(evaluation) or best_evaluated(evaluation)
    if not best or not best.get("class_names"):
        return None
    metrics, ci = best.get("metrics") or {}, best.get("ci") or {}
    report = best.get("classification_report") or {}
    n = evaluation.get("n")
    digits = decimals_for(1 / n) if n else 4
    rows = []
    for c in best["class_names"]:
        row = {"class": c}
        for m in ("precision", "recall", "f1"):
            low, high = (ci.get(f"{m}_{c}") or [None, None])[:2]
            row[T.label(m)] = ci_cell(metrics.get(f"{m}_{c}"), low, high, digits=digits)
        support = (report.get(c) or {}).get("support")
        row["images"] = "" if support is None else str(int(support))
        rows.append(row)
    return pd.DataFrame(rows)


