"""``python -m analysis.evaluate RUN_DIR``: the final model, fitted on validation, and the top-k trials on the test split.

The search never decodes the test split (``search.prepare``); this module is
the one place that reads test images to score models, once per run, logged in
``RUN_DIR/test_evaluation.json`` (``analysis.splits.log_test_use``). Trials are
ranked by the study's own validation metric and mode (``analysis.reader``);
test results never feed back into any choice.

The stages, each a function below:

1. **open**: the folder, the plan (every option checked before any model loads), the top trials' models;
2. **validation predictions**: each (checkpoint, view) once, cached in ``val_predictions_cache.parquet``;
3. **fit**: the ensemble size per family (with and without TTA, separately; ``--ensemble auto``), a temperature
   per model (``analysis.calibration``) and a threshold for the positive class (``analysis.operating_point``:
   ``--target-sensitivity``, ``--target-specificity`` or Youden's J); the final model is written to
   ``final_model.json`` (``analysis.final_model``) before the evaluated split is read;
4. **predict** the evaluated split, each (checkpoint, view) once (for ``--split val``: reused from stage 2);
5. **score** every model as it ships: its calibrated probabilities and its decision rule, with 95% percentile
   bootstrap intervals over resampled images (``analysis.bootstrap``; one seed, so intervals pair);
6. **write** ``<split>_predictions.parquet``, ``<split>_evaluation.json``, the reliability diagram and, for
   the test split, ``model_card.md``.

``<split>_predictions.parquet`` has one row per model and image: ``trial`` (the
model's label), ``members``, ``tta``, ``temperature``, ``threshold``,
``positive_class``, ``final`` (whether it is the final model), ``path`` (relative
to the dataset's root), ``label``, ``label_index``, ``predicted`` (its decision)
and ``prob_<class>`` (its calibrated probabilities): the final model's rows are
what ``FinalModel.predict`` returns for those images.
"""

from __future__ import annotations

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import operating_point as op
from analysis.bootstrap import LEVEL, bootstrap_ci, point_metrics
from analysis.calibration import apply_temperature, calibration_scores, diagram_bins
from analysis.errors import AnalysisError, EvaluateError, ResultsFolderError
from analysis.files import FINAL_MODEL, PLOTS_DIR, VAL_PREDICTIONS, evaluation_file, predictions_file
from analysis.final_model import member_probabilities
from analysis.honest import other_trials_predictions, selection_estimate
from analysis.model_card import write_model_card
from analysis.plots import reliability_plot
from analysis.options import add_final_model_arguments, check_final_model_arguments, final_model_options
from analysis.prevalence import at_prevalences, prevalences_for, stated_prevalence
from analysis.selection import (CHOSEN_ON_VALIDATION, Candidate, FinalPlan, candidates_for, choose_final, say_choice,
                                ensemble_sizes, final_model_record, fit_on_validation, per_trial_entry, plan_final)
from analysis.records import format_final, format_table, read_evaluations
from analysis.refit import check_refit, refit_final
from analysis.reader import Loaded, load_trial_model, ranked_trials, read_record, read_study, trial_from_row
from analysis.splits import (SPLIT_NAMES, append_record, decode_split, fold_rows, jsonable,
                             label_indices, log_test_use, now, read_split, split_class_names)
from analysis.files import write_file, write_table
from search.argtypes import ArgumentParser

__all__ = ["EvaluateError", "evaluate_top_k", "validation_predictions", "predict_rows", "Shipped", "score_model",
           "main"]

# --------------------------------------------------------------------------
# validation predictions: each (checkpoint, view) once
# --------------------------------------------------------------------------


def validation_rows(run_dir: Path, rows: pd.DataFrame, split: str, data_dir: str | None = None) -> pd.DataFrame:
    """The rows the final model's temperature and threshold are fitted on: the val split, or, for a
    cross-validated study (``cv_folds``: a ``fold`` column in splits.parquet), all of train ∪ val, each
    predicted by the one fold model that never trained on it (``predict_rows``): the out-of-fold predictions
    are the only held-out predictions such a study has, and they cover k times more images than val."""
    folds = fold_rows(run_dir, data_dir)
    if folds is not None:
        return folds
    return rows if split == "val" else read_split(run_dir, "val", data_dir)


