"""Tables from a results folder: best trial per backbone and per backbone x unfreeze depth,
search efficiency (best-so-far against compute) and the budget ASHA saved.

Pure pandas: no Ray, no TensorFlow. Every function works on a finished study, on
one that is still running (partial Parquet files, trials with status ``running``)
and on studies with errored trials (rows without metrics).

``load_run(run_dir)`` reads the folder once; the other functions take the ``Run``.
Tables keep the leaderboard's own column names (``best_val_auc``, ``wall_time_s``, ...)
so their numbers can be checked against ``leaderboard.parquet``; ``pretty`` and
``to_markdown`` turn them into something to read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.errors import AnalysisError, ResultsFolderError
from search.budget import STOP_REASONS
from analysis.reader import has_checkpoint, read_record
from analysis.reader import read_table as reader_read_table
from trainables.hparams import HPARAM_NAMES, PLACEMENT

# Columns of leaderboard.parquet that are not hyperparameters (search/results.py writes them).
BOOKKEEPING = frozenset({
    "trial_id", "trial_number", "trial_name", "status", "error", "checkpoint_path", "epochs", "best_epoch",
    "wall_time_s", "trainable_params", "total_params", "started_at", "ended_at", "finished_at",
    "setup_s", "train_s", "checkpoint_s", "adjusted", "failures", *PLACEMENT,
})
STALE_S = 1800  # running trials in a leaderboard not written for this long: the driver has probably stopped
STATUS_ORDER = ("finished", "stopped", "running", "interrupted", "errored")
# Metric columns of the best-per-group tables, in order; recall columns are added per class.
METRIC_COLUMNS = ("best_val_accuracy", "best_val_balanced_accuracy", "best_val_macro_f1", "best_val_auc")
COST_COLUMNS = ("best_epoch", "epochs", "wall_time_s", "trainable_params", "total_params")
# The one owner of the words a reader sees for a column or metric name (tables' headers, plots' axes):
# ``label(name)``. Exact names first; metric names are composed by ``label`` from the parts below
# (``best_val_balanced_accuracy`` -> "validation balanced accuracy (best epoch)").
LABELS = {
    "best_epoch": "best epoch", "epochs": "epochs", "wall_time_s": "wall time (s)",
    "trainable_params": "trainable parameters", "total_params": "total parameters", "trial_name": "trial",
    "trial_number": "trial number", "cumulative_s": "cumulative wall time (s)", "best_so_far": "best so far",
    "new_best": "", "trials": "trials", "status": "status", "backbone": "backbone", "rank": "rank",
    "recall_positive": "recall (positive class)", "score": "score (study metric)",
    # hyperparameters (trainables.hparams) that are not plain words with underscores
    "learning_rate": "learning rate", "fine_tune_lr": "fine-tuning learning rate", "cnn_learning_rate":
    "learning rate (small CNN)", "warmup_epochs": "warm-up epochs", "head_units": "head units",
    "batch_size": "batch size", "class_weight": "class weight", "unfreeze": "unfreeze depth",
    # curves and operating points (analysis.curves, analysis.operating_point)
    "fpr": "false positive rate (1 - specificity)", "tpr": "true positive rate (sensitivity)",
    "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV (precision)", "npv": "NPV",
    "threshold": "threshold",
}
METRIC_WORDS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1", "auc": "AUC",
    "loss": "cross-entropy loss", "precision": "precision", "recall": "recall", "f1": "F1",
    "average_precision": "average precision",
}
_SPLIT_WORDS = {"val_": "validation", "test_": "test", "train_": "training"}
_EPOCH_WORDS = {"best_": " (best epoch)", "last_": " (last epoch)"}


@dataclasses.dataclass
class Run:
    """One results folder, read once."""

    path: Path
    record: dict  # study.json
    board: pd.DataFrame  # leaderboard.parquet (empty if not written yet)
    epochs: pd.DataFrame  # epochs.parquet (empty if not written yet)
    splits: pd.DataFrame | None  # splits.parquet, if present (images named relative to the dataset's root)
    data_dir: str | None = None  # where the dataset now lives, if it moved (--data-dir; analysis.splits.image_paths)

    @property
    def study(self) -> dict:
        return self.record.get("study", {})

    @property
    def name(self) -> str:
        return str(self.study.get("name", self.path.name))

    @property
    def metric(self) -> str:
        return str(self.study.get("metric", "val_balanced_accuracy"))

    @property
    def mode(self) -> str:
        return str(self.study.get("mode", "max"))

    @property
    def max_epochs(self) -> int:
        return int(self.study.get("max_epochs", 0) or 0)

    @property
    def num_samples(self) -> int | None:
        """The planned trials; None for a study that ran trials until its time limit (``search.budget``)."""
        value = self.study.get("num_samples", 0)
        return None if value is None else int(value or 0)

    @property
    def score_column(self) -> str:
        return f"best_{self.metric}"

    @property
    def positive_class(self) -> str | None:
        return (self.study.get("dataset") or {}).get("positive_class")



def decimals_for(step: float | None) -> int:
    """Decimals that show a step of ``step`` and no finer: 1/20 -> 2, 1/120 -> 3, 1/2000 -> 4. Every value over n
    images is printed with ``decimals_for(1 / n)``: one image moves it by that step, so finer digits are noise."""
    if not step or step <= 0 or math.isnan(step):
        return 4
    return max(2, min(4, math.ceil(-math.log10(step) - 1e-9)))

def load_run(run_dir: str | Path, data_dir: str | None = None) -> Run:
    """Read ``study.json``, ``leaderboard.parquet``, ``epochs.parquet`` and ``splits.parquet`` (``analysis.reader``).

    A damaged file (cut short by a crash, a full disk or an interrupted copy) is an ``AnalysisError`` naming it.
    """
    path = Path(run_dir)
    try:
        record = read_record(path)
        board, epochs = read_table(path / "leaderboard.parquet"), read_table(path / "epochs.parquet")
        splits = read_table(path / "splits.parquet") if (path / "splits.parquet").exists() else None
    except ResultsFolderError as exc:
        raise AnalysisError(str(exc)) from None
    if "status" not in board.columns:
        board["status"] = pd.Series(dtype="string")
    for col in ("trial_id", "trial_name"):
        if col not in board.columns:
            board[col] = pd.Series(dtype="string")
    # A trial whose epochs were written but whose leaderboard row was not yet: it is running.
    if not epochs.empty and "trial_id" in epochs.columns:
        missing = sorted(set(epochs["trial_id"].dropna()) - set(board["trial_id"].dropna()))
        if missing:
            extra = pd.DataFrame({"trial_id": missing, "status": "running"})
            board = pd.concat([board, extra], ignore_index=True)
    return Run(path=path, record=record, board=board.reset_index(drop=True), epochs=epochs, splits=splits,
               data_dir=data_dir)


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet file of the folder (empty if absent); a damaged one is an ``AnalysisError`` naming it."""
    try:
        return reader_read_table(path)
    except ResultsFolderError as exc:
        raise AnalysisError(str(exc)) from None


