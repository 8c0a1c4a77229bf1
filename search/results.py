"""``LeaderboardWriter``: the driver-side callback that owns the Parquet leaderboards.

Only this callback writes ``leaderboard.parquet`` and ``epochs.parquet``;
trials only report. Each write goes to a temporary file and is renamed into
place, so a reader never sees half a file and a driver crash loses nothing
that was written.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
from ray import tune

from search.ranking import rank
from search.storage import StudyFolder
from trainables.hparams import DEFAULTS, PLACEMENT, effective_hparams

_WRITE_EVERY_S = 5.0  # throttle for per-epoch rewrites; trial ends always write

# interrupted: still running when the run ended (Ctrl+C, the study's time limit); --resume continues it.
STATUSES = ("running", "finished", "stopped", "diverged", "errored", "interrupted")
# Trials that ended for good: a resume keeps them as recorded (errored ones Ray retries: resume_errored).
KEPT_ON_RESUME = ("finished", "stopped", "diverged")
CHECKPOINT_FOLDER = re.compile(r"^checkpoint_(\d+)$")  # Ray's name for a trial's checkpoint folder


def tidy_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Give object columns one Parquet-friendly dtype: bool, number or string."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype != object:
            continue
        values = frame[col].dropna()
        if len(values) and all(isinstance(v, bool) for v in values):
            frame[col] = frame[col].astype("boolean")
        elif len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            frame[col] = pd.to_numeric(frame[col])
        else:
            frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)).astype("string")
    return frame


def trial_status(epochs_run: int, max_epochs: int, error: str | None = None, diverged: bool = False) -> str:
    """``errored``, ``diverged`` (NaN or inf loss), ``finished`` (ran every epoch) or ``stopped`` (by ASHA)."""
    if error is not None:
        return "errored"
    if diverged:
        return "diverged"
    return "finished" if epochs_run >= max_epochs else "stopped"


def first_error_line(text: str | None) -> str:
    """The exception line of a Ray error trace, e.g. ``ValueError: bad dropout``."""
    if not text:
        return "unknown error"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line):
            return line[:500]
    return lines[-1][:500] if lines else "unknown error"


def trial_error_line(trial) -> str:
    """The first line of the error a Ray trial last failed with."""
    path = trial.error_file
    return first_error_line(Path(path).read_text(errors="replace") if path and os.path.exists(path) else None)


class LeaderboardWriter(tune.Callback):
    """Keeps one row per trial and one row per trial epoch, on disk, as the study runs."""

    def __init__(self, folder: StudyFolder, *, metric: str, mode: str, max_epochs: int,
                 random_init: tuple[str, ...] = ()):
        self.folder = folder
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.random_init = random_init  # --smoke: backbones trained without their unavailable ImageNet weights
        self.trials: dict[str, dict] = {}
        self.epochs: list[dict] = []
        self._carried: dict[str, int] = {}  # trial id -> failed attempts of the lost twin its row replaced
        self._last_write = 0.0
        self._load_existing()

    # Resuming reads back what an earlier driver wrote, so nothing is lost.
    def _load_existing(self) -> None:
        if self.folder.exists("epochs.parquet"):
            self.epochs = self.folder.read_parquet("epochs.parquet").to_dict("records")
        if self.folder.exists("leaderboard.parquet"):
            for row in self.folder.read_parquet("leaderboard.parquet").to_dict("records"):
                self.trials[row["trial_id"]] = {"row": row, "config": {}}

    def ended_epochs(self) -> dict[str, list[dict]]:
        """``trial_id -> its recorded epochs`` (oldest first) of every trial that ended for good
        (``KEPT_ON_RESUME``): what a resume keeps instead of training it again (``search.tuner.StudyScheduler``)."""
        ended = {tid for tid, entry in self.trials.items() if entry["row"].get("status") in KEPT_ON_RESUME}
        epochs = {tid: [] for tid in ended}
        for epoch in sorted((e for e in self.epochs if e["trial_id"] in ended), key=lambda e: e.get("epoch", 0)):
            epochs[epoch["trial_id"]].append(epoch)
        return epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        self._drop_lost_twin(trial)
        entry = self.trials.setdefault(trial.trial_id, {"row": {}, "config": {}})
        entry["config"] = self._config(trial)
        checkpoint = self._restart(trial)
        entry["row"].update(status="running", trial_name=str(trial), ended_at=None, error=None,
                            checkpoint_path=checkpoint)
        entry["row"].setdefault("started_at", _now())  # a resumed trial keeps its first start
        self._write(force=True)

    def _restart(self, trial) -> str | None:
        """Make the trial's record the training this start continues: its epochs up to its checkpoint.

        A trial starts from its last checkpoint that Ray knows of (none: from scratch), after a resume
        or a failed attempt. The epochs recorded after that checkpoint belong to the attempt it replaces,
        and so do checkpoint folders Ray wrote for that attempt but no longer knows of (a driver killed
        between a checkpoint and Ray's state save): Ray would write this attempt's checkpoints into
        those same folders, over files of the other training. Both go, so the row's epochs, best
        epoch and checkpoint all come from one training. Returns the checkpoint it continues from,
        relative to the results folder (None: from scratch).
        """
        result = getattr(trial, "latest_checkpoint_result", None)
        resumes_at = int((result.metrics or {}).get("epoch", 0)) if result is not None else 0
        self.epochs = [e for e in self.epochs if e["trial_id"] != trial.trial_id or e.get("epoch", 0) <= resumes_at]
        checkpoint = result.checkpoint if result is not None else None
        self._remove_stale_checkpoints(trial, checkpoint)
        return self.folder.relative(checkpoint.path) if checkpoint is not None else None

    @staticmethod
    def _remove_stale_checkpoints(trial, checkpoint) -> None:
        """Delete the trial's ``checkpoint_NNNNNN`` folders newer than ``checkpoint``, which Ray restarts it from."""
        storage = getattr(trial, "storage", None)
        if storage is None:  # a stub trial (tests) writes nowhere
            return
        newest = -1  # from scratch: every checkpoint folder is stale
        if checkpoint is not None:
            known = CHECKPOINT_FOLDER.match(posixpath.basename(checkpoint.path))
            if known is None:  # not named as Ray names them: nothing here can be told stale
                return
            newest = int(known.group(1))
        fs = storage.storage_filesystem
        for info in fs.get_file_info(pafs.FileSelector(storage.trial_fs_path, allow_not_found=True)):
            found = CHECKPOINT_FOLDER.match(info.base_name)
            if found and info.type == pafs.FileType.Directory and int(found.group(1)) > newest:
                fs.delete_dir(info.path)

    def _config(self, trial) -> dict:
        """The hyperparameters the trial really trains with, and ``adjusted``: how they differ from its config."""
        hp, notes = effective_hparams(trial.config, self.max_epochs, self.random_init)
        asked = {**DEFAULTS, **trial.config}
        # The config's keys, plus any default the adjustment changed (e.g. weights under --smoke).
        config = {k: v for k, v in hp.items() if k in trial.config or v != asked[k]}
        return {**config, "adjusted": "; ".join(notes) or None}

    def _drop_lost_twin(self, trial) -> None:
        """Forget the row of a trial a killed driver recorded whose trial the resumed search proposes again.

        Ray's experiment state is saved every few seconds; a trial started after
        the last save is unknown to the restored search, which proposes the same
        Optuna trial number again under a new trial id. Its old row would count twice,
        whatever its status: a trial that ended before its first checkpoint (one that
        diverged at once) can have started and ended between two saves. The new
        trial trains it again, so its row replaces the old one.
        """
        number = trial.config.get("trial_number")
        if number is None:  # not proposed by the study's searcher: it has no twin
            return
        lost = [tid for tid, entry in self.trials.items()
                if tid != trial.trial_id
                and entry["row"].get("trial_number", entry["config"].get("trial_number")) == number]
        # The replaced row's failed attempts still happened: the new row counts them (its ``failures``).
        carried = max((_count(self.trials[tid]["row"].get("failures")) for tid in lost), default=0)
        if carried:
            self._carried[trial.trial_id] = carried
        for tid in lost:
            del self.trials[tid]
        self.epochs = [e for e in self.epochs if e["trial_id"] not in lost]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = {"trial_id": trial.trial_id, "trial_number": trial.config.get("trial_number")}
        epoch.update({k: v for k, v in result.items() if _is_metric(k, v)})
        # A resumed trial re-reports epochs it had already run; keep the newest.
        self.epochs = [e for e in self.epochs if (e["trial_id"], e.get("epoch")) != (trial.trial_id, epoch.get("epoch"))]
        self.epochs.append(epoch)
        # Where it ran: the latest attempt's node, after a retry on another node.
        entry = self.trials.setdefault(trial.trial_id, {"row": {}, "config": self._config(trial)})
        entry["row"].update({k: result[k] for k in PLACEMENT if k in result})
        self._write()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=trial_error_line(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        # A failed attempt Ray retries: recorded now, so a driver killed before the trial ends does not lose it.
        entry = self.trials.setdefault(trial.trial_id, {"row": {}, "config": self._config(trial)})
        entry["row"]["failures"] = max(_count(entry["row"].get("failures")), int(trial.num_failures),
                                       self._carried.get(trial.trial_id, 0) + 1)
        self._write(force=True)

    def on_experiment_end(self, trials, **info):
        # Ray stops the trials still running without a callback (and its ResultGrid then calls them TERMINATED).
        for entry in self.trials.values():
            if entry["row"].get("status") == "running":
                entry["row"].update(status="interrupted", ended_at=_now())
        self._write(force=True)

    def _finish(self, trial, *, error: str | None) -> None:
        entry = self.trials.setdefault(trial.trial_id, {"row": {}, "config": self._config(trial)})
        epochs_run = max((e.get("epoch", 0) for e in self.epochs if e["trial_id"] == trial.trial_id), default=0)
        diverged = any(e.get("diverged") for e in self.epochs if e["trial_id"] == trial.trial_id)
        status = trial_status(epochs_run, self.max_epochs, error, diverged)
        checkpoint = trial.checkpoint
        entry["row"].update(
            status=status,
            error=error,
            trial_name=str(trial),
            # Relative to the results folder, so a moved or copied folder reads its own checkpoints.
            checkpoint_path=self.folder.relative(checkpoint.path) if checkpoint is not None else None,
            # attempts that raised or lost their node before this end, a replaced lost twin's included
            failures=max(int(trial.num_failures) + self._carried.get(trial.trial_id, 0),
                         _count(entry["row"].get("failures"))),
            ended_at=_now(),
        )
        self._write(force=True)

    def leaderboard(self) -> pd.DataFrame:
        """One row per trial, best first."""
        epochs = pd.DataFrame(self.epochs)
        rows = []
        for trial_id, entry in self.trials.items():
            row = {"trial_id": trial_id, **entry["row"]}
            row.update({k: v for k, v in entry["config"].items() if k not in row})
            if not epochs.empty:
                row.update(_summarise(epochs[epochs["trial_id"] == trial_id], self.metric, self.mode))
            rows.append(row)
        board = pd.DataFrame(rows)
        best = f"best_{self.metric}"
        if best in board.columns:
            board = rank(board, best, self.mode)  # the order every tool takes "the best trial" from
        return tidy_dtypes(board.reset_index(drop=True))

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < _WRITE_EVERY_S:
            return
        self._last_write = now
        self.folder.write_parquet("epochs.parquet", tidy_dtypes(pd.DataFrame(self.epochs)))
        self.folder.write_parquet("leaderboard.parquet", self.leaderboard())


def _now() -> pd.Timestamp:
    """When the driver saw a trial start or end: with the trials' own timings, this shows Ray's overhead."""
    return pd.Timestamp.now(tz="UTC")


_TIMINGS = ("setup_s", "epoch_s", "checkpoint_s", "diverged")  # reported every epoch by trainables.train.ReportEpoch


def _is_metric(key: str, value) -> bool:
    wanted = key.startswith(("val_", "train_")) or key in (
        "epoch", "elapsed_s", "trainable_params", "total_params", *_TIMINGS)
    return wanted and isinstance(value, (int, float)) and not isinstance(value, bool)


def _summarise(epochs: pd.DataFrame, metric: str, mode: str) -> dict:
    """Every metric at the best epoch and the last, epochs run, wall time, parameters."""
    if epochs.empty:
        return {}
    epochs = epochs.sort_values("epoch")
    last = epochs.iloc[-1]
    out = {"epochs": int(last["epoch"]), "wall_time_s": float(last.get("elapsed_s", math.nan))}
    for col in ("trainable_params", "total_params"):
        if col in epochs:
            out[col] = int(epochs[col].max())
    if "epoch_s" in epochs:  # a trial's time: set-up once, then epochs and checkpoint saves
        out.update(setup_s=float(epochs["setup_s"].iloc[0]), train_s=float(epochs["epoch_s"].sum()),
                   checkpoint_s=float(epochs["checkpoint_s"].sum()))
    scores = epochs[metric] if metric in epochs else None
    best_row = None
    if scores is not None and scores.notna().any():
        best_row = epochs.loc[scores.idxmax() if mode == "max" else scores.idxmin()]
        out["best_epoch"] = int(best_row["epoch"])
    # "best_" values are all taken at the best epoch, the one the checkpoint holds.
    for col in epochs.columns:
        if col.startswith("val_") or col == "train_loss":
            out[f"best_{col}"] = float(best_row[col]) if best_row is not None else math.nan
            out[f"last_{col}"] = float(last[col])
    return out


def _count(value) -> int:
    """A count as a row holds it: None, or NaN as read back from leaderboard.parquet, is 0."""
    return 0 if value is None or value != value else int(value)
