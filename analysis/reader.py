"""The one reader of a results folder: its study record, its leaderboard, "the best trial", and its model.

``search.predict``, ``analysis.evaluate``, ``analysis.export``, ``analysis.results``
and the report (through ``analysis.tables``) all open a finished or partial run
here, so they agree on what is in it and on which trial is the best:

* **The best trial** is the first trial, in ``search.ranking.rank``'s order (best
  ``best_<metric>`` by the study's mode, ties to the lower validation loss at the
  best epoch, then the leaderboard's order), *that has a checkpoint*: a trial
  whose model was never saved cannot be predicted with, evaluated or exported.
* A checkpoint is read only inside the folder (``search.storage.StudyFolder.resolve``):
  a copied folder never loads the original's models.

Damaged files (cut short by a crash, a full disk or an interrupted copy) are a
``ResultsFolderError`` naming the file and the fix. Nothing here imports
TensorFlow or Ray until a model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import ResultsFolderError
from analysis.files import LEADERBOARD, SPLITS, STUDY_JSON

__all__ = ["ResultsFolderError", "ChosenTrial", "read_record", "read_study", "read_table",
           "read_leaderboard", "has_checkpoint", "ranked_trials", "choose_trial", "trial_from_row", "locate_checkpoint",
           "load_trial_model", "Loaded", "read_class_names"]

DEFAULT_METRIC, DEFAULT_MODE = "val_balanced_accuracy", "max"
_DAMAGED = "was it cut short (a crash, a full disk, an interrupted copy)? Restore it from the original folder"


@dataclass(frozen=True)
class ChosenTrial:
    name: str
    checkpoint: Path
    metric: str
    value: float
    epoch: int | None
    backbone: str | None
    relocated_from: str | None  # the recorded checkpoint path, when the run folder was moved


# --------------------------------------------------------------------------
# the record and the tables
# --------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict:
    """``run_dir/study.json``, the whole record (``study``, ``flags``, ``outcome``, ...)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise ResultsFolderError(f"results folder {str(run_dir)!r} {what}; give a study's results folder such as "
                                 "runs/quickstart (run python -m search.run first)")
    path = run_dir / STUDY_JSON
    if not path.is_file():
        raise ResultsFolderError(f"{str(run_dir)!r} is not a results folder: it has no {STUDY_JSON}; run "
                                 "python -m search.run first, and pass the STORAGE/<study name> folder it writes")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ResultsFolderError(f"{str(path)!r} is unreadable ({type(exc).__name__}: {exc}); {_DAMAGED}") from None
    if not isinstance(record, dict) or not isinstance(record.get("study", {}), dict):
        raise ResultsFolderError(f"{str(path)!r} holds no study record (a JSON object with a 'study' object); {_DAMAGED}")
    return record


def read_study(run_dir: Path) -> dict:
    """The ``study`` part of ``study.json``, after checking the folder also has its leaderboard."""
    record = read_record(run_dir)
    if not (Path(run_dir) / LEADERBOARD).is_file():
        raise ResultsFolderError(f"{str(run_dir)!r} has no {LEADERBOARD} yet: no trial has reported. Let "
                                 "python -m search.run run (or resume it), then pass its STORAGE/<study name> folder")
    return record.get("study", {})


def read_table(path: Path):
    """A Parquet file of the folder as a DataFrame; empty if it is not there (a study that just started)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError), OSError and others for a damaged file
        raise ResultsFolderError(f"{str(path)!r} is unreadable ({type(exc).__name__}: {exc}); {_DAMAGED}; "
                                 "while a study runs, the driver rewrites it whole every few seconds") from None


def read_leaderboard(run_dir: Path, study: dict):
    """``leaderboard.parquet`` with the study's score and ``checkpoint_path`` columns present (maybe empty)."""
    board = read_table(Path(run_dir) / LEADERBOARD)
    if board.empty or "trial_name" not in board.columns:
        raise ResultsFolderError(f"the leaderboard in {str(run_dir)!r} holds no trials yet; let python -m search.run run")
    for col in (score_column(study), "checkpoint_path"):
        if col not in board.columns:
            board[col] = math.nan if col.startswith("best_") else None
    return board