# ---------------------------------------------------------------- the study's state

def status_counts(run: Run) -> dict[str, int]:
    """Trials by status, every status named (0 when none)."""
    counts = run.board["status"].fillna("running").value_counts().to_dict()
    out = {s: int(counts.pop(s, 0)) for s in STATUS_ORDER}
    out.update({str(k): int(v) for k, v in counts.items()})
    return out


def run_state(run: Run, now: datetime | None = None) -> dict:
    """Whether the results are partial, and why.

    It uses what the folder shows: ``finished_at`` and ``outcome`` in
    study.json (run.py writes them when a run ends), trials still
    ``running`` in the leaderboard, fewer trials than ``num_samples``, and how
    long ago leaderboard.parquet was last written.
    """
    now = now or datetime.now(timezone.utc)
    counts = status_counts(run)
    reasons = []
    if counts["running"]:
        reasons.append(f"{counts['running']} trial(s) still running (or the driver stopped while they ran)")
    if counts["interrupted"] and run.record.get("stopped_because") != "time_limit":  # the limit ends the last trials
        reasons.append(f"{counts['interrupted']} trial(s) interrupted when the run ended "
                       "(python -m search.run ... --resume continues them)")
    # Fewer trials than planned is the study's end when its budget says so (study.json's stopped_because).
    if run.num_samples is not None and len(run.board) < run.num_samples and run.record.get("stopped_because") not in STOP_REASONS:
        why = " (the study's time limit may have ended it)" if run.study.get("time_limit_s") else ""
        reasons.append(f"{len(run.board)} of {run.num_samples} trials in the leaderboard{why}")
    if run.board.empty:
        reasons.append("no leaderboard.parquet yet")
    board_file = run.path / "leaderboard.parquet"
    updated = datetime.fromtimestamp(board_file.stat().st_mtime, timezone.utc) if board_file.exists() else None
    finished_at = run.record.get("finished_at")
    if counts["running"] and updated and (now - updated).total_seconds() > STALE_S:
        reasons.append(f"the leaderboard was last written {(now - updated).total_seconds() / 3600:.1f} h ago while "
                       "trials were running: the driver probably stopped (python -m search.run ... --resume continues it)")
    resumed = [str(r) for r in run.record.get("resumed_at", [])]
    if finished_at and resumed and max(resumed) > str(finished_at):
        reasons.append(f"resumed at {max(resumed)}, after the recorded finish ({finished_at})")
    return {
        "partial": bool(reasons),
        "reasons": reasons,
        "finish_marker": finished_at,
        "started_at": run.record.get("started_at"),
        "resumed_at": list(run.record.get("resumed_at", [])),
        "updated_at": updated.isoformat(timespec="seconds") if updated else None,
        "updated_ago_s": (now - updated).total_seconds() if updated else None,
    }