def predict_rows(model, images: np.ndarray, rows: pd.DataFrame, mode: str | None, batch_size: int) -> np.ndarray:
    """``member_probabilities``, except that rows of a cross-validated study's train ∪ val (a ``fold``) are
    predicted out of fold, by the fold model of a fold ensemble that never trained on them."""
    from trainables.checkpoint import fold_classifiers

    members = fold_classifiers(model) if "fold" in rows.columns and rows["fold"].notna().any() else None
    if members is None:
        return member_probabilities(model, images, mode, batch_size)
    folds = pd.Series(rows["fold"].to_numpy()).fillna(-1).to_numpy()
    out = member_probabilities(model, images, mode, batch_size) if (folds == -1).any() else \
        np.zeros((len(rows), model.output_shape[-1]))
    for f, member in enumerate(members):
        at = np.flatnonzero(folds == f)
        if len(at):
            out[at] = member_probabilities(member, images[at], mode, batch_size)
    return out


def validation_predictions(run_dir: Path, rows: pd.DataFrame, models: list, modes: list[str], *,
                           batch_size: int, log=print) -> dict[tuple[str, str], np.ndarray]:
    """Validation probabilities of every model in ``models`` under every TTA mode in ``modes`` (``"none"``
    for plain), keyed ``(trial, mode)``; cached in ``RUN_DIR/val_predictions_cache.parquet``.

    They are recomputed from the checkpoints rather than kept by the trials:
    which epoch ends up checkpointed is known only afterwards, and the decoding
    is exactly the one the test split gets here (``decode_split``). The cache
    has the prediction columns plus ``tta`` and ``checkpoint``; a row set is
    reused only for the same trial, checkpoint, mode and validation images in the
    same order, so a resumed study that checkpointed a better epoch is scored again.
    """
    path = run_dir / VAL_PREDICTIONS
    cached = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    names = rows["image"].tolist()
    out, fresh, decoded = {}, [], {}
    for m in models:
        checkpoint = m.trial.checkpoint.relative_to(run_dir).as_posix()
        for mode in modes:
            hit = cached[(cached["trial"] == m.trial.name) & (cached["tta"] == mode)
                         & (cached["checkpoint"] == checkpoint)] if len(cached) else cached
            columns = [f"prob_{c}" for c in m.class_names]
            if len(hit) and hit["path"].tolist() == names and set(columns) <= set(hit.columns):
                out[(m.trial.name, mode)] = hit[columns].to_numpy(dtype=np.float64)
                continue
            if m.size not in decoded:
                decoded[m.size] = decode_split(rows, m.size)
            probs = predict_rows(m.model, decoded[m.size], rows, None if mode == "none" else mode, batch_size)
            out[(m.trial.name, mode)] = probs
            table = pd.DataFrame({"trial": m.trial.name, "path": names, "label": rows["label"].astype(str),
                                  "label_index": label_indices(rows, m.class_names),
                                  **{f"prob_{c}": probs[:, i] for i, c in enumerate(m.class_names)},
                                  "tta": mode, "checkpoint": checkpoint})
            fresh.append(table)
    if fresh:
        keys = {(t["trial"].iloc[0], t["tta"].iloc[0]) for t in fresh}
        kept = cached[[(a, b) not in keys for a, b in zip(cached["trial"], cached["tta"])]] if len(cached) else cached
        write_table(pd.concat([kept, *fresh], ignore_index=True), path)
        log(f"note: validation predictions of {len(fresh)} model/view set(s) computed and cached in {VAL_PREDICTIONS}")
    return out


# --------------------------------------------------------------------------
# scoring: every model as it ships (calibrated probabilities, its decision rule)
# --------------------------------------------------------------------------


@dataclass
class Shipped:
    """One model's probabilities and decisions on the evaluated split, as it ships."""

    candidate: Candidate
    fitted: dict
    raw: np.ndarray
    probs: np.ndarray = field(init=False)
    decisions: np.ndarray = field(init=False)
    positive: int | None = None

    def __post_init__(self):
        self.probs = apply_temperature(self.raw, self.fitted["temperature"]["temperature"])
        threshold = self.fitted["threshold"]
        self.decisions = self.probs.argmax(axis=1) if threshold is None else \
            op.decide(self.probs, self.positive, threshold["value"])


