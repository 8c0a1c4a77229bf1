"""``load_results(folder)``: a finished or partial results folder as one object.

What ``search.run_study`` returns, and what a notebook opens later:

    results = load_results("runs/quickstart")
    results.leaderboard        # pandas DataFrame, best first
    results.best_trial         # name, config, metrics, checkpoint of the best trial
    results.final_model        # the model the study ships (analysis.final_model.FinalModel)
    results.predict(["img.jpg"])   # its calibrated probabilities and decisions
    model = results.load_model()   # the same model as one Keras graph

"The best trial" is ``analysis.reader``'s rule, which ``search.predict``,
``analysis.evaluate``, ``analysis.export`` and the report use too: the best
``best_<metric>`` among trials with a checkpoint, ties to the lower validation
loss at the best epoch, then the leaderboard's order. Unlike Ray's ``ExperimentAnalysis.get_best_trial``, whose
``scope`` picks a trial's last or best reported value and which ignores whether a
checkpoint exists, it only picks a trial whose best epoch was checkpointed, and
it breaks ties the same way every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd

from analysis.files import FINAL_MODEL
from analysis.final_model import FinalModel, Prediction, load_final_model
from analysis.reader import choose_trial, read_record, read_study, read_table
from analysis.tables import hyperparameter_columns
from trainables.hparams import HPARAM_NAMES

__all__ = ["Results", "TrialRecord", "load_results"]


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial of a results folder: what it tried and what it scored at its best epoch."""

    name: str
    # The hyperparameters it trained with, with their own types (``unfreeze`` 40 or "all", ``head_units`` 128):
    # what ``Study(fixed=...)`` takes, so ``Study(..., fixed=results.best_trial.config)`` trains it again.
    config: dict
    metrics: dict  # best_* and last_* values, epochs, status
    checkpoint: Path | None  # its checkpoint folder, inside the results folder


@dataclasses.dataclass
class Results:
    """A results folder written by ``search.run``: complete, or partial (``outcome`` says which)."""

    path: Path
    record: dict  # study.json
    leaderboard: pd.DataFrame
    _final: tuple | None = dataclasses.field(default=None, repr=False)  # (final_model.json's mtime, its model)

    @property
    def study(self) -> dict:
        return self.record.get("study", {})

    @property
    def outcome(self) -> str:
        """``completed``, ``interrupted``, ``failed``, or ``running`` while no run has ended it."""
        return self.record.get("outcome", "running")

    @property
    def epochs(self) -> pd.DataFrame:
        path = self.path / "epochs.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    @property
    def best_trial(self) -> TrialRecord:
        return self.trial(None)

    def trial(self, name: str | None) -> TrialRecord:
        """Trial ``name`` (its ``trial_name``), or the best one with a checkpoint."""
        chosen = choose_trial(self.path, self.study, name)
        row = self.leaderboard[self.leaderboard["trial_name"] == chosen.name].iloc[0]
        return TrialRecord(name=chosen.name, config=_config(row, self.leaderboard, self._recorded(chosen.checkpoint)),
                           metrics=_metrics(row), checkpoint=chosen.checkpoint)

    def _recorded(self, checkpoint: Path | None) -> dict:
        """The hyperparameters ``trial.json`` beside the checkpoint holds (``trainables.train`` writes it as JSON,
        so 40 stays an int and "all" a string); empty when there is none or it is unreadable.

        ``checkpoint`` is inside the folder: ``analysis.reader`` found it there, and refuses one with a link out.
        """
        if checkpoint is None:
            return {}
        try:
            hparams = json.loads((Path(checkpoint) / "trial.json").read_text()).get("hparams")
        except (OSError, ValueError, AttributeError):
            return {}
        return hparams if isinstance(hparams, dict) else {}

    @property
    def final_model(self) -> FinalModel:
        """The model the study ships: ``final_model.json`` (fitted on validation by ``analysis.evaluate``), else
        the best trial, uncalibrated (``FinalModel.provenance`` says which)."""
        record = self.path / FINAL_MODEL  # analysis.evaluate may have written a new one since
        stamp = record.stat().st_mtime_ns if record.is_file() else None
        if self._final is None or self._final[0] != stamp:
            self._final = (stamp, load_final_model(self.path))
        return self._final[1]

    @property
    def expected_score(self) -> dict | None:
        """What the final model should score on new images like the validation images, corrected for having been
        chosen on them (``analysis.honest``: ``estimate``, ``ci``, ``validation``, ``metric``); None before
        ``analysis.evaluate`` has fitted a final model."""
        record = self.path / FINAL_MODEL
        return json.loads(record.read_text()).get("selection_corrected") if record.is_file() else None

    def predict(self, paths, batch_size: int = 64) -> Prediction:
        """The final model on image files: calibrated ``probabilities`` (N, classes), ``decisions`` (class indices
        under the shipped decision rule) and ``labels``, exactly what ``search.predict`` writes; and its
        out-of-distribution check (``analysis.ood``): ``ood`` (N,) and ``warnings``, the reasons in words, ""
        for none (both None, with a printed note, when the study's reference cannot be fitted here)."""
        from analysis.ood import OODError, check_study

        paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        prediction = self.final_model.predict_paths(paths, batch_size)
        try:
            checks = check_study(self.path, paths)
        except OODError as exc:
            print(f"note: no out-of-distribution check: {exc}")
            return prediction
        return dataclasses.replace(prediction, ood=checks["ood"].to_numpy(dtype=bool),
                                   warnings=tuple(checks["warning"].astype(str)))

    def load_model(self, trial: str | None = None):
        """The final model (or trial ``trial`` alone, with what was fitted for it) as one Keras model: raw RGB
        in [0, 255] -> probabilities, calibrated where a temperature was fitted, ensemble and views inside."""
        return (self.final_model if trial is None else load_final_model(self.path, trial=trial)).keras_model()


