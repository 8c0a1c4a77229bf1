"""``python -m analysis.evaluate RUN_DIR``: the top-k trials, chosen on validation, on the held-out test split.

The search never decodes the test split (``search.prepare``); this module is
the one place that reads test images to score models. Trials are ranked by
the study's own validation metric and mode (``study.json``), with the tie
rule of ``python -m search.predict``; test results never feed back into
that choice. Every reading of the test split is logged in
``RUN_DIR/test_evaluation.json`` (``test_split_log``), so a report can show
how often the test set was looked at.

Metrics are ``trainables.metrics.classification_metrics`` (what the trials
report on validation) plus per-class precision, recall and F1, each with a
95% percentile bootstrap interval over resampled test images. All trials
share the same resamples (one seed), so their intervals are paired.

The final model (issue 15) is scored beside the single best: with
``--ensemble K|auto`` the mean of the top-k trials' probabilities, with
``--tta flips|dihedral`` the mean over test-time views. Everything it fits is
fitted on the validation split only, before the test split is read: the
ensemble size (``auto``), a temperature per model (``analysis.calibration``)
and a decision threshold for the positive class (``analysis.operating_point``:
``--target-sensitivity``, ``--target-specificity`` or Youden's J). Each
candidate gets its metrics with intervals, calibration (NLL, ECE, Brier)
before and after, and its operating point on the evaluated split.

Outputs: ``RUN_DIR/test_predictions.parquet`` (one row per trial and image:
``trial``, ``path``, ``label``, ``label_index``, ``predicted``,
``prob_<class>``; ensembles and TTA under their label as ``trial``),
``RUN_DIR/test_evaluation.json`` (``test_split_log`` and ``evaluations``, both
appended to on every run; ``final`` in each evaluation),
``RUN_DIR/final_model.json`` (what was fitted on validation),
``RUN_DIR/val_predictions_cache.parquet``, the reliability diagram
``RUN_DIR/report_files/reliability_test.png`` and ``RUN_DIR/model_card.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import argparse
import datetime as dt
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["EvaluateError", "evaluate_top_k", "point_metrics", "bootstrap_ci", "resample_counts",
           "read_split", "decode_split", "log_test_use", "validation_predictions", "tta_views", "plan_final", "main"]

SPLITS = ("test", "val")
LEVEL = 0.95
TTA_MODES = ("flips", "dihedral")
TTA_AUTO = "auto"  # --tta auto: with and without dihedral TTA, whichever scores higher on validation
TTA_AUTO_MODE = "dihedral"
AUTO_ENSEMBLE_MAX = 5  # --ensemble auto tries the top 1..5 trials
VAL_PREDICTIONS = "val_predictions_cache.parquet"  # not val_predictions.parquet: --split val writes that
_CELLS_PER_CHUNK = 4_000_000  # resamples x images held in memory at once (~32 MB of float64)


class EvaluateError(ValueError):
    """Something about the results folder or the request is wrong. The message names it and the fix."""


# --------------------------------------------------------------------------
# the split
# --------------------------------------------------------------------------


def read_split(run_dir: Path, split: str) -> pd.DataFrame:
    """The rows of ``splits.parquet`` in ``split``, in file order."""
    if split not in SPLITS:
        raise EvaluateError(f"split {split!r} cannot be evaluated; choose one of {', '.join(SPLITS)}")
    path = run_dir / "splits.parquet"
    if not path.is_file():
        raise EvaluateError(f"{str(path)!r} is missing; was the results folder copied completely?")
    table = _read_splits(path)
    rows = table[table["split"] == split].reset_index(drop=True)
    if rows.empty:
        present = ", ".join(f"{k} {v}" for k, v in table["split"].value_counts().items())
        fix = ("use the validation split instead (analysis.evaluate --split val, optimistic as the trials were "
               "chosen on it; analysis.export --verify-on val), or run a study whose split protocol has a test set "
               "(grouped, stratified, S1-S3)") if split == "test" else "the study has no validation images; check its dataset"
        raise EvaluateError(f"the study's split holds no {split} images ({present}); {fix}")
    return rows


def decode_split(rows: pd.DataFrame, size: int) -> np.ndarray:
    """Decode like training (``trainables.data.decode_images``), without the disk cache:
    held-out pixels are kept in memory only."""
    from trainables.data import decode_images
    from trainables.datasets import DatasetError

    try:
        return decode_images(rows["path"].astype(str).tolist(), size, use_cache=False)
    except DatasetError as exc:
        raise EvaluateError(f"{exc}\nThe split's images must be where splits.parquet says; restore the dataset "
                            "there (splits.parquet keeps absolute paths)") from None


def label_indices(rows: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    """The split's labels as indices in the model's class order (from its trial.json)."""
    unknown = sorted(set(rows["label"].astype(str)) - set(class_names))
    if unknown:
        raise EvaluateError(f"labels {unknown} of splits.parquet are not classes of the model {class_names}; "
                            "is this the run the checkpoint came from?")
    index = {c: i for i, c in enumerate(class_names)}
    return rows["label"].astype(str).map(index).to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------
# the test-split log
# --------------------------------------------------------------------------


def log_test_use(run_dir: Path, *, trials: list[str], n_test: int, by: str, **extra) -> dict:
    """Append one use of the test split to ``RUN_DIR/test_evaluation.json`` and return the entry."""
    entry = {"test_split_used_at": _now(), "by": by, "trials": list(trials), "n_test": int(n_test), **extra}
    _append(run_dir / "test_evaluation.json", "test_split_log", entry)
    return entry


def _append(path: Path, key: str, item: dict) -> None:
    """Append ``item`` to the list ``key`` of a JSON file, under a lock, written atomically."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        record = {}
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except ValueError as exc:
                # Never overwrite a damaged log: it is the record of every look at the test set.
                raise EvaluateError(f"{str(path)!r} is not valid JSON ({exc}); move it aside and keep it, "
                                    "then run again") from None
        record.setdefault(key, []).append(_jsonable(item))
        from search.storage import write_atomic  # search/ imports TensorFlow: only when writing

        write_atomic(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    """NaN becomes null (strict JSON); numpy scalars and arrays become Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


# --------------------------------------------------------------------------
# metrics and the bootstrap
# --------------------------------------------------------------------------


def point_metrics(y_true, probs, class_names: list[str], positive: int | None) -> dict[str, float]:
    """``classification_metrics`` plus per-class precision and F1 (recall is already there)."""
    from sklearn.metrics import precision_recall_fscore_support

    from trainables.metrics import classification_metrics

    out = classification_metrics(y_true, probs, class_names, positive=positive)
    precision, _, f1, _ = precision_recall_fscore_support(
        y_true, np.asarray(probs).argmax(axis=1), labels=list(range(len(class_names))), zero_division=0)
    for name, p, f in zip(class_names, precision, f1):
        out[f"precision_{name}"] = float(p)
        out[f"f1_{name}"] = float(f)
    return out


def bootstrap_ci(y_true, probs, class_names: list[str], *, n_boot: int = 1000, seed: int = 0,
                 positive: int | None = None, level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval for every metric of ``point_metrics``, resampling images.

    ``n_boot`` resamples of the ``n`` images (with replacement) are drawn with
    ``numpy.random.default_rng(seed)``; each metric is computed on every
    resample exactly as ``point_metrics`` would (same zero-division and
    undefined-AUC rules), then the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles are taken, ignoring resamples where a metric is undefined.
    Computed from resample counts in bulk, not image copies: 1,000 resamples
    of 2,000 images take about a second.
    """
    if n_boot < 1:
        raise EvaluateError(f"n_boot must be >= 1, got {n_boot}; use at least 1000 for a 95% interval")
    if not 0 < level < 1:
        raise EvaluateError(f"level must be in (0, 1), got {level}; e.g. 0.95")
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    parts = [_weighted_metrics(y_true, probs, counts, class_names, positive)
             for counts in resample_counts(len(y_true), n_boot, seed)]
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for name in parts[0]:
        values = np.concatenate([p[name] for p in parts])
        values = values[~np.isnan(values)]
        out[name] = (float(np.percentile(values, q[0])), float(np.percentile(values, q[1]))) if len(values) \
            else (math.nan, math.nan)
    return out


def resample_counts(n: int, n_boot: int, seed: int):
    """The bootstrap's resamples of ``n`` images, in chunks: ``counts[r, i]`` = copies of image i in resample r.

    ``n_boot`` draws of ``n`` indices with replacement from
    ``numpy.random.default_rng(seed)``; every interval of an evaluation
    (``bootstrap_ci``, ``analysis.operating_point``) uses these, so for one
    seed all are computed on the same resamples.
    """
    if n_boot < 1:
        raise EvaluateError(f"n_boot must be >= 1, got {n_boot}; use at least 1000 for a 95% interval")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CELLS_PER_CHUNK // max(n, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picks = rng.integers(0, n, size=(b, n))
        yield np.bincount((picks + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)


def _weighted_metrics(y_true: np.ndarray, probs: np.ndarray, counts: np.ndarray, class_names: list[str],
                      positive: int | None) -> dict[str, np.ndarray]:
    """``point_metrics`` for many resamples at once; ``counts[r, i]`` = copies of image i in resample r."""
    k = probs.shape[1]
    w = counts.astype(np.float64)
    total = w.sum(axis=1)
    predicted = probs.argmax(axis=1)
    cells = np.zeros((len(y_true), k * k))
    cells[np.arange(len(y_true)), y_true * k + predicted] = 1.0
    confusion = (w @ cells).reshape(-1, k, k)  # [r, true, predicted]
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, called = confusion.sum(axis=2), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(called > 0, tp / called, 0.0)
        f1 = np.where(support + called > 0, 2 * tp / (support + called), 0.0)
        present = support > 0
        # sklearn's balanced accuracy averages recall over the classes present in y_true
        balanced = np.where(present, recall, 0.0).sum(axis=1) / present.sum(axis=1)
    nll = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0))
    out = {
        "loss": (w @ nll) / total,
        "accuracy": tp.sum(axis=1) / total,
        "balanced_accuracy": balanced,
        "macro_f1": f1.mean(axis=1),
        "auc": _weighted_auc(y_true, probs, w, present, positive),
    }
    for c, name in enumerate(class_names):
        out[f"recall_{name}"] = recall[:, c]
        out[f"precision_{name}"] = precision[:, c]
        out[f"f1_{name}"] = f1[:, c]
    return out