def score_model(shipped: Shipped, y, class_names: list[str], *, n_boot: int, seed: int, level: float,
                positive_for_auc: int | None, prevalence: float | None = None) -> dict:
    """One model on the evaluated split, at its shipped decision: every metric with its interval, the confusion
    matrix (and the argmax one, labelled), calibration before and after, and the operating point or, for more
    than two classes, per-class one-vs-rest sensitivity and specificity."""
    from sklearn.metrics import classification_report, confusion_matrix

    c, probs, decisions = shipped.candidate, shipped.probs, shipped.decisions
    labels = list(range(len(class_names)))
    values = point_metrics(y, probs, class_names, positive_for_auc, predicted=decisions)
    ci = bootstrap_ci(y, probs, class_names, n_boot=n_boot, seed=seed, positive=positive_for_auc, level=level,
                      predicted=decisions)
    threshold = shipped.fitted["threshold"]
    record = {
        "label": c.label, "trials": list(c.members), "tta": c.tta, "metrics": values, "ci": {m: list(ci[m]) for m in values},
        "decision": "argmax" if threshold is None else "threshold",
        "calibration": {"temperature": shipped.fitted["temperature"]["temperature"],
                        "validation": shipped.fitted["temperature"],
                        "before": calibration_scores(shipped.raw, y), "after": calibration_scores(probs, y),
                        "bins_before": diagram_bins(shipped.raw, y), "bins_after": diagram_bins(probs, y)},
        "confusion_matrix": confusion_matrix(y, decisions, labels=labels).tolist(),
        "confusion_matrix_argmax": confusion_matrix(y, probs.argmax(axis=1), labels=labels).tolist(),
        "classification_report": classification_report(y, decisions, labels=labels, target_names=class_names,
                                                       output_dict=True, zero_division=0),
        "classification_report_text": classification_report(y, decisions, labels=labels, target_names=class_names,
                                                             digits=4, zero_division=0),
        "class_names": class_names,
    }
    if threshold is not None:
        scores, is_pos = probs[:, shipped.positive], y == shipped.positive
        record["operating_point"] = {
            "class": class_names[shipped.positive], **threshold, "at_threshold": op.binary_at(is_pos, scores, threshold["value"]),
            "ci": {m: list(v) for m, v in op.binary_ci(is_pos, scores, threshold["value"], n_boot=n_boot, seed=seed,
                                                       level=level).items()},
            "wilson": op.wilson_intervals(op.binary_at(is_pos, scores, threshold["value"]), level),
            # PPV and NPV hold only at a prevalence: the test set's, and the intended setting's (or typical ones)
            "at_prevalence": at_prevalences(is_pos, scores >= threshold["value"],
                                            prevalences_for(prevalence, float(is_pos.mean())),
                                            n_boot=n_boot, seed=seed, level=level),
        }
    if len(class_names) > 2:
        ovr = op.one_vs_rest(y, decisions, class_names)
        ovr_ci = op.one_vs_rest_ci(y, decisions, class_names, n_boot=n_boot, seed=seed, level=level)
        record["one_vs_rest"] = {n: {**ovr[n], "ci": {m: list(v) for m, v in ovr_ci[n].items()}} for n in class_names}
    return record


