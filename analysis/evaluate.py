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

Outputs: ``RUN_DIR/test_predictions.parquet`` (one row per trial and image:
``trial``, ``path``, ``label``, ``label_index``, ``predicted``,
``prob_<class>``) and ``RUN_DIR/test_evaluation.json`` (``test_split_log``
and ``evaluations``, both appended to on every run).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["EvaluateError", "evaluate_top_k", "point_metrics", "bootstrap_ci", "ranked_trials", "read_split",
           "decode_split", "log_test_use", "main"]

SPLITS = ("test", "val")
LEVEL = 0.95
_CELLS_PER_CHUNK = 4_000_000  # resamples x images held in memory at once (~32 MB of float64)


class EvaluateError(ValueError):
    """Something about the results folder or the request is wrong. The message names it and the fix."""


# --------------------------------------------------------------------------
# choosing the trials (validation only)
# --------------------------------------------------------------------------


def ranked_trials(run_dir: Path, study: dict) -> tuple[pd.DataFrame, list[str]]:
    """Trials with a checkpoint, best first by the study's validation metric; and notes on the others.

    Uses ``search.predict.best_row`` repeatedly, so the order (ties to the
    lower validation loss) is the one ``search.predict`` picks its best by.
    """
    from search.predict import best_row

    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    column = f"best_{study.get('metric', 'val_balanced_accuracy')}"
    if board.empty or "trial_name" not in board.columns:
        raise EvaluateError(f"the leaderboard in {str(run_dir)!r} holds no trials yet; let python -m search.run run")
    for col in (column, "checkpoint_path"):
        if col not in board.columns:
            board[col] = math.nan if col == column else None
    has = board["checkpoint_path"].notna() & (board["checkpoint_path"].astype("string").str.len() > 0)
    notes = [f"{row['trial_name']}: no checkpoint ({row.get('status', '?')}{_error(row)}); skipped"
             for _, row in board[~has].iterrows()]
    rest, order = board[has], []
    while len(rest):
        best = best_row(rest, column, study.get("mode", "max"))
        order.append(best.name)
        rest = rest.drop(index=best.name)
    return board.loc[order].reset_index(drop=True), notes