def load_results(folder: str | Path) -> Results:
    """The results folder ``folder`` (``STORAGE/<study name>``), finished or not."""
    path = Path(folder).expanduser().resolve()
    read_study(path)  # names what is missing or broken
    return Results(path=path, record=read_record(path), leaderboard=read_table(path / "leaderboard.parquet"))


def _config(row: pd.Series, board: pd.DataFrame, recorded: dict) -> dict:
    """A trial's hyperparameters: the ones its leaderboard row records, with the values it trained with.

    The names are those the row sets (what the trial's config set, searched or fixed, and any default
    the trial had adjusted), hyperparameters only: Ray's ``OptunaSearch`` also puts Optuna's parameter
    names (``cnn_learning_rate``, ``dropout_s2``) into a trial's config, and the leaderboard keeps them,
    but a study's ``fixed`` takes hyperparameters. The values come from ``recorded`` (the checkpoint's
    ``trial.json``): a Parquet column has one type, so a column that mixes 40 and "all" reads back
    '40', and an int column with a missing value reads back 128.0. Without a record, the row's value
    is mended for the whole-number hyperparameters.
    """
    names = [k for k in hyperparameter_columns(board) if k in HPARAM_NAMES and not _missing(row[k])]
    return {k: recorded[k] if k in recorded else _whole(k, _plain(row[k])) for k in names}


_WHOLE = ("unfreeze", "head_units", "warmup_epochs", "batch_size")  # counts (unfreeze: or "all")


def _whole(name: str, value):
    """``value`` of hyperparameter ``name`` as the int it was, where the leaderboard's column changed its type."""
    if name not in _WHOLE or isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _metrics(row: pd.Series) -> dict:
    keep = ("status", "epochs", "best_epoch", "wall_time_s")
    return {k: _plain(v) for k, v in row.items()
            if (k in keep or k.startswith(("best_", "last_"))) and not _missing(v)}


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    return value.item() if hasattr(value, "item") else value