# --------------------------------------------------------------------------
# the evaluation, in stages
# --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What the stages share: the folder, the request and the loaded models."""

    run_dir: Path
    study: dict
    split: str
    rows: pd.DataFrame  # the evaluated split
    val_rows: pd.DataFrame  # what is fitted on
    classes: list[str]
    plan: FinalPlan
    models: list[Loaded]
    notes: list[str]
    k: int
    n_boot: int
    seed: int
    level: float
    batch_size: int
    log: object
    prevalence: float | None = None  # of the positive class where the model will be used (stated), if any
    prevalence_source: str | None = None  # "--prevalence" or "Study(prevalence=...)"
    data_dir: str | None = None  # where the dataset now lives, if it moved
    refit: list[Loaded] = field(default_factory=list)  # the final model's members trained on train + val (--refit)

    @property
    def names(self) -> list[str]:
        return [m.trial.name for m in self.models]

    @property
    def modes(self) -> list[str]:
        return ["none"] + ([self.plan.tta_mode] if self.plan.tta_mode else [])

    @property
    def positive_for_auc(self) -> int | None:
        name = self.study.get("dataset", {}).get("positive_class")
        return self.classes.index(name) if name in self.classes else None

    @property
    def metric(self) -> str:
        return str(self.study.get("metric", "val_balanced_accuracy")).removeprefix("val_")


@dataclass
class Fit:
    """Stage 3's result: the candidates, what was fitted for each, and the final model."""

    candidates: list[Candidate]
    fitted: dict  # label -> fit_on_validation (each trial alone under its own name too)
    val_scores: dict
    final: Candidate
    record: dict  # final_model.json


def evaluate_top_k(run_dir: str | Path, k: int = 3, n_boot: int = 1000, seed: int = 0, *, split: str = "test",
                   batch_size: int = 64, level: float = LEVEL, log=print, ensemble: int | str | None = None,
                   tta: str | None = None, target_sensitivity: float | None = None,
                   target_specificity: float | None = None, positive_class: str | None = None,
                   prevalence: float | None = None, data_dir: str | None = None, refit: bool = False) -> pd.DataFrame:
    """Fit the final model on validation, then score it and the ``k`` best trials on ``split``; write the records.

    Returns one row per evaluated trial, best first: ``rank``, ``trial_name``,
    ``backbone``, ``status``, ``best_<study metric>`` (validation), ``split``,
    ``n``, every metric (at the model's shipped decision), and
    ``<metric>_ci_low`` / ``<metric>_ci_high``; then one row per ensemble or TTA
    candidate (``rank`` empty, ``trial_name`` its label). Trials without a
    checkpoint, or whose checkpoint cannot be loaded, are skipped with a note
    (``log``) and the next one is taken, so a study still running can be evaluated.
    ``prevalence``: the positive class's share where the model will be used (else the study's), for PPV and NPV.
    ``data_dir``: where the study's dataset now lives, if it moved (``analysis.splits.image_paths``).
    ``refit``: train the final model's members again on train ∪ val (``analysis.refit``) and ship those; the
    model before the refit is scored beside it.
    """
    if k < 1:
        raise EvaluateError(f"k must be >= 1, got {k}")
    if refit:
        check_refit(split)
    run_dir = Path(run_dir).expanduser().resolve()
    with evaluation_lock(run_dir, log):  # two evaluations would interleave final_model.json and the test log
        ev = open_evaluation(run_dir, k, split, n_boot=n_boot, seed=seed, level=level,
                             batch_size=batch_size, log=log, ensemble=ensemble, tta=tta,
                             target_sensitivity=target_sensitivity, target_specificity=target_specificity,
                             positive_class=positive_class, prevalence=prevalence, data_dir=data_dir)
        val = validation_predictions(ev.run_dir, ev.val_rows, ev.models, ev.modes, batch_size=batch_size, log=log)
        fit = fit_final(ev, val, refit=refit)
        probs = split_predictions(ev, fit, val)
        return write_evaluation(ev, fit, probs)


@contextlib.contextmanager
def evaluation_lock(run_dir: Path, log=print):
    """Hold ``run_dir``'s evaluation lock (``search.folder_lock``) while evaluating; another evaluation's is refused."""
    from search.folder_lock import EVALUATE_LOCK, FolderLock, FolderLockedError
    from search.storage import StudyFolder

    if not run_dir.is_dir():
        yield  # open_evaluation names the missing folder
        return
    lock = FolderLock(StudyFolder(run_dir.parent, run_dir.name), EVALUATE_LOCK, note=log)
    try:
        lock.acquire()
    except FolderLockedError as exc:
        raise EvaluateError(str(exc)) from None
    try:
        yield
    finally:
        lock.release()


