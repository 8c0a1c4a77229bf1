"""``ProgressPrinter``: one readable line per trial event, plus a periodic status line."""

from __future__ import annotations

import sys
import time

from ray import tune

from search.results import trial_error_line, trial_status
from trainables.metrics import is_better

_STATUS_EVERY_S = 20.0


class ProgressPrinter(tune.Callback):
    def __init__(self, *, metric: str, mode: str, max_epochs: int):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.started = time.monotonic()
        self.counts = {"running": 0, "finished": 0, "stopped": 0, "diverged": 0, "errored": 0}
        self.best: tuple[float, str] | None = None
        self.last_epoch: dict[str, int] = {}
        self.started_ids: set[str] = set()  # running now; a trial lost before it started never was
        self._last_status = 0.0

    def _say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        # sys.stdout is looked up each time: Ray pickles callbacks, and a stream cannot be pickled.
        print(f"[{elapsed:6.0f}s] {text}", file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.counts["running"] += trial.trial_id not in self.started_ids
        self.started_ids.add(trial.trial_id)
        self._say(f"start    {trial}  {_short_config(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        self.last_epoch[trial.trial_id] = int(result.get("epoch", result.get("training_iteration", 0)))
        if isinstance(value, (int, float)) and is_better(value, self.best and self.best[0], self.mode):
            self.best = (value, str(trial))
        if time.monotonic() - self._last_status > _STATUS_EVERY_S:
            self._status()

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = self.last_epoch.get(trial.trial_id, 0)
        outcome = trial_status(epoch, self.max_epochs, diverged=bool((trial.last_result or {}).get("diverged")))
        self._end(trial, outcome, f"after epoch {epoch}/{self.max_epochs}" + (" by ASHA" if outcome == "stopped" else ""))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed attempt that Ray retries (``Study.max_failures``): from its last checkpoint, maybe elsewhere."""
        self._stop_running(trial)
        self._say(f"retry    {trial}  attempt {trial.num_failures} failed: {trial_error_line(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        before = "" if trial.trial_id in self.last_epoch else " before its first report"
        self._end(trial, "errored", f"{trial_error_line(trial)}{before}" + (f" (see {trial.error_file})" if trial.error_file else ""))

    def _stop_running(self, trial) -> None:
        if trial.trial_id in self.started_ids:
            self.started_ids.discard(trial.trial_id)
            self.counts["running"] -= 1

    def _end(self, trial, outcome: str, detail: str) -> None:
        self._stop_running(trial)
        self.counts[outcome] += 1
        score = trial.last_result.get(self.metric) if trial.last_result else None
        shown = f"  {self.metric}={score:.4f}" if isinstance(score, (int, float)) else ""
        self._say(f"{outcome:8} {trial}  {detail}{shown}")
        self._status()

    def _status(self) -> None:
        self._last_status = time.monotonic()
        counts = " | ".join(f"{k} {v}" for k, v in self.counts.items())
        best = f" | best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        self._say(f"status   {counts}{best}")


def _short_config(config: dict) -> str:
    parts = []
    for key, value in config.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)