def _error(row) -> str:
    error = row.get("error")
    return f": {error}" if isinstance(error, str) and error else ""


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
    table = pd.read_parquet(path)
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
    n = len(y_true)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CELLS_PER_CHUNK // max(n, 1)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picks = rng.integers(0, n, size=(b, n))
        # Row r counts how often each image appears in resample r.
        counts = np.bincount((picks + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        parts.append(_weighted_metrics(y_true, probs, counts, class_names, positive))
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for name in parts[0]:
        values = np.concatenate([p[name] for p in parts])
        values = values[~np.isnan(values)]
        out[name] = (float(np.percentile(values, q[0])), float(np.percentile(values, q[1]))) if len(values) \
            else (math.nan, math.nan)
    return out


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
# the evaluation
# --------------------------------------------------------------------------


def evaluate_top_k(run_dir: str | Path, k: int = 3, n_boot: int = 1000, seed: int = 0, *, split: str = "test",
                   batch_size: int = 64, level: float = LEVEL, log=print) -> pd.DataFrame:
    """Score the ``k`` best trials (by validation) on ``split``; write predictions and the evaluation record.

    Returns one row per evaluated trial, best first: ``rank``, ``trial_name``,
    ``backbone``, ``status``, ``best_<study metric>`` (validation), ``split``,
    ``n``, every metric, and ``<metric>_ci_low`` / ``<metric>_ci_high``.
    Trials without a checkpoint, or whose checkpoint cannot be loaded, are
    skipped with a note (``log``) and the next one is taken, so a study that is
    still running or has errored trials can be evaluated.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    from search.predict import PredictError, choose_trial, load_trial_model, read_study

    if k < 1:
        raise EvaluateError(f"k must be >= 1, got {k}")
    run_dir = Path(run_dir).expanduser().resolve()
    try:
        study = read_study(run_dir)
    except PredictError as exc:
        raise EvaluateError(str(exc)) from None
    rows = read_split(run_dir, split)
    ranked, notes = ranked_trials(run_dir, study)
    metric_column = f"best_{study.get('metric', 'val_balanced_accuracy')}"

    models = []  # (leaderboard row, chosen trial, model, class names, size)
    for _, row in ranked.iterrows():
        if len(models) == k:
            break
        try:
            trial = choose_trial(run_dir, study, str(row["trial_name"]))
            model, class_names, size = load_trial_model(trial, run_dir, study)
        except PredictError as exc:  # a lost checkpoint; one leading out of the folder (OutsideFolderError) stops all
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

    decoded = {size: decode_split(rows, size) for size in sorted({m[4] for m in models})}
    if split == "test":  # record the look at the test set before anything can fail
        log_test_use(run_dir, trials=[m[1].name for m in models], n_test=len(rows), by="analysis.evaluate")

    positive_name = study.get("dataset", {}).get("positive_class")
    table, predictions, records = [], [], []
    for rank, (row, trial, model, class_names, size) in enumerate(models, start=1):
        y = label_indices(rows, class_names)
        probs = model.predict(decoded[size], batch_size=batch_size, verbose=0).astype(np.float64)
        positive = class_names.index(positive_name) if positive_name in class_names else None
        values = point_metrics(y, probs, class_names, positive)
        ci = bootstrap_ci(y, probs, class_names, n_boot=n_boot, seed=seed, positive=positive, level=level)
        y_pred = probs.argmax(axis=1)
        labels = list(range(len(class_names)))
        table.append({"rank": rank, "trial_name": trial.name, "backbone": trial.backbone, "status": row.get("status"),
                      metric_column: trial.value, "split": split, "n": len(y), **values,
                      **{f"{m}_ci_{end}": ci[m][j] for m in values for j, end in enumerate(("low", "high"))}})
        predictions.append(_prediction_rows(trial.name, rows, y, probs, class_names))
        records.append({
            "rank": rank, "trial_name": trial.name, "checkpoint": trial.checkpoint.relative_to(run_dir).as_posix(),
            metric_column: trial.value, "best_epoch": trial.epoch, "metrics": values,
            "ci": {m: list(ci[m]) for m in values},
            "classification_report": classification_report(
                y, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0),
            "classification_report_text": classification_report(
                y, y_pred, labels=labels, target_names=class_names, digits=4, zero_division=0),
            "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).tolist(),
            "class_names": class_names,
        })

    from search.storage import write_parquet

    write_parquet(pd.concat(predictions, ignore_index=True), run_dir / f"{split}_predictions.parquet")
    _append(run_dir / f"{split}_evaluation.json", "evaluations", {
        "evaluated_at": _now(), "split": split, "n": len(rows), "metric": study.get("metric"),
        "mode": study.get("mode"), "k": k, "n_boot": n_boot, "seed": seed, "level": level,
        "positive_class": positive_name, "notes": notes, "trials": records,
    })
    return pd.DataFrame(table)


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
    args = parser.parse_args(argv)
    for name in ("top_k", "bootstrap", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        table = evaluate_top_k(run_dir, args.top_k, args.bootstrap, args.seed, split=args.split,
                               batch_size=args.batch_size, log=lambda line: print(line, file=sys.stderr))
    except (EvaluateError, OutsideFolderError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((run_dir / f"{args.split}_evaluation.json").read_text())["evaluations"][-1]
    n = int(table["n"].iloc[0])
    print(f"{args.split} split of {run_dir}: {n} images; top {len(table)} trial(s) by {record['metric']} "
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
    print(f"\nwritten: {run_dir / f'{args.split}_predictions.parquet'}\n"
          f"         {run_dir / f'{args.split}_evaluation.json'}"
          + (" (test split use logged)" if args.split == "test" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