def open_evaluation(run_dir: Path, k: int, split: str, **options) -> Evaluation:
    """Stage 1: the folder's record, split, ranking and plan, then the top trials' models (lost ones skipped)."""
    plan_options = {n: options.pop(n) for n in ("ensemble", "tta", "target_sensitivity", "target_specificity",
                                                 "positive_class")}
    data_dir = options.pop("data_dir", None)
    prevalence, source = stated_prevalence(options.pop("prevalence", None), read_record(run_dir))
    try:
        study = read_study(run_dir)
        ranked, notes = ranked_trials(run_dir, study)
        classes = split_class_names(run_dir)
        plan = plan_final(study, classes, len(ranked), run_dir, **plan_options)  # bad options: before the images
        if prevalence is not None and plan.positive is None:
            raise EvaluateError(f"{source}: a prevalence is of a positive class, and this evaluation has none "
                                f"(classes {classes}); name one with --positive-class NAME, or leave the prevalence out")
        rows = read_split(run_dir, split, data_dir)
        val_rows = validation_rows(run_dir, rows, split, data_dir)  # out-of-fold train ∪ val for a cross-validated study
    except ResultsFolderError as exc:
        raise EvaluateError(str(exc)) from None
    models = []
    for _, row in ranked.iterrows():
        if len(models) == max(k, plan.n_members_max):
            break
        try:
            trial = trial_from_row(run_dir, study, row)  # the ranked row itself: no second leaderboard read
            model, class_names, size = load_trial_model(trial, run_dir, study)
        except ResultsFolderError as exc:  # a lost checkpoint; one leading out of the folder (OutsideFolderError) stops all
            notes.append(f"{row['trial_name']}: skipped ({exc})")
            continue
        if row.get("status") in ("running", "interrupted"):
            notes.append(f"{row['trial_name']}: {row['status']}; its best checkpoint so far is evaluated")
        models.append(Loaded(row, trial, model, class_names, size))
    if 0 < len(models) < k:
        notes.append(f"only {len(models)} trial(s) with a usable checkpoint; evaluated {len(models)} of the {k} asked for")
    for note in notes:
        options["log"](f"note: {note}")
    _check_models(run_dir, models, plan, classes, len(ranked))
    return Evaluation(run_dir, study, split, rows, val_rows, classes, plan, models, notes, k, **options,
                      prevalence=prevalence, prevalence_source=source, data_dir=data_dir)


def _check_models(run_dir: Path, models: list[Loaded], plan: FinalPlan, classes: list[str], n_ranked: int) -> None:
    if not models:
        raise EvaluateError(f"no trial of {str(run_dir)!r} has a checkpoint that loads ({n_ranked} with a "
                            "recorded checkpoint); let the study run until a trial finishes an epoch")
    if isinstance(plan.ensemble, int) and len(models) < plan.ensemble:
        raise EvaluateError(f"--ensemble {plan.ensemble}: only {len(models)} trial(s) have a checkpoint that loads "
                            f"(see the notes above); use --ensemble {len(models)} or less")
    for m in models:
        if m.class_names != classes:
            raise EvaluateError(f"{m.trial.name} was trained with classes {m.class_names}, but splits.parquet orders "
                                f"them {classes}; is {str(run_dir)!r} the run its checkpoint came from?")


