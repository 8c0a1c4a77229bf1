"""The names of the files in a results folder: one owner each, every module imports them from here.

``search.run`` writes the first group; ``analysis`` writes the rest beside them.
Every path *inside* these files is relative to the folder (it stays sealed).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from analysis.errors import AnalysisError

__all__ = ["write_file", "write_table", "shown_path", "shown_command", "STUDY_JSON", "LEADERBOARD", "EPOCHS", "SPLITS", "NEAR_DUPLICATES", "FINAL_MODEL", "OOD_REFERENCE", "TEST_LOG",
           "VAL_PREDICTIONS", "PLOTS_DIR", "MODEL_CARD", "REPORT_MD", "REPORT_HTML", "EXPORT_DIR", "REFIT_DIR", "evaluation_file",
           "predictions_file"]

# written by search.run
STUDY_JSON = "study.json"
LEADERBOARD = "leaderboard.parquet"
EPOCHS = "epochs.parquet"
SPLITS = "splits.parquet"
NEAR_DUPLICATES = "near_duplicates.parquet"

# written by analysis
FINAL_MODEL = "final_model.json"  # the model a study ships (analysis.final_model)
OOD_REFERENCE = "ood_reference.parquet"  # what the training images look like, for predict's warnings (analysis.ood)
TEST_LOG = "test_evaluation.json"  # evaluations of the test split, and the log of every look at it
VAL_PREDICTIONS = "val_predictions_cache.parquet"  # not val_predictions.parquet: --split val writes that
PLOTS_DIR = "report_files"
MODEL_CARD = "model_card.md"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
EXPORT_DIR = "export"
REFIT_DIR = "refit"  # the final model's members trained again on train + val (analysis.refit)


def evaluation_file(split: str) -> str:
    """``test_evaluation.json`` or ``val_evaluation.json``: the evaluations of ``split``."""
    return f"{split}_evaluation.json"


def predictions_file(split: str) -> str:
    """``test_predictions.parquet`` or ``val_predictions.parquet``: each evaluated model's predictions."""
    return f"{split}_predictions.parquet"


def write_file(path: Path, data: bytes) -> Path:
    """Write a file of the folder whole or not at all (``search.storage.write_atomic``); a failure (a full disk)
    is an ``AnalysisError`` naming it."""
    from search.storage import write_atomic  # search/ is the layer below; its package imports TensorFlow lazily

    path = Path(path)
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise AnalysisError(f"cannot write {str(path)!r} ({exc.strerror or exc}); free some space, or make the "
                            "folder writable, and run again") from None
    return path


def write_table(frame, path: Path) -> Path:
    """A Parquet file of the folder, written whole or not at all, like ``write_file``."""
    from search.storage import parquet_bytes

    return write_file(path, parquet_bytes(frame))


def shown_path(path) -> str | None:
    """A path from outside the folder as its documents show it: a relative one as recorded, an absolute one by
    its last part (``.../quickstart.py``): a report or card names no place on the machine that wrote it."""
    if not path:
        return path
    return f".../{Path(str(path)).name}" if Path(str(path)).is_absolute() else str(path)


def shown_command(command: str) -> str:
    """A recorded command line with each absolute path in it shown by ``shown_path``."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: show it as one word
        return shown_path(command) or ""
    return " ".join(shlex.quote(shown_path(w)) if w.startswith("/") else shlex.quote(w) for w in words)
