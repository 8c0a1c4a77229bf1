"""``ProgressPrinter``: one readable line per trial event, plus a periodic status line.

Plain lines only, each whole and flushed, so a Ray job log, ``tail -f`` and a
terminal all read the same::

    [    12s] finished trial_000_cnn_s3  after epoch 6/6  best val_balanced_accuracy=0.5750 (epoch 4), last 0.5417
    [    12s] status   3/12 trials done (finished 1 | stopped 2 | diverged 0 | errored 0) | running 2 | elapsed 12s
                       | ETA ~35s | best val_balanced_accuracy=0.5750 (trial_000_cnn_s3, epoch 4)      (one line)

``next_steps`` is what to run once the study has ended.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shlex
import sys
import time

from ray import tune
from ray.tune.experiment import Trial

from search.results import trial_error_line, trial_status
from trainables.metrics import is_better

_STATUS_EVERY_S = 20.0
# Trials whose epochs take at least this long (s) get an ``epoch`` line per epoch: minutes pass between their other lines.
SLOW_EPOCH_S = 60.0

_OUTCOMES = ("finished", "stopped", "diverged", "errored")
_ENDED = (Trial.TERMINATED, Trial.ERROR)


class ProgressPrinter(tune.Callback):
    """Prints trial starts, ends, retries, slow trials' epochs and a status line with done/total and an ETA.

    ``num_samples``: the study's trials; ``time_limit_s``: its time limit (caps the ETA);
    ``max_concurrent``: trials at once (for the ETA); ``clock``: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, *, metric: str, mode: str, max_epochs: int, num_samples: int | None = None,
                 time_limit_s: float | None = None, max_concurrent: int = 1, clock=time.monotonic):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.num_samples, self.time_limit_s, self.max_concurrent = num_samples, time_limit_s, max(1, max_concurrent)
        self.clock = clock
        self.started = clock()
        self.outcomes: dict[str, str] = {}  # trial_id -> how it ended, each trial once (Ray's and the accountant's news)
        self.earlier: set[str] = set()  # trials that ended before this run (a resume): done, but not timed here
        self.durations: dict[str, float] = {}  # trial_id -> wall time, first start to end, as this printer saw it
        self.start_times: dict[str, float] = {}
        self.started_ids: set[str] = set()  # running now; a trial lost before it started never was
        self.last_epoch: dict[str, int] = {}
        self.trial_best: dict[str, tuple[float, int | None, float]] = {}  # trial_id -> (score, epoch, val_loss)
        self.best: tuple[float, float, str, int | None] | None = None  # (score, val_loss, trial, epoch)
        self.slow: set[str] = set()  # trials with an epoch of SLOW_EPOCH_S or more
        self._baseline_taken = False
        self._last_status = -math.inf

    # --- Ray Tune's events -------------------------------------------------------------------------------------

    def on_step_begin(self, iteration, trials, **info):
        self._baseline(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._baseline(trials, trial)
        self.started_ids.add(trial.trial_id)
        self.start_times.setdefault(trial.trial_id, self.clock())  # a retry keeps the first start
        self._say(f"start    {trial}  {_short_config(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._baseline(trials, trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        self.last_epoch[trial.trial_id] = epoch
        value = result.get(self.metric)
        if _is_number(value):
            loss = result.get("val_loss")
            loss = float(loss) if _is_number(loss) else math.inf
            mine = self.trial_best.get(trial.trial_id)
            if is_better(value, mine and mine[0], self.mode):  # the first epoch at the best: the checkpoint's
                self.trial_best[trial.trial_id] = (float(value), epoch, loss)
                self._offer_best(float(value), loss, str(trial), epoch)
        seconds = result.get("epoch_s", result.get("time_this_iter_s"))  # epoch_s leaves out the set-up before epoch 1
        if _is_number(seconds) and seconds >= SLOW_EPOCH_S:
            self.slow.add(trial.trial_id)
        if trial.trial_id in self.slow:
            best = self._best_of(trial)
            shown = f"  {self.metric}={_score(value)}" + (f" (best {_score(best[0])})" if best else "")
            per_epoch = f"  {seconds:.0f}s/epoch" if _is_number(seconds) else ""
            self._say(f"epoch    {trial}  {epoch}/{self.max_epochs}{shown}{per_epoch}")
        if self.clock() - self._last_status > _STATUS_EVERY_S:
            self._status()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._baseline(trials, trial)
        epoch = self._epochs_of(trial)
        outcome = trial_status(epoch, self.max_epochs, diverged=bool((trial.last_result or {}).get("diverged")))
        self._end(trial, outcome, f"after epoch {epoch}/{self.max_epochs}" + (" by ASHA" if outcome == "stopped" else ""))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed attempt that Ray retries (``Study.max_failures``): from its last checkpoint, maybe elsewhere."""
        self._baseline(trials, trial)
        self.started_ids.discard(trial.trial_id)
        self._say(f"retry    {trial}  attempt {trial.num_failures} failed: {trial_error_line(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._baseline(trials, trial)
        before = "" if self._epochs_of(trial) else " before its first report"
        self._end(trial, "errored", f"{trial_error_line(trial)}{before}" + (f" (see {trial.error_file})" if trial.error_file else ""))

    # --- bookkeeping -------------------------------------------------------------------------------------------

    def _baseline(self, trials, current=None) -> None:
        """Once, at the first event: trials that ended before this run (a resume) count as done."""
        if self._baseline_taken:
            return
        self._baseline_taken = True
        for trial in trials or ():
            if trial is current or trial.status not in _ENDED or trial.trial_id in self.outcomes:
                continue
            diverged = bool((trial.last_result or {}).get("diverged"))
            self.outcomes[trial.trial_id] = "errored" if trial.status == Trial.ERROR else \
                trial_status(self._epochs_of(trial), self.max_epochs, diverged=diverged)
            self.earlier.add(trial.trial_id)
            self._offer_trial_best(trial)
        if self.earlier:
            self._say(f"resumed  {len(self.earlier)} trial(s) ended in the earlier run(s) and count as done")
            self._status()

    def _end(self, trial, outcome: str, detail: str) -> None:
        now = self.clock()
        self.started_ids.discard(trial.trial_id)
        if trial.trial_id in self.start_times and trial.trial_id not in self.outcomes:
            self.durations[trial.trial_id] = now - self.start_times[trial.trial_id]
        self.outcomes[trial.trial_id] = outcome  # a second word on one trial replaces the first: counts stay exact
        self._offer_trial_best(trial)  # a resumed trial's best may date from before the resume
        self._say(f"{outcome:8} {trial}  {detail}{self._scores(trial)}")
        self._status()

    def _offer_best(self, value: float, loss: float, name: str, epoch: int | None) -> None:
        """The study's best so far: the leaderboard's rule (``search.ranking``), ties to the lower val_loss."""
        if self.best is None or is_better(value, self.best[0], self.mode) or (value == self.best[0] and loss < self.best[1]):
            self.best = (value, loss, name, epoch)

    def _offer_trial_best(self, trial) -> None:
        best = self._best_of(trial)
        if best and best[1] is None:  # known from Ray's summary only: no epoch, no val_loss to break a tie with
            self._offer_best(best[0], math.inf, str(trial), None)

    def _best_of(self, trial) -> tuple[float, int | None] | None:
        """A trial's best score and its epoch; epochs reported before a resume are known only by Ray's summary (no epoch)."""
        mine = self.trial_best.get(trial.trial_id)
        summary = (getattr(trial, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
        if _is_number(summary) and not math.isnan(summary) and is_better(summary, mine and mine[0], self.mode):
            return float(summary), None
        return (mine[0], mine[1]) if mine else None

    def _epochs_of(self, trial) -> int:
        if trial.trial_id in self.last_epoch:
            return self.last_epoch[trial.trial_id]
        result = trial.last_result or {}
        return int(result.get("epoch", result.get("training_iteration", 0)) or 0)

    def _scores(self, trial) -> str:
        """``  best <metric>=0.5750 (epoch 4), last 0.5417``; empty for a trial that reported nothing."""
        last = (trial.last_result or {}).get(self.metric)
        best = self._best_of(trial)
        if best is None and not _is_number(last):
            return ""
        if best is None:
            return f"  last {self.metric}={_score(last)}"
        at = f" (epoch {best[1]})" if best[1] is not None else ""
        return f"  best {self.metric}={_score(best[0])}{at}, last {_score(last)}"

    # --- what is printed ---------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        elapsed = self.clock() - self.started
        # sys.stdout is looked up each time: Ray pickles callbacks, and a stream cannot be pickled.
        print(f"[{elapsed:6.0f}s] {text}", file=sys.stdout, flush=True)

    def _status(self) -> None:
        self._last_status = self.clock()
        counts = {outcome: 0 for outcome in _OUTCOMES}
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        done = len(self.outcomes)
        total = f"/{self.num_samples}" if self.num_samples else ""
        breakdown = " | ".join(f"{k} {v}" for k, v in counts.items())
        parts = [f"{done}{total} trials done ({breakdown})", f"running {len(self.started_ids)}",
                 f"elapsed {_duration(self._last_status - self.started)}"]
        eta = self._eta()
        if eta:
            parts.append(eta)
        if self.best:
            value, _, name, epoch = self.best
            parts.append(f"best {self.metric}={_score(value)} ({name}" + (f", epoch {epoch})" if epoch is not None else ")"))
        self._say("status   " + " | ".join(parts))

    def _eta(self) -> str:
        if not self.num_samples:  # trials until the time limit: the time left is the ETA
            if not self.time_limit_s:
                return ""
            return f"time limit in {_duration(max(self.time_limit_s - (self.clock() - self.started), 0.0))}"
        left = self.num_samples - len(self.outcomes)
        if left <= 0:
            return ""
        now = self.clock()
        elapsed = now - self.started
        limit_left = max(self.time_limit_s - elapsed, 0.0) if self.time_limit_s else math.inf
        if not self.durations:
            return "ETA unknown" if limit_left == math.inf else f"ETA unknown (time limit in {_duration(limit_left)})"
        # ETA: mean wall time of ended trials x trials left / concurrency (running: the rest of that mean, past it their pace), capped by time_limit_s.
        mean = sum(self.durations.values()) / len(self.durations)
        running_left = [self._rest(t, mean, now) for t in self.started_ids]
        unstarted = max(left - len(running_left), 0)
        slots = max(1, min(self.max_concurrent, left))
        eta = max((unstarted * mean + sum(running_left)) / slots, max(running_left, default=0.0))
        if eta > limit_left:
            return f"ETA {_rough(limit_left)} (time limit)"
        return f"ETA {_rough(eta)}"


    def _rest(self, trial_id: str, mean: float, now: float) -> float:
        """A running trial's time left: the rest of the mean trial; once past it, its own pace over its epochs left."""
        age = now - self.start_times.get(trial_id, now)
        epochs = self.last_epoch.get(trial_id, 0)
        if age < mean or not epochs:
            return max(mean - age, 0.0)
        return age / epochs * max(self.max_epochs - epochs, 0)


def next_steps(folder) -> list[str]:
    """What to run once a study has ended: the report, for ``folder`` (a ``search.storage.StudyFolder``)."""
    if folder.is_local:
        where = shlex.quote(_shown_path(folder.path))
        return [f"next: python -m analysis.report {where}   (or: medsearch report {where})",
                f"      writes report.md and report.html there; add --evaluate to score the top 3 trials on the test split first"]
    uri, here = folder.uri(), shlex.quote(folder.name)
    copy = f"import pyarrow.fs as fs; fs.copy_files({json.dumps(uri)}, {json.dumps(folder.name)})"  # "...": one shell quote
    return [f"next: the report reads a local folder; copy {uri} here, then report on the copy:",
            f"  python -c {shlex.quote(copy)}",
            f"  python -m analysis.report {here}   (or: medsearch report {here})"]


def selection_note(folder, board, metric: str) -> str | None:
    """Why the leaderboard's top score flatters, and the command that corrects it (``analysis.honest``)."""
    column = f"best_{metric}"
    scored = int(board[column].notna().sum()) if column in board.columns else 0
    if scored < 2:
        return None
    where = shlex.quote(_shown_path(folder.path)) if folder.is_local else "FOLDER"
    return (f"note: the top {column} is the best of {scored} trials on the same validation images, so it flatters "
            f"the model.\n      python -m analysis.evaluate {where} --split val   estimates it corrected for that "
            "choice (bootstrap bias-corrected validation), without reading the test split")


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (``runs/quickstart``), else as is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith(os.pardir) else relative.replace(os.sep, posixpath.sep)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _score(value) -> str:
    return f"{value:.4f}" if _is_number(value) else "none"


def _duration(seconds: float) -> str:
    """``42s``, ``4m10s``, ``2h05m``."""
    seconds = int(round(max(seconds, 0)))  # rounded as the [  12s] prefix
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rough(seconds: float) -> str:
    """An estimate, as precise as it is: ``~40s``, ``~9m``, ``~1h20m``."""
    if seconds < 60:
        return f"~{max(int(round(seconds / 5) * 5), 5)}s"  # never ~0s while trials are left
    if seconds < 3600:
        return f"~{int(round(seconds / 60))}m"
    minutes = int(round(seconds / 60))
    return f"~{minutes // 60}h{minutes % 60:02d}m"


def _short_config(config: dict) -> str:
    parts = []
    for key, value in config.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)