def split_counts(run: Run) -> pd.DataFrame | None:
    """Images per split and class (from splits.parquet), with totals."""
    if run.splits is None or run.splits.empty or not {"split", "label"} <= set(run.splits.columns):
        return None
    table = pd.crosstab(run.splits["split"], run.splits["label"], margins=True, margins_name="total")
    order = [s for s in ("train", "val", "test", "unused", "total") if s in table.index]
    table = table.loc[order + [s for s in table.index if s not in order]]
    table.index.name = "split"
    table.columns.name = None
    return table.reset_index()


# ---------------------------------------------------------------- hyperparameters

def hyperparameter_columns(run_or_board) -> list[str]:
    """Leaderboard columns holding hyperparameters (searched, conditional or fixed)."""
    board = run_or_board.board if isinstance(run_or_board, Run) else run_or_board
    return [c for c in board.columns
            if c not in BOOKKEEPING and not c.startswith(("best_", "last_")) and not c.startswith("_")]


def searched_parameters(run: Run, statuses=("finished", "stopped", "running")) -> list[str]:
    """Hyperparameter columns whose value varies across trials, without duplicates.

    Ray's OptunaSearch puts both Optuna's parameter (``cnn_learning_rate``) and
    the space's output (``learning_rate``) into a trial's config; a column that
    only repeats another one on the rows where it is set is left out, keeping
    the hyperparameter's own name.
    """
    board = run.board[run.board["status"].isin(statuses)] if statuses else run.board
    fixed = set((run.study.get("fixed") or {}).keys())
    cols = [c for c in hyperparameter_columns(board) if c not in fixed and board[c].dropna().nunique() > 1]

    def rank(c):  # keep: hyperparameter names first, then the most rows set, then the shorter name
        return (c not in HPARAM_NAMES, -int(board[c].notna().sum()), len(c), c)

    kept: list[str] = []
    for col in sorted(cols, key=rank):
        if not any(_repeats(board[col], board[k]) for k in kept):
            kept.append(col)
    return [c for c in cols if c in kept]  # leaderboard order


def _repeats(a: pd.Series, b: pd.Series) -> bool:
    """``a`` equals ``b`` on every row where ``a`` is set (and ``b`` is set there too)."""
    rows = a.notna()
    if not rows.any() or b[rows].isna().any():
        return False
    return bool((a[rows].astype(str).values == b[rows].astype(str).values).all()
                or (_numeric(a[rows]) is not None and _numeric(b[rows]) is not None
                    and (_numeric(a[rows]) == _numeric(b[rows])).all()))


def _numeric(s: pd.Series):
    try:
        return pd.to_numeric(s).astype(float).values
    except (TypeError, ValueError):
        return None


def parameter_kind(values: pd.Series, name: str = "") -> str:
    """``categorical``, ``int``, ``float`` or ``log`` (a float best read on a log axis)."""
    values = values.dropna()
    if values.empty or values.dtype == bool or str(values.dtype) == "boolean" or not pd.api.types.is_numeric_dtype(values):
        return "categorical"
    floats = values.astype(float)
    if (floats == floats.round()).all():
        return "categorical" if floats.nunique() <= 5 else "int"
    if _looks_log(name, floats):
        return "log"
    return "float"