def fit_final(ev: Evaluation, val: dict, refit: bool = False) -> Fit:
    """Stage 3: ensemble sizes per family, a temperature and threshold per model, the final model (with ``refit``,
    its members trained again on train ∪ val); writes ``final_model.json`` before the evaluated split is read."""
    y_val = label_indices(ev.val_rows, ev.classes)
    names = ev.names
    sizes = ensemble_sizes(ev.plan, names, val, y_val, ev.classes, ev.study, ev.positive_for_auc, ev.log)
    candidates = candidates_for(names, sizes, ev.plan.tta_mode)
    fitted = {n: fit_on_validation(val[(n, "none")], y_val, ev.plan) for n in names}
    for c in candidates:
        if c.label not in fitted:
            fitted[c.label] = fit_on_validation(c.probs(val), y_val, ev.plan)
    # What each candidate scores on validation (argmax, before calibration), before any test number.
    val_scores = {c.label: point_metrics(y_val, c.probs(val), ev.classes, ev.positive_for_auc).get(ev.metric, math.nan)
                  for c in candidates}
    final = choose_final(candidates, val_scores, ev.plan, ev.study.get("mode", "max"))
    say_choice(ev.plan, final, val_scores, names[0], ev.metric, ev.log)
    checkpoints = {m.trial.name: m.trial.checkpoint.relative_to(ev.run_dir).as_posix() for m in ev.models}
    per_trial = {n: per_trial_entry(fitted[n], ev.classes, ev.plan) for n in names}
    record = final_model_record(ev.study, ev.classes, ev.plan, final, fitted[final.label], per_trial,
                                len(ev.val_rows), sizes, checkpoints)
    record["validation_scores"] = {"metric": ev.metric, "by_model": val_scores}
    others = other_trials_predictions(ev, lambda models: validation_predictions(
        ev.run_dir, ev.val_rows, models, ["none"], batch_size=ev.batch_size, log=lambda _: None))
    record["selection_corrected"] = selection_estimate(ev, val, candidates, y_val, others)
    record["chosen_by"] = (CHOSEN_ON_VALIDATION if ev.plan.chosen_on_validation else
                           "given: the combination --ensemble and --tta asked for")
    if "fold" in ev.val_rows.columns:  # cross-validated: fitted on the out-of-fold predictions of train ∪ val
        record["fitted_on"]["split"] = "train+val, out of fold"
        record["fitted_on"]["cv_folds"] = int(ev.val_rows["fold"].nunique())
    if refit:  # the model before the refit stays a candidate: it is scored beside the refit one
        refitted, ev.refit, record["refit"] = refit_final(ev, final, record)
        if refitted is not None:
            fitted[refitted.label] = fitted[final.label]
            candidates, final = [*candidates, refitted], refitted
    write_file(ev.run_dir / FINAL_MODEL, (json.dumps(jsonable(record), indent=1, allow_nan=False) + "\n").encode())
    return Fit(candidates, fitted, val_scores, final, record)


def split_predictions(ev: Evaluation, fit: Fit, val: dict) -> dict:
    """Stage 4: the evaluated split's probabilities per (trial, view) that a scored model needs, each computed
    once; for ``--split val`` the validation predictions of stage 2 themselves."""
    wanted = {(n, "none") for n in ev.names[:ev.k]} | {(n, c.tta or "none") for c in fit.candidates for n in c.members}
    if ev.split == "val" and ev.val_rows is ev.rows:
        return {key: val[key] for key in wanted}
    models = ev.models + ev.refit
    needed = [m.trial.name for m in models if any(m.trial.name == w for w, _ in wanted)]  # in rank order
    if ev.split == "test":  # record the look at the test set before anything can fail
        reads = len((read_evaluations(ev.run_dir) or {}).get("test_split_log") or [])
        if reads:  # said aloud before reading, not only logged
            ev.log(f"note: the test split has been read {reads} time(s) before (test_evaluation.json's "
                   "test_split_log). Each look lets later choices (trials, thresholds, ensembles) drift toward it, so "
                   "these numbers are less of an unseen-data estimate than the first; choose on validation "
                   "(--split val) and read test once")
        log_test_use(ev.run_dir, trials=needed, n_test=len(ev.rows), by="analysis.evaluate")
    decoded = {size: decode_split(ev.rows, size) for size in sorted({m.size for m in models if m.trial.name in needed})}
    return {(m.trial.name, mode): predict_rows(m.model, decoded[m.size], ev.rows, None if mode == "none" else mode,
                                               ev.batch_size)
            for m in models for mode in ev.modes if (m.trial.name, mode) in wanted}