def score_column(study: dict) -> str:
    return f"best_{study.get('metric', DEFAULT_METRIC)}"


# --------------------------------------------------------------------------
# the best trial
# --------------------------------------------------------------------------


def has_checkpoint(board):
    """Per row: whether the trial saved a model (a non-empty ``checkpoint_path``)."""
    import pandas as pd

    if "checkpoint_path" not in board.columns:
        return pd.Series(False, index=board.index)
    return board["checkpoint_path"].notna() & (board["checkpoint_path"].astype("string").str.len() > 0).fillna(False)


def ranked_trials(run_dir: Path, study: dict):
    """``(ranked, notes)``: trials with a checkpoint, best first by the rule above; a note per trial without one."""
    return _ranked(read_leaderboard(run_dir, study), study)


def _ranked(board, study: dict):
    from search.ranking import rank

    has = has_checkpoint(board)
    notes = [f"{row['trial_name']}: no checkpoint ({row.get('status', '?')}{_error_note(row)}); skipped"
             for _, row in board[~has].iterrows()]
    ranked = rank(board[has], score_column(study), study.get("mode", DEFAULT_MODE))
    return ranked.reset_index(drop=True), notes


def choose_trial(run_dir: Path, study: dict, name: str | None) -> ChosenTrial:
    """The best trial with a checkpoint, or trial ``name`` (its ``trial_name`` or ``trial_id``)."""
    board = read_leaderboard(run_dir, study)
    has = has_checkpoint(board)
    if name is not None:
        from trainables.checks import unknown_name_message

        rows = board[(board["trial_name"] == name) | (board.get("trial_id", board["trial_name"]) == name)]
        if rows.empty:
            raise ResultsFolderError("--trial: " + unknown_name_message("trial", name, board["trial_name"].dropna().tolist()))
        row = rows.iloc[0]
        if not has[rows.index[0]]:
            raise ResultsFolderError(f"--trial: trial {row['trial_name']!r} has no checkpoint (status "
                                     f"{row.get('status')}{_error_note(row)}); trials with one: {_names(board[has])}")
    else:
        ranked, _ = _ranked(board, study)
        if ranked.empty:
            statuses = board["status"].value_counts().to_dict() if "status" in board.columns else {}
            errors = board["error"].dropna() if "error" in board.columns else []
            fix = (f"fix what failed (e.g. {errors.iloc[0]}) and run the study again" if len(errors) == len(board)
                   else "a trial saves one after its first epoch; let the study run longer "
                   "(python -m search.run STUDY_FILE --storage STORAGE --resume)")
            raise ResultsFolderError(f"no trial in {str(run_dir)!r} has a checkpoint (trials by status: {statuses}); {fix}")
        row = ranked.iloc[0]
    return trial_from_row(run_dir, study, row)


def trial_from_row(run_dir: Path, study: dict, row) -> ChosenTrial:
    """The trial of leaderboard row ``row`` (one with a checkpoint), its checkpoint found inside ``run_dir``."""
    recorded = str(row["checkpoint_path"])
    checkpoint, relocated = locate_checkpoint(run_dir, recorded, str(row["trial_name"]), study.get("name"))
    value, epoch, backbone = row[score_column(study)], row.get("best_epoch"), row.get("backbone")
    return ChosenTrial(
        name=str(row["trial_name"]),
        checkpoint=checkpoint,
        metric=study.get("metric", DEFAULT_METRIC),
        value=math.nan if _missing(value) else float(value),
        epoch=None if _missing(epoch) else int(epoch),
        backbone=None if _missing(backbone) else str(backbone),
        relocated_from=recorded if relocated else None,
    )