def _weighted_auc(y_true, probs, w, present, positive) -> np.ndarray:
    """The AUC rule of ``classification_metrics``, per resample."""
    k = probs.shape[1]
    if k == 2:
        pos = k - 1 if positive is None else positive
        auc = _binary_auc(probs[:, pos], y_true == pos, w)
        auc[present.sum(axis=1) < 2] = np.nan
        return auc
    norm = probs / probs.sum(axis=1, keepdims=True)
    auc = np.mean([_binary_auc(norm[:, c], y_true == c, w) for c in range(k)], axis=0)
    auc[~present.all(axis=1)] = np.nan  # one-vs-rest needs every class present
    return auc


def _binary_auc(score: np.ndarray, is_pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC (ties count half), which equals the trapezoidal ROC AUC."""
    order = np.argsort(score, kind="stable")
    score, is_pos, w = score[order], is_pos[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * is_pos, starts, axis=1)
    neg = np.add.reduceat(w * ~is_pos, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


# --------------------------------------------------------------------------
# the final model: options, validation predictions, ensembles and TTA
# --------------------------------------------------------------------------


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
    from analysis.operating_point import OperatingPointError, check_target

    ensemble = parse_ensemble(ensemble)
    if tta is not None and tta not in (*TTA_MODES, TTA_AUTO):
        raise EvaluateError(f"--tta must be one of {', '.join((*TTA_MODES, TTA_AUTO))}, got {tta!r}")
    try:
        check_target("--target-sensitivity", target_sensitivity)
        check_target("--target-specificity", target_specificity)
    except OperatingPointError as exc:
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
    if positive_class is not None and positive_class not in class_names:
        from trainables.checks import unknown_name_message

        raise EvaluateError("--positive-class: " + unknown_name_message("class", positive_class, class_names))
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


def split_class_names(run_dir: Path) -> list[str]:
    """Class order of ``splits.parquet`` (``label_index``), the order every trial was trained with."""
    pairs = _read_splits(run_dir / "splits.parquet")[["label", "label_index"]].drop_duplicates()
    return pairs.sort_values("label_index")["label"].astype(str).tolist()


def _read_splits(path: Path) -> pd.DataFrame:
    """``splits.parquet``; a damaged one (cut short by a crash or an interrupted copy) is an ``EvaluateError`` naming it."""
    from analysis.reader import ResultsFolderError, read_table

    try:
        table = read_table(path)
    except ResultsFolderError as exc:
        raise EvaluateError(str(exc)) from None
    missing = {"path", "label", "label_index", "split"} - set(table.columns)
    if missing:
        raise EvaluateError(f"{str(path)!r} lacks the column(s) {sorted(missing)}; was it written by search.run? "
                            "Restore it from the original results folder")
    return table


def tta_views(images: np.ndarray, mode: str | None):
    """The test-time views of a batch (N, H, W, C): ``flips`` = the image, mirrored left-right, up-down and both
    (4 views); ``dihedral`` = its 4 rotations by 90 degrees, each also mirrored (8 views: every symmetry of a
    square, for images with no up or left such as dermoscopy). None: the image alone."""
    if mode is None or mode == "none":
        return [images]
    if mode == "flips":
        return [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    if mode == "dihedral":
        turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
        return turns + [t[:, :, ::-1] for t in turns]
    raise EvaluateError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")


def predict_views(model, images: np.ndarray, mode: str | None, batch_size: int) -> np.ndarray:
    """The mean of the model's probabilities over the views of ``mode`` (its plain probabilities for None)."""
    views = tta_views(images, mode)
    total = sum(model.predict(np.ascontiguousarray(v), batch_size=batch_size, verbose=0).astype(np.float64)
                for v in views)
    return total / len(views)


def validation_rows(run_dir: Path, rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows the final model's temperature and threshold are fitted on: the val split, or, for a
    cross-validated study (``cv_folds``: a ``fold`` column in splits.parquet), all of train ∪ val, each
    predicted by the one fold model that never trained on it (``predict_rows``): the out-of-fold predictions
    are the only held-out predictions such a study has, and they cover k times more images than val."""
    folds = fold_rows(run_dir)
    if folds is not None:
        return folds
    return rows if split == "val" else read_split(run_dir, "val")


def fold_rows(run_dir: Path) -> pd.DataFrame | None:
    """train ∪ val rows of a cross-validated study's splits.parquet (file order), with their ``fold``; else None."""
    path = run_dir / "splits.parquet"
    table = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if "fold" not in table.columns or table["fold"].isna().all():
        return None
    return table[table["fold"].notna()].reset_index(drop=True)


def predict_rows(model, images: np.ndarray, rows: pd.DataFrame, mode: str | None, batch_size: int) -> np.ndarray:
    """``predict_views``, except that rows of a cross-validated study's train ∪ val (a ``fold``) are predicted
    out of fold, by the fold model of a fold ensemble that never trained on them."""
    from trainables.checkpoint import fold_classifiers

    members = fold_classifiers(model) if "fold" in rows.columns and rows["fold"].notna().any() else None
    if members is None:
        return predict_views(model, images, mode, batch_size)
    folds = rows["fold"].to_numpy()
    out = predict_views(model, images, mode, batch_size) if pd.isna(folds).any() else None
    out = np.zeros((len(rows), model.output_shape[-1])) if out is None else out
    for f, member in enumerate(members):
        at = np.flatnonzero(pd.Series(folds).fillna(-1).to_numpy() == f)
        if len(at):
            out[at] = predict_views(member, images[at], mode, batch_size)
    return out


def validation_predictions(run_dir: Path, rows: pd.DataFrame, models: list, modes: list[str], *,
                           batch_size: int, log=print) -> dict[tuple[str, str], np.ndarray]:
    """Validation probabilities of every model in ``models`` under every TTA mode in ``modes`` (``"none"``
    for plain), keyed ``(trial, mode)``; cached in ``RUN_DIR/val_predictions_cache.parquet``.

    They are recomputed from the checkpoints rather than kept by the trials:
    the trainer needs no change (a trial scores validation every epoch, but
    which epoch ends up checkpointed is known only afterwards), the decoding is
    exactly the one the test split gets here (``decode_split``), and scoring
    the k checkpoints that matter on the validation split costs seconds. The
    cache has the columns of ``test_predictions.parquet`` plus ``tta`` and
    ``checkpoint``; a row set is reused only for the same trial, checkpoint,
    mode and validation images in the same order, so a resumed study that
    checkpointed a better epoch is scored again.
    """
    from search.storage import write_parquet

    path = run_dir / VAL_PREDICTIONS
    cached = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    wanted_paths = rows["path"].astype(str).tolist()
    out, fresh, decoded = {}, [], {}
    for _, trial, model, class_names, size in models:
        checkpoint = trial.checkpoint.relative_to(run_dir).as_posix()
        for mode in modes:
            hit = cached[(cached["trial"] == trial.name) & (cached["tta"] == mode)
                         & (cached["checkpoint"] == checkpoint)] if len(cached) else cached
            columns = [f"prob_{c}" for c in class_names]
            if len(hit) and hit["path"].tolist() == wanted_paths and set(columns) <= set(hit.columns):
                out[(trial.name, mode)] = hit[columns].to_numpy(dtype=np.float64)
                continue
            if size not in decoded:
                decoded[size] = decode_split(rows, size)
            probs = predict_rows(model, decoded[size], rows, None if mode == "none" else mode, batch_size)
            out[(trial.name, mode)] = probs
            table = _prediction_rows(trial.name, rows, label_indices(rows, class_names), probs, class_names)
            table["tta"], table["checkpoint"] = mode, checkpoint
            fresh.append(table)
    if fresh:
        keys = {(t["trial"].iloc[0], t["tta"].iloc[0]) for t in fresh}
        kept = cached[[(a, b) not in keys for a, b in zip(cached["trial"], cached["tta"])]] if len(cached) else cached
        write_parquet(pd.concat([kept, *fresh], ignore_index=True), path)
        log(f"note: validation predictions of {len(fresh)} model/view set(s) computed and cached in {VAL_PREDICTIONS}")
    return out


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


# --------------------------------------------------------------------------
# the final model: fitting on validation, scoring on the evaluated split
# --------------------------------------------------------------------------


def fit_on_validation(probs: np.ndarray, y_val: np.ndarray, plan: FinalPlan) -> dict:
    """Temperature (validation NLL), then the threshold on the calibrated validation probabilities."""
    from analysis.calibration import apply_temperature, fit_temperature
    from analysis.operating_point import OperatingPointError, choose_threshold

    fit = fit_temperature(probs, y_val)
    threshold = None
    if plan.positive is not None:
        calibrated = apply_temperature(probs, fit["temperature"])
        try:
            threshold = choose_threshold(calibrated[:, plan.positive], y_val == plan.positive,
                                         target_sensitivity=plan.target_sensitivity,
                                         target_specificity=plan.target_specificity)
        except OperatingPointError as exc:
            raise EvaluateError(f"cannot choose a threshold on the validation split: {exc}") from None
    return {"temperature": fit, "threshold": threshold}


def score_final(label: str, members: list[str], tta: str | None, fitted: dict, y, probs: np.ndarray,
                class_names: list[str], plan: FinalPlan, *, n_boot: int, seed: int, level: float,
                positive_for_auc: int | None) -> dict:
    """One final-model candidate on the evaluated split: every metric with its interval (uncalibrated
    probabilities: the argmax metrics are the same either way), calibration before and after, and the
    operating point (calibrated probabilities, validation threshold) or, without one, per-class
    one-vs-rest sensitivity and specificity at the argmax."""
    from sklearn.metrics import confusion_matrix

    from analysis import operating_point as op
    from analysis.calibration import apply_temperature, calibration_scores, reliability_bins

    temperature = fitted["temperature"]["temperature"]
    calibrated = apply_temperature(probs, temperature)
    values = point_metrics(y, probs, class_names, positive_for_auc)
    ci = bootstrap_ci(y, probs, class_names, n_boot=n_boot, seed=seed, positive=positive_for_auc, level=level)
    record = {
        "label": label, "trials": members, "tta": tta, "metrics": values, "ci": {m: list(ci[m]) for m in values},
        "calibration": {"temperature": temperature, "validation": fitted["temperature"],
                        "before": calibration_scores(probs, y), "after": calibration_scores(calibrated, y),
                        "bins_before": reliability_bins(probs, y), "bins_after": reliability_bins(calibrated, y)},
    }
    labels = list(range(len(class_names)))
    threshold = fitted["threshold"]
    predicted = calibrated.argmax(axis=1)
    if threshold is not None:
        positive = plan.positive
        scores, is_pos = calibrated[:, positive], y == positive
        predicted = op.decide(calibrated, positive, threshold["value"])
        record["operating_point"] = {
            "class": class_names[positive], **threshold, "at_threshold": op.binary_at(is_pos, scores, threshold["value"]),
            "ci": {m: list(v) for m, v in op.binary_ci(is_pos, scores, threshold["value"], n_boot=n_boot, seed=seed,
                                                       level=level).items()},
        }
    record["confusion_matrix"] = confusion_matrix(y, predicted, labels=labels).tolist()
    if len(class_names) > 2:
        argmax = calibrated.argmax(axis=1)
        ovr, ovr_ci = op.one_vs_rest(y, argmax, class_names), op.one_vs_rest_ci(y, argmax, class_names,
                                                                                 n_boot=n_boot, seed=seed, level=level)
        record["one_vs_rest"] = {c: {**ovr[c], "ci": {m: list(v) for m, v in ovr_ci[c].items()}} for c in class_names}
    return record


def final_model_record(study: dict, class_names: list[str], plan: FinalPlan, final: dict,
                       per_trial: dict, n_val: int, ensemble_choice: dict | None, checkpoints: dict) -> dict:
    """The content of ``final_model.json``: everything fitted on validation, and how."""
    from analysis.calibration import ECE_BINS, T_BOUNDS
    from analysis.operating_point import rule_text

    threshold = final["fitted"]["threshold"]
    return {
        "written_at": _now(), "by": "analysis.evaluate", "study": study.get("name"), "class_names": class_names,
        "positive_class": None if plan.positive is None else class_names[plan.positive],
        "model": final["label"], "trials": final["members"], "checkpoints": [checkpoints[t] for t in final["members"]],
        "tta": final["tta"], "temperature": final["fitted"]["temperature"]["temperature"],
        "threshold": None if threshold is None else threshold["value"],
        "threshold_rule": None if threshold is None else rule_text(threshold),
        "decision": ("argmax of the calibrated probabilities" if threshold is None else
                     f"{class_names[plan.positive]} if its calibrated probability >= threshold, else the most "
                     "probable other class"),
        "ensemble": ensemble_choice,
        "fitted_on": {"split": "val", "n": n_val,
                      "temperature": f"minimises the validation NLL over log T (scipy.optimize.minimize_scalar, "
                                     f"bounded, T in [{T_BOUNDS[0]}, {T_BOUNDS[1]}]); probabilities are "
                                     "softmax(log p / T)",
                      "threshold": None if threshold is None else
                      f"{rule_text(threshold)}, on the calibrated validation probability of "
                      f"{class_names[plan.positive]}; positive iff probability >= threshold"},
        "validation": {"temperature_fit": final["fitted"]["temperature"],
                       "at_threshold": None if threshold is None else threshold["validation"]},
        "ece_bins": ECE_BINS,
        "per_trial": per_trial,
    }


def _per_trial_entry(fitted: dict, class_names: list[str], plan: FinalPlan) -> dict:
    from analysis.operating_point import rule_text

    threshold = fitted["threshold"]
    return {"temperature": fitted["temperature"]["temperature"],
            "nll_before": fitted["temperature"]["nll_before"], "nll_after": fitted["temperature"]["nll_after"],
            "threshold": None if threshold is None else {
                "class": class_names[plan.positive], "value": threshold["value"], "rule": rule_text(threshold),
                "validation": threshold["validation"]}}


# --------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------


def evaluate_top_k(run_dir: str | Path, k: int = 3, n_boot: int = 1000, seed: int = 0, *, split: str = "test",
                   batch_size: int = 64, level: float = LEVEL, log=print, ensemble: int | str | None = None,
                   tta: str | None = None, target_sensitivity: float | None = None,
                   target_specificity: float | None = None, positive_class: str | None = None) -> pd.DataFrame:
    """Score the ``k`` best trials (by validation) on ``split``, and the final model; write predictions and records.

    Returns one row per evaluated trial, best first: ``rank``, ``trial_name``,
    ``backbone``, ``status``, ``best_<study metric>`` (validation), ``split``,
    ``n``, every metric, and ``<metric>_ci_low`` / ``<metric>_ci_high``; then
    one row per requested ensemble or TTA model (``rank`` empty, ``trial_name``
    its label). Trials without a checkpoint, or whose checkpoint cannot be
    loaded, are skipped with a note (``log``) and the next one is taken, so a
    study that is still running or has errored trials can be evaluated.

    The final model is the single best trial, or with ``ensemble`` the mean of
    the top-k trials' probabilities (``"auto"``: k chosen on validation), with
    ``tta`` (``flips`` or ``dihedral``) averaged over test-time views. Its
    temperature and, for a positive class, its threshold are fitted on the
    validation split only and written to ``RUN_DIR/final_model.json`` (with the
    same fitted for each loaded trial alone, for ``search.predict``) before the
    test split is read.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    from analysis.reader import ResultsFolderError, load_trial_model, ranked_trials, read_study, trial_from_row

    if k < 1:
        raise EvaluateError(f"k must be >= 1, got {k}")
    run_dir = Path(run_dir).expanduser().resolve()
    try:
        study = read_study(run_dir)
        rows = read_split(run_dir, split)
        val_rows = validation_rows(run_dir, rows, split)  # out-of-fold train ∪ val for a cross-validated study
        ranked, notes = ranked_trials(run_dir, study)
    except ResultsFolderError as exc:
        raise EvaluateError(str(exc)) from None
    classes = split_class_names(run_dir)
    plan = plan_final(study, classes, len(ranked), run_dir, ensemble=ensemble, tta=tta,
                      target_sensitivity=target_sensitivity, target_specificity=target_specificity,
                      positive_class=positive_class)
    metric_column = f"best_{study.get('metric', 'val_balanced_accuracy')}"

    models = []  # (leaderboard row, chosen trial, model, class names, size)
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
        models.append((row, trial, model, class_names, size))
    if 0 < len(models) < k:
        notes.append(f"only {len(models)} trial(s) with a usable checkpoint; evaluated {len(models)} of the {k} asked for")
    for note in notes:
        log(f"note: {note}")
    if not models:
        raise EvaluateError(f"no trial of {str(run_dir)!r} has a checkpoint that loads ({len(ranked)} with a "
                            "recorded checkpoint); let the study run until a trial finishes an epoch")
    if isinstance(plan.ensemble, int) and len(models) < plan.ensemble:
        raise EvaluateError(f"--ensemble {plan.ensemble}: only {len(models)} trial(s) have a checkpoint that loads "
                            f"(see the notes above); use --ensemble {len(models)} or less")
    for _, trial, _, names, _ in models:
        if names != classes:
            raise EvaluateError(f"{trial.name} was trained with classes {names}, but splits.parquet orders them "
                                f"{classes}; is {str(run_dir)!r} the run its checkpoint came from?")
    positive_name = study.get("dataset", {}).get("positive_class")
    positive_for_auc = classes.index(positive_name) if positive_name in classes else None

    # ---- fitting: validation predictions only
    modes = ["none"] + ([plan.tta_mode] if plan.tta_mode else [])
    val = validation_predictions(run_dir, val_rows, models, modes, batch_size=batch_size, log=log)
    y_val = label_indices(val_rows, classes)
    names = [m[1].name for m in models]
    checkpoints = {m[1].name: m[1].checkpoint.relative_to(run_dir).as_posix() for m in models}
    ensemble_choice = None
    size_k = 1
    if plan.ensemble == "auto":
        mode = plan.tta_mode or "none"
        pool = names[:plan.n_members_max]
        size_k, scores = choose_ensemble_size([val[(n, mode)] for n in pool], y_val, classes, study, positive_for_auc)
        ensemble_choice = {"k": size_k, "chosen": f"auto: best validation {study.get('metric')} of the mean of the "
                           f"top 1..{len(pool)} trials (ties: lower validation loss, then smaller k)",
                           "validation_scores": {str(n): v for n, v in scores.items()}}
        log(f"note: --ensemble auto chose k={size_k} on validation ({study.get('metric')}: "
            + ", ".join(f"k={n} {v:.4f}" for n, v in scores.items()) + ")")
    elif isinstance(plan.ensemble, int):
        size_k = plan.ensemble
        ensemble_choice = {"k": size_k, "chosen": "given (--ensemble)"}
    candidates = [(names[0], [names[0]], None)]  # (label, members, tta): the single best first
    if size_k > 1:
        candidates.append((f"ensemble of top {size_k}", names[:size_k], None))
    if plan.tta_mode:
        candidates.append((f"{names[0]} + TTA {plan.tta_mode}", [names[0]], plan.tta_mode))
        if size_k > 1:
            candidates.append((f"ensemble of top {size_k} + TTA {plan.tta_mode}", names[:size_k], plan.tta_mode))
    fitted = {label: fit_on_validation(np.mean([val[(n, t or "none")] for n in members], axis=0), y_val, plan)
              for label, members, t in candidates}
    per_trial = {n: _per_trial_entry(fitted[n] if n == names[0] else fit_on_validation(val[(n, "none")], y_val, plan),
                                     classes, plan) for n in names}
    # What each candidate scores on validation (argmax, before calibration), before any test number.
    metric = str(study.get("metric", "val_balanced_accuracy")).removeprefix("val_")
    val_scores = {label: point_metrics(y_val, np.mean([val[(n, t or "none")] for n in members], axis=0), classes,
                                       positive_for_auc).get(metric, math.nan) for label, members, t in candidates}
    final_label, final_members, final_tta = choose_final(candidates, val_scores, plan, study.get("mode", "max"))
    final = {"label": final_label, "members": final_members, "tta": final_tta, "fitted": fitted[final_label]}
    record = final_model_record(study, classes, plan, final, per_trial, len(val_rows), ensemble_choice,
                                checkpoints)
    record["validation_scores"] = {"metric": metric, "by_model": val_scores}
    record["chosen_by"] = (CHOSEN_ON_VALIDATION if plan.chosen_on_validation else
                           "given: the combination --ensemble and --tta asked for")
    if plan.chosen_on_validation:
        log(f"note: final model {final_label!r}, chosen on validation ({metric}: "
            + ", ".join(f"{label} {v:.4f}" for label, v in val_scores.items()) + ")")
    else:  # the user asked for these options: told when validation already says they do not help
        worse = [label for label in val_scores if label != names[0] and val_scores[label] < val_scores[names[0]]]
        if worse:
            log(f"note: on validation, {', '.join(f'{lbl} ({val_scores[lbl]:.4f})' for lbl in worse)} "
                f"score{'s' if len(worse) == 1 else ''} below the single best trial ({val_scores[names[0]]:.4f}) on "
                f"{metric}: the option(s) you asked for do not help here; the final model is still {final_label!r} "
                "(--ensemble auto or --tta auto choose on validation)")
    if "fold" in val_rows.columns:  # cross-validated: fitted on the out-of-fold predictions of train ∪ val
        record["fitted_on"]["split"] = "train+val, out of fold"
        record["fitted_on"]["cv_folds"] = int(val_rows["fold"].nunique())
    from analysis.calibration import FINAL_MODEL
    from analysis.tables import write_file

    write_file(run_dir / FINAL_MODEL, (json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n").encode())

    # ---- the evaluated split: read once
    needed = {n for _, members, _ in candidates for n in members} | set(names[:k])
    decoded = {size: decode_split(rows, size) for size in sorted({m[4] for m in models if m[1].name in needed})}
    if split == "test":  # record the look at the test set before anything can fail
        log_test_use(run_dir, trials=[n for n in names if n in needed], n_test=len(rows), by="analysis.evaluate")
    y = label_indices(rows, classes)
    wanted = {(n, "none") for n in needed} | {(n, t) for _, members, t in candidates if t for n in members}
    probs = {(trial.name, mode): predict_rows(model, decoded[size], rows, None if mode == "none" else mode, batch_size)
             for _, trial, model, _, size in models for mode in modes if (trial.name, mode) in wanted}

    table, predictions, records = [], [], []
    for rank, (row, trial, model, class_names, size) in enumerate(models[:k], start=1):
        p = probs[(trial.name, "none")]
        values = point_metrics(y, p, class_names, positive_for_auc)
        ci = bootstrap_ci(y, p, class_names, n_boot=n_boot, seed=seed, positive=positive_for_auc, level=level)
        y_pred = p.argmax(axis=1)
        labels = list(range(len(class_names)))
        table.append({"rank": rank, "trial_name": trial.name, "backbone": trial.backbone, "status": row.get("status"),
                      metric_column: trial.value, "split": split, "n": len(y), **values,
                      **{f"{m}_ci_{end}": ci[m][j] for m in values for j, end in enumerate(("low", "high"))}})
        predictions.append(_prediction_rows(trial.name, rows, y, p, class_names))
        records.append({
            "rank": rank, "trial_name": trial.name, "checkpoint": checkpoints[trial.name],
            metric_column: trial.value, "best_epoch": trial.epoch, "metrics": values,
            "ci": {m: list(ci[m]) for m in values},
            "classification_report": classification_report(
                y, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0),
            "classification_report_text": classification_report(
                y, y_pred, labels=labels, target_names=class_names, digits=4, zero_division=0),
            "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).tolist(),
            "class_names": class_names,
        })
    scored = []
    for label, members, t in candidates:
        p = np.mean([probs[(n, t or "none")] for n in members], axis=0)
        scored.append(score_final(label, members, t, fitted[label], y, p, classes, plan, n_boot=n_boot, seed=seed,
                                  level=level, positive_for_auc=positive_for_auc))
        if len(members) > 1 or t:  # the single best's predictions are already among the trials'
            predictions.append(_prediction_rows(label, rows, y, p, classes))
            values, ci = scored[-1]["metrics"], scored[-1]["ci"]
            table.append({"rank": None, "trial_name": label, "backbone": None, "status": None, metric_column: None,
                          "split": split, "n": len(y), **values,
                          **{f"{m}_ci_{end}": ci[m][j] for m in values for j, end in enumerate(("low", "high"))}})
    plot = _reliability(run_dir, next(m for m in scored if m["label"] == final_label), split)

    from search.storage import write_parquet

    write_parquet(pd.concat(predictions, ignore_index=True), run_dir / f"{split}_predictions.parquet")
    _append(run_dir / f"{split}_evaluation.json", "evaluations", {
        "evaluated_at": _now(), "split": split, "n": len(rows), "metric": study.get("metric"),
        "mode": study.get("mode"), "k": k, "n_boot": n_boot, "seed": seed, "level": level,
        "positive_class": positive_name, "notes": notes, "trials": records,
        "final": {"model": final_label, "final_model": FINAL_MODEL, "ensemble": ensemble_choice, "tta": plan.tta,
                  "chosen_by": record["chosen_by"], "validation_scores": record["validation_scores"],
                  "reliability_plot": plot, "fitted_on_evaluated_split": split == "val", "models": scored},
    })
    if split == "test":
        from analysis.model_card import write_model_card

        write_model_card(run_dir)
    return pd.DataFrame(table)


CHOSEN_ON_VALIDATION = ("auto: the candidate with the best validation score of the study's metric (ties: the "
                        "simpler, i.e. fewer members, then no TTA)")


def choose_final(candidates: list[tuple], val_scores: dict[str, float], plan: FinalPlan, mode: str = "max") -> tuple:
    """The final model among ``candidates`` (simplest first): with an ``auto`` option, the best on validation
    (a tie keeps the simpler); otherwise the last, the full combination the user asked for."""
    if not plan.chosen_on_validation:
        return candidates[-1]
    sign = -1.0 if mode == "min" else 1.0
    score = {label: sign * v if v == v else -math.inf for label, v in val_scores.items()}  # NaN never wins
    return max(candidates, key=lambda c: (score[c[0]], -candidates.index(c)))


def _reliability(run_dir: Path, scored: dict, split: str) -> str | None:
    """The final model's reliability diagram before and after calibration; its path relative to the folder."""
    from analysis.plots import reliability_plot
    from analysis.report import PLOTS_DIR

    before, after = scored["calibration"]["before"], scored["calibration"]["after"]
    temperature = scored["calibration"]["temperature"]
    plot = reliability_plot(
        {f"before calibration (ECE {before['ece']:.3f})": scored["calibration"]["bins_before"],
         f"after, T = {temperature:.2f} (ECE {after['ece']:.3f})": scored["calibration"]["bins_after"]},
        run_dir / PLOTS_DIR, name=f"reliability_{split}",
        title=f"Reliability on the {split} split: {scored['label']}")
    return None if plot.path is None else Path(plot.path).relative_to(run_dir).as_posix()


def _prediction_rows(name: str, rows: pd.DataFrame, y, probs, class_names: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({"trial": name, "path": rows["path"].astype(str), "label": rows["label"].astype(str),
                        "label_index": y, "predicted": [class_names[i] for i in probs.argmax(axis=1)]})
    for c, cls in enumerate(class_names):
        out[f"prob_{cls}"] = probs[:, c]
    return out


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


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
        out[m] = [_with_ci(v, lo, hi) for v, lo, hi in zip(table[m], table[f"{m}_ci_low"], table[f"{m}_ci_high"])]
    return out.to_string(index=False)


def _with_ci(value, low, high) -> str:
    if pd.isna(value):
        return "n/a"
    return f"{value:.4f} [{low:.3f}, {high:.3f}]" if not pd.isna(low) else f"{value:.4f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.evaluate", allow_abbrev=False,
        description="Score the k best trials of a study (chosen by its validation metric) on the held-out test "
        "split, with 95% bootstrap intervals. Writes RUN_DIR/test_predictions.parquet and appends to "
        "RUN_DIR/test_evaluation.json, which logs every use of the test split.",
        epilog="Example: python -m analysis.evaluate runs/melanoma --top-k 3 --bootstrap 2000")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--top-k", type=int, default=3, help="how many trials, best by validation first (default 3)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="test (default), or val for studies without a test split (S4, S5): optimistic, "
                        "as the trials were chosen on it")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    final = parser.add_argument_group(
        "the final model", "fitted on the validation split only, written to RUN_DIR/final_model.json (used by "
        "python -m search.predict), then scored on the test split beside the single best trial")
    final.add_argument("--ensemble", metavar="K|auto", default=None,
                       help="also score the mean of the top K trials' probabilities; auto: K (1-5) chosen on "
                       "validation by the study's metric. With auto (here or in --tta) the final model is the "
                       "candidate that scores best on validation; otherwise it is the combination asked for")
    final.add_argument("--tta", choices=(*TTA_MODES, TTA_AUTO), default=None,
                       help="also score test-time augmentation: flips (4 views: mirrored left-right, up-down, both) "
                       "or dihedral (8 views: also rotated by 90 degrees; for images with no up, e.g. dermoscopy); "
                       "auto: with and without dihedral, whichever scores higher on validation")
    final.add_argument("--target-sensitivity", type=float, metavar="S", default=None,
                       help="threshold: the highest whose validation sensitivity for the positive class is >= S "
                       "(e.g. 0.95 for screening); default: Youden's J")
    final.add_argument("--target-specificity", type=float, metavar="S", default=None,
                       help="threshold: the lowest whose validation specificity is >= S")
    final.add_argument("--positive-class", metavar="NAME", default=None,
                       help="the class the threshold is for (default: the study's positive_class; for more than two "
                       "classes, naming one adds a threshold for it, e.g. mel)")
    args = parser.parse_args(argv)
    for name in ("top_k", "bootstrap", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for flag in ("target_sensitivity", "target_specificity"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be strictly between 0 and 1, got {value}; e.g. 0.95")
    try:
        args.ensemble = parse_ensemble(args.ensemble)
    except EvaluateError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        table = evaluate_top_k(run_dir, args.top_k, args.bootstrap, args.seed, split=args.split,
                               batch_size=args.batch_size, log=lambda line: print(line, file=sys.stderr),
                               ensemble=args.ensemble, tta=args.tta, target_sensitivity=args.target_sensitivity,
                               target_specificity=args.target_specificity, positive_class=args.positive_class)
    except (EvaluateError, OutsideFolderError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((run_dir / f"{args.split}_evaluation.json").read_text())["evaluations"][-1]
    n = int(table["n"].iloc[0])
    print(f"{args.split} split of {run_dir}: {n} images; top {int(table['rank'].notna().sum())} trial(s) by {record['metric']} "
          f"({record['mode']}) on validation; {args.bootstrap} bootstrap resamples, "
          f"{int(100 * LEVEL)}% percentile intervals")
    if args.split == "val":
        print("caution: the trials were chosen on this split, so these scores are optimistic")
    print(format_table(table, f"best_{record['metric']}"))
    best = record["trials"][0]
    print(f"\n{best['trial_name']} (best on validation):\n{best['classification_report_text']}")
    names = best["class_names"]
    matrix = pd.DataFrame(best["confusion_matrix"], index=[f"true {c}" for c in names],
                          columns=[f"pred {c}" for c in names])
    print(matrix.to_string())
    print("\n" + format_final(record["final"], args.split, record.get("level", LEVEL)))
    print(f"\nwritten: {run_dir / f'{args.split}_predictions.parquet'}\n"
          f"         {run_dir / f'{args.split}_evaluation.json'}"
          + (" (test split use logged)" if args.split == "test" else "")
          + (f"\n         {run_dir / 'model_card.md'}" if args.split == "test" else "")
          + f"\n         {run_dir / record['final']['final_model']} (fitted on validation)\n"
          f"         {run_dir / VAL_PREDICTIONS}"
          + (f"\n         {run_dir / record['final']['reliability_plot']}" if record["final"].get("reliability_plot") else ""))
    return 0


def format_final(final: dict, split: str, level: float) -> str:
    """The final model on the evaluated split: calibration before and after, and its operating point."""
    models = {m["label"]: m for m in final["models"]}
    chosen = models[final["model"]]
    pct = int(round(100 * level))
    lines = [f"final model: {final['model']} (final_model.json; temperature and threshold fitted on validation)"]
    if final.get("fitted_on_evaluated_split"):
        lines.append("caution: fitted and scored on the same (validation) split: optimistic")
    lines.append(f"calibration on {split} (ECE: top-label confidence, 15 equal-width bins; Brier: sklearn's):")
    for m in final["models"]:
        c = m["calibration"]
        lines.append(f"  {m['label']}: T = {c['temperature']:.3f}" + (" (at its bound: the validation set could not "
                     "pin it down)" if c["validation"].get("at_bound") else "")
                     + f"; ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}, "
                     f"Brier {c['before']['brier']:.4f} -> {c['after']['brier']:.4f}, "
                     f"NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}")
    op = chosen.get("operating_point")
    if op:
        v, t, ci = op["validation"], op["at_threshold"], op["ci"]
        lines.append(f"operating point for {op['class']}: threshold {op['value']:.4f} ({_rule(op)}); on validation "
                     f"sensitivity {v['sensitivity']:.4f}, specificity {v['specificity']:.4f}")
        lines.append(f"  on {split} ({pct}% intervals): " + ", ".join(
            f"{name} {_with_ci(t[name], *ci[name])}" for name in ("sensitivity", "specificity", "ppv", "npv", "f1")))
        lines.append(f"  confusion at the threshold: TP {t['tp']}, FN {t['fn']}, FP {t['fp']}, TN {t['tn']}")
        if op.get("rule") == "target_sensitivity":
            met = "met" if t["sensitivity"] >= op["target"] else "NOT met"
            lines.append(f"  target sensitivity {op['target']} on validation; on {split} it reached "
                         f"{t['sensitivity']:.4f} ({met})")
    for name, o in (chosen.get("one_vs_rest") or {}).items():
        lines.append(f"  {name} vs rest at the argmax: sensitivity {_with_ci(o['sensitivity'], *o['ci']['sensitivity'])}, "
                     f"specificity {_with_ci(o['specificity'], *o['ci']['specificity'])}")
    return "\n".join(lines)


def _rule(threshold: dict) -> str:
    from analysis.operating_point import rule_text

    return rule_text(threshold)


if __name__ == "__main__":
    sys.exit(main())