def write_evaluation(ev: Evaluation, fit: Fit, probs: dict) -> pd.DataFrame:
    """Stages 5 and 6: score every model as it ships, then write the predictions, the record and the card."""
    y = label_indices(ev.rows, ev.classes)
    metric_column = f"best_{ev.study.get('metric', 'val_balanced_accuracy')}"
    score = {"n_boot": ev.n_boot, "seed": ev.seed, "level": ev.level, "positive_for_auc": ev.positive_for_auc,
             "prevalence": ev.prevalence}
    table, predictions, records, scored = [], [], [], []
    for rank, m in enumerate(ev.models[:ev.k], start=1):
        shipped = Shipped(Candidate(m.trial.name, (m.trial.name,), None), fit.fitted[m.trial.name],
                          probs[(m.trial.name, "none")], positive=ev.plan.positive)
        result = score_model(shipped, y, ev.classes, **score)
        table.append({"rank": rank, "trial_name": m.trial.name, "backbone": m.trial.backbone,
                      "status": m.row.get("status"), metric_column: m.trial.value, **_table_cells(ev, result)})
        predictions.append(_prediction_rows(ev, shipped, fit.final.label))
        records.append({"rank": rank, "trial_name": m.trial.name, "checkpoint": m.trial.checkpoint.relative_to(ev.run_dir).as_posix(), metric_column: m.trial.value,
                        "best_epoch": m.trial.epoch, **result})
    for c in fit.candidates:
        shipped = Shipped(c, fit.fitted[c.label], c.probs(probs), positive=ev.plan.positive)
        scored.append(score_model(shipped, y, ev.classes, **score))
        if c.label not in {m.trial.name for m in ev.models[:ev.k]}:  # a single trial's rows are among the trials'
            predictions.append(_prediction_rows(ev, shipped, fit.final.label))
            table.append({"rank": None, "trial_name": c.label, "backbone": None, "status": None, metric_column: None,
                          **_table_cells(ev, scored[-1])})
    plot = _reliability(ev.run_dir, next(m for m in scored if m["label"] == fit.final.label), ev.split)

    write_table(pd.concat(predictions, ignore_index=True), ev.run_dir / predictions_file(ev.split))
    append_record(ev.run_dir / evaluation_file(ev.split), "evaluations", {
        "evaluated_at": now(), "split": ev.split, "n": len(ev.rows), "metric": ev.study.get("metric"),
        "mode": ev.study.get("mode"), "k": ev.k, "n_boot": ev.n_boot, "seed": ev.seed, "level": ev.level,
        "positive_class": ev.study.get("dataset", {}).get("positive_class"), "notes": ev.notes, "trials": records,
        "prevalence": {"stated": ev.prevalence, "from": ev.prevalence_source},
        "decision": fit.record["decision"],
        "final": {"model": fit.final.label, "final_model": FINAL_MODEL, "ensemble": fit.record["ensemble"],
                  "tta": ev.plan.tta, "chosen_by": fit.record["chosen_by"],
                  "validation_scores": fit.record["validation_scores"], "reliability_plot": plot,
                  "selection_corrected": fit.record["selection_corrected"],
                  "refit": fit.record.get("refit"),
                  "fitted_on_evaluated_split": ev.split == "val", "models": scored},
    })
    if ev.split == "test":
        write_model_card(ev.run_dir)
    return pd.DataFrame(table)


def _table_cells(ev: Evaluation, result: dict) -> dict:
    values, ci = result["metrics"], result["ci"]
    return {"split": ev.split, "n": len(ev.rows), **values,
            **{f"{m}_ci_{end}": ci[m][j] for m in values for j, end in enumerate(("low", "high"))}}


def _reliability(run_dir: Path, scored: dict, split: str) -> str | None:
    """The final model's reliability diagram before and after calibration; its path relative to the folder."""
    before, after = scored["calibration"]["before"], scored["calibration"]["after"]
    temperature = scored["calibration"]["temperature"]
    plot = reliability_plot(
        {f"before calibration (ECE {before['ece']:.3f})": scored["calibration"]["bins_before"],
         f"after, T = {temperature:.2f} (ECE {after['ece']:.3f})": scored["calibration"]["bins_after"]},
        run_dir / PLOTS_DIR, name=f"reliability_{split}",
        title=f"Reliability on the {split} split: {scored['label']}")
    return None if plot.path is None else Path(plot.path).relative_to(run_dir).as_posix()