def locate_checkpoint(run_dir: Path, recorded: str, trial: str, study_name: str | None = None) -> tuple[Path, bool]:
    """The checkpoint folder a leaderboard row records, inside ``run_dir`` only; and whether it was re-rooted there.

    The leaderboard records it relative to the results folder. An absolute
    path, from a folder written by an earlier version, is re-rooted into
    ``run_dir`` and never read where it points: a later study under the same
    name may have replaced those models. ``StudyFolder.resolve`` owns that
    rule and refuses a path that leads out of the folder (``OutsideFolderError``).
    """
    from search.storage import StudyFolder, is_uri
    from trainables.checkpoint import has_model

    run_dir = Path(run_dir)
    folder = StudyFolder(run_dir.parent, run_dir.name)
    path = Path(folder.resolve(recorded, study_name=study_name, what=f"checkpoint_path of {trial} in {LEADERBOARD}"))
    if not has_model(path):
        raise ResultsFolderError(
            f"the checkpoint folder {recorded!r} of {trial} is not in the results folder {str(run_dir)!r} (no model "
            f"in {str(path)!r}): was the run moved or copied without its trial_* folders? Copy the whole results "
            "folder, including trial_*/checkpoint_*, or pick a trial whose checkpoint is there with --trial"
        )
    absolute = is_uri(recorded) or Path(recorded).is_absolute()
    return path, absolute and str(path) != recorded


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """A ranked trial whose checkpoint loaded."""

    row: object  # its leaderboard row (a pandas Series)
    trial: ChosenTrial
    model: object
    class_names: list[str]
    size: int


def load_trial_model(trial: ChosenTrial, run_dir: Path, study: dict):
    """``(model, class_names, image_size)`` for the chosen trial's checkpoint.

    The model is the whole classifier, also for a trial that trained on cached
    features and saved its frozen part and its top apart (``trainables.checkpoint``).
    For a cross-validated study (``cv_folds``) it is the trial's fold ensemble: one
    model whose output is the mean of its k fold models' probabilities.
    """
    from trainables.checkpoint import load_classifier

    try:
        model = load_classifier(trial.checkpoint)
    except Exception as exc:  # a truncated or foreign file raises many types
        raise ResultsFolderError(f"cannot load the model in {str(trial.checkpoint)!r}: {type(exc).__name__}: {exc}") from None
    class_names = read_class_names(trial.checkpoint, run_dir, study)
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise ResultsFolderError(f"the model of {trial.name} outputs {outputs} probabilities but the study has "
                                 f"{len(class_names)} classes {class_names}; is {str(run_dir)!r} the run it came from?")
    size = model.input_shape[1] or study.get("dataset", {}).get("image_size")
    return model, class_names, int(size)


def read_class_names(checkpoint: Path, run_dir: Path, study: dict) -> list[str]:
    """Class order the model was trained with: ``trial.json`` saved beside it, else ``splits.parquet``.

    ``study.json`` holds ``dataset.classes`` only when the study file gave them,
    so it is the last resort.
    """
    try:
        names = json.loads((Path(checkpoint) / "trial.json").read_text()).get("class_names")
        if names:
            return [str(n) for n in names]
    except (OSError, ValueError):
        pass
    splits = Path(run_dir) / SPLITS
    if splits.is_file():
        import pandas as pd

        pairs = pd.read_parquet(splits, columns=["label", "label_index"]).drop_duplicates().sort_values("label_index")
        if pairs["label_index"].tolist() == list(range(len(pairs))):
            return pairs["label"].astype(str).tolist()
    classes = study.get("dataset", {}).get("classes")
    if classes:
        return [str(c) for c in classes]
    raise ResultsFolderError(f"cannot tell the class names: {str(Path(checkpoint) / 'trial.json')!r} and "
                             f"{str(splits)!r} are missing or unreadable")


def _names(rows) -> str:
    names = rows["trial_name"].dropna().tolist()
    return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "") if names else "none"


def _error_note(row) -> str:
    error = row.get("error")
    return f": {error}" if isinstance(error, str) and error else ""


def _missing(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))