def _looks_log(name: str, floats: pd.Series) -> bool:
    if (floats <= 0).any():
        return False
    if re.search(r"(^|_)(lr|learning_rate|weight_decay|decay|eps)($|_)", name):
        return True
    return floats.max() / floats.min() >= 100


def category_order(values) -> list:
    """Categories sorted numbers first (numerically), then the rest (``0, 20, 40, all``)."""
    def key(v):
        try:
            return (0, float(v), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(v))
    return sorted({v for v in values if not _isna(v)}, key=key)


def _isna(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- best trials

def scored(run: Run) -> pd.DataFrame:
    """Trials with a score (not errored), best first by ``search.ranking.rank`` (ties to the lower validation loss)."""
    from search.ranking import rank

    board = run.board
    score = run.score_column
    if score not in board.columns or board.empty:
        return board.iloc[0:0]
    return rank(board[(board["status"] != "errored") & board[score].notna()], score, run.mode)


def best_trial(run: Run) -> pd.Series | None:
    """The study's best trial: the first scored trial with a checkpoint (``analysis.reader``'s rule, which
    ``search.predict``, ``analysis.evaluate`` and ``analysis.export`` take), else the first scored one
    (a running study whose best has not saved yet); None if no trial has a score yet."""

    ranked = scored(run)
    saved = ranked[has_checkpoint(ranked)]
    return saved.iloc[0] if len(saved) else ranked.iloc[0] if len(ranked) else None


def recall_columns(run: Run) -> list[str]:
    """``best_val_recall_<positive class>`` for a binary study with a positive class, else every class's."""
    cols = [c for c in run.board.columns if c.startswith("best_val_recall_")]
    positive = run.positive_class
    if positive and f"best_val_recall_{positive}" in cols:
        return [f"best_val_recall_{positive}"]
    return cols


def table_columns(run: Run) -> list[str]:
    cols = ["trial_name", "status", run.score_column]
    cols += [c for c in (*METRIC_COLUMNS, *recall_columns(run)) if c not in cols]
    cols += list(COST_COLUMNS)
    return [c for c in cols if c in run.board.columns]


def best_per_group(run: Run, by: list[str]) -> pd.DataFrame:
    """The best trial of each group of ``by`` columns (a missing or unset column groups as ``default``)."""
    ranked = scored(run).copy()
    for col in by:
        if col not in ranked.columns:
            ranked[col] = "default"
        ranked[col] = ranked[col].astype("object").where(ranked[col].notna(), "default").map(_label)
    columns = list(by) + [c for c in table_columns(run) if c not in by]
    if ranked.empty:
        return pd.DataFrame(columns=columns + ["trials"])
    best = ranked.groupby(by, sort=False, dropna=False).head(1).copy()
    counts = run.board.copy()
    for col in by:
        counts[col] = (counts[col].astype("object").where(counts[col].notna(), "default").map(_label)
                       if col in counts.columns else "default")
    sizes = counts.groupby(by, dropna=False).size().rename("trials").reset_index()
    best = best[columns].merge(sizes, on=by, how="left")
    best = best.sort_values(run.score_column, ascending=run.mode == "min", kind="mergesort")
    if len(by) > 1:  # e.g. backbone, then unfreeze depth in numeric order
        order = {v: i for i, v in enumerate(best[by[0]].drop_duplicates())}
        depth = {v: i for i, v in enumerate(category_order(best[by[1]]))}
        best = best.sort_values(by, key=lambda s: s.map(order if s.name == by[0] else depth), kind="mergesort")
    return best.reset_index(drop=True)


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def best_per_backbone(run: Run) -> pd.DataFrame:
    """One row per backbone: its best trial's validation metrics, epochs, wall time and parameters."""
    return best_per_group(run, ["backbone"])


def best_per_backbone_unfreeze(run: Run) -> pd.DataFrame:
    """One row per backbone x unfreeze depth (``default`` when the study does not set it)."""
    return best_per_group(run, ["backbone", "unfreeze"])



def errored_trials(run: Run) -> pd.DataFrame:
    board = run.board[run.board["status"] == "errored"]
    cols = [c for c in ("trial_name", "trial_number", "backbone", "epochs", "error") if c in board.columns]
    return board[cols].reset_index(drop=True)


def all_trials(run: Run) -> pd.DataFrame:
    """Every trial, best first (unscored ones last), with its searched hyperparameters."""
    ranked = scored(run)
    rest = run.board.drop(index=ranked.index)
    board = pd.concat([ranked, rest])
    cols = ["trial_name", "status", run.score_column, *searched_parameters(run, statuses=None), "best_epoch",
            "epochs", "wall_time_s"]
    seen: list[str] = []
    for c in cols:
        if c in board.columns and c not in seen:
            seen.append(c)
    return board[seen].reset_index(drop=True)


# ---------------------------------------------------------------- display

def label(column) -> str:
    """The words for a column or metric name: ``LABELS`` first, then composed from its parts.

    ``best_val_balanced_accuracy`` -> "validation balanced accuracy (best epoch)",
    ``val_auc`` -> "validation AUC", ``test_recall_malignant`` -> "test recall of malignant",
    ``precision_mel`` -> "precision of mel"; any other name has its underscores read as spaces.
    """
    name = str(column)
    if name in LABELS:
        return LABELS[name]
    epoch = next((p for p in _EPOCH_WORDS if name.startswith(p)), "")
    rest = name[len(epoch):]
    split = next((p for p in _SPLIT_WORDS if rest.startswith(p)), "")
    metric = rest[len(split):]
    words = METRIC_WORDS.get(metric)
    if words is None:
        for prefix in ("recall", "precision", "f1"):
            if metric.startswith(prefix + "_") and len(metric) > len(prefix) + 1:
                words = f"{METRIC_WORDS[prefix]} of {metric[len(prefix) + 1:]}"
                break
    if words is None:
        words = metric.replace("_", " ").strip()
    return " ".join(filter(None, [_SPLIT_WORDS.get(split, ""), words])) + _EPOCH_WORDS.get(epoch, "")


def pretty(frame: pd.DataFrame, run: Run | None = None) -> pd.DataFrame:
    """Numbers formatted as text and column names in words (``label``), for Markdown and HTML."""
    out = frame.copy()
    for col in out.columns:
        whole = _whole_numbers(out[col]) and not _is_score(str(col))
        out[col] = out[col].map(lambda v, c=col, w=whole: format_value(v, str(c), whole=w))
    return out.rename(columns={col: label(col) for col in out.columns})


def _is_score(column: str) -> bool:
    return column.startswith(("best_", "last_", "val_", "test_", "train_")) or column in ("importance",)


def _whole_numbers(values: pd.Series) -> bool:
    """A float column holding only whole numbers (``head_units`` 0.0, 128.0 beside NaN)."""
    if not pd.api.types.is_float_dtype(values):
        return False
    present = values.dropna()
    return bool(len(present)) and bool((present == present.round()).all())


def format_value(value, column: str = "", whole: bool = False) -> str:
    if value is None or _isna(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value, "dtype").kind in "iu"):
        return f"{int(value):,}" if "params" in column else str(int(value))
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "dtype").kind == "f"):
        value = float(value)
        if column.endswith("params") or column in ("epochs", "best_epoch", "trials", "trial_number"):
            return f"{int(value):,}" if "params" in column else str(int(value))
        if whole and not (column.endswith("_s") or "time" in column):
            return str(int(value))
        if column.endswith("_s") or "time" in column:
            return f"{value:.1f}"
        if re.search(r"(lr|learning_rate)", column) or (value != 0 and abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}"
    return str(value)


def to_markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub Markdown table (no tabulate needed); cells are text as given."""
    if index:
        frame = frame.reset_index()
    if frame.empty and not len(frame.columns):
        return "_(empty)_"

    def cell(v) -> str:
        text = "" if v is None or _isna(v) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def class_names(run: Run) -> list[str]:
    """The study's classes in training order (``splits.parquet``'s ``label_index``), else as ``study.json`` lists them."""
    if run.splits is not None and "label" in run.splits.columns:
        if "label_index" in run.splits.columns:
            return list(run.splits.sort_values("label_index")["label"].drop_duplicates().astype(str))
        return sorted(run.splits["label"].astype(str).unique())
    return [str(c) for c in ((run.study.get("dataset") or {}).get("classes") or [])]