def _prediction_rows(ev: Evaluation, shipped: Shipped, final_label: str) -> pd.DataFrame:
    """One model's rows of ``<split>_predictions.parquet``: what it ships, image by image."""
    c, threshold = shipped.candidate, shipped.fitted["threshold"]
    out = pd.DataFrame({
        "trial": c.label, "members": ",".join(c.members), "tta": c.tta or "none",
        "temperature": shipped.fitted["temperature"]["temperature"],
        "threshold": math.nan if threshold is None else threshold["value"],
        "positive_class": None if threshold is None else ev.classes[shipped.positive],
        "final": c.label == final_label, "path": ev.rows["image"].tolist(),
        "label": ev.rows["label"].astype(str), "label_index": label_indices(ev.rows, ev.classes),
        "predicted": [ev.classes[i] for i in shipped.decisions]})
    for i, cls in enumerate(ev.classes):
        out[f"prob_{cls}"] = shipped.probs[:, i]
    return out


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m analysis.evaluate", allow_abbrev=False,
        description="Fit the final model on validation (final_model.json: what search.predict, analysis.export "
        "and the report serve), then score it and the k best trials of a study (chosen by its validation metric) "
        "on the held-out test split at the decision each ships with, with 95% bootstrap intervals. Writes "
        "RUN_DIR/test_predictions.parquet and appends to RUN_DIR/test_evaluation.json, which logs every use of "
        "the test split.",
        epilog="Example: python -m analysis.evaluate runs/melanoma --top-k 3 --bootstrap 2000")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--top-k", type=int, default=3, help="how many trials, best by validation first (default 3)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    parser.add_argument("--split", choices=SPLIT_NAMES, default="test",
                        help="test (default), or val for studies without a test split (S4, S5): optimistic, "
                        "as the trials were chosen on it")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    add_final_model_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("top_k", "bootstrap", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_final_model_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        table = evaluate_top_k(run_dir, args.top_k, args.bootstrap, args.seed, split=args.split,
                               batch_size=args.batch_size, log=lambda line: print(line, file=sys.stderr),
                               **final_model_options(args))
    except (EvaluateError, AnalysisError, OutsideFolderError, DatasetError) as exc:  # AnalysisError: a write failed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(run_dir, args.split, table))
    return 0


def summary(run_dir: Path, split: str, table: pd.DataFrame) -> str:
    """What an evaluation prints when it is done (``main``, and ``analysis.report --evaluate``): the scores, the
    final model's report and confusion, calibration and operating point, and the files written."""
    out = []
    record = json.loads((run_dir / f"{split}_evaluation.json").read_text())["evaluations"][-1]
    n = int(table["n"].iloc[0])
    out.append(f"{split} split of {run_dir}: {n} images; top {int(table['rank'].notna().sum())} trial(s) by {record['metric']} "
               f"({record['mode']}) on validation; {record['n_boot']} bootstrap resamples, "
               f"{int(100 * LEVEL)}% percentile intervals")
    if split == "val":
        out.append("caution: the trials were chosen on this split, so these scores are optimistic")
    out.append(f"each model at the decision it ships with ({record['decision']}; temperature and threshold fitted on "
               "validation)")
    out.append(format_table(table, f"best_{record['metric']}"))
    final = next(m for m in record["final"]["models"] if m["label"] == record["final"]["model"])
    out.append(f"\nfinal model {final['label']!r} at its shipped decision:\n{final['classification_report_text']}")
    names = final["class_names"]
    matrix = pd.DataFrame(final["confusion_matrix"], index=[f"true {c}" for c in names],
                          columns=[f"pred {c}" for c in names])
    out.append(matrix.to_string())
    out.append("\n" + format_final(record["final"], split, record.get("level", LEVEL)))
    out.append(f"\nwritten: {run_dir / f'{split}_predictions.parquet'}\n"
               f"         {run_dir / f'{split}_evaluation.json'}"
               + (" (test split use logged)" if split == "test" else "")
               + (f"\n         {run_dir / 'model_card.md'}" if split == "test" else "")
               + f"\n         {run_dir / record['final']['final_model']} (fitted on validation)\n"
               f"         {run_dir / VAL_PREDICTIONS}"
               + (f"\n         {run_dir / record['final']['reliability_plot']}" if record["final"].get("reliability_plot") else ""))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
