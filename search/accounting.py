"""``TrialAccountant``: every trial the searcher proposed ends in the leaderboard, and no slot is lost.

Ray Tune 2.60 can end a trial without a word: when it reuses an actor whose
reset fails (``Trainable runner reuse requires reset_config() ...``), it marks
the next trial ERROR but calls neither the callbacks' ``on_trial_error`` nor
the searcher's ``on_trial_complete``. The trial then never reaches the
leaderboard, and its ``ConcurrencyLimiter`` slot stays taken for good: one such
loss halves a two-slot study, two stall it.

This callback looks at the trials after every step of Tune's loop, tells the
other callbacks and the searcher about any trial that ended unannounced, and
keeps a watchdog that says when nothing has run for a long while.
"""

from __future__ import annotations

import os
import sys
import time

from ray import tune
from ray.tune.experiment import Trial

__all__ = ["TrialAccountant", "STALL_WARNING_S"]

# Nothing running for this long, with trials still to run, earns a watchdog line (and again as long as it lasts).
STALL_WARNING_S = float(os.environ.get("MEDSEARCH_STALL_WARNING_S", 300))

_ENDED = (Trial.ERROR, Trial.TERMINATED)


class TrialAccountant(tune.Callback):
    """Announces trials that Ray ended silently to ``callbacks`` and frees their ``searcher`` slot.

    ``searcher`` is the study's ``ConcurrencyLimiter``; ``num_samples`` the
    trials the study will run, for the watchdog.
    """

    def __init__(self, searcher, callbacks: list, *, num_samples: int | None, stall_warning_s: float = STALL_WARNING_S):
        self.searcher, self.callbacks, self.num_samples = searcher, callbacks, num_samples
        self.stall_warning_s = stall_warning_s
        self.announced: set[str] = set()  # trials whose end the callbacks heard of
        self.lost: list[str] = []  # names of trials this callback had to announce
        self._baseline_taken = False
        self._last_running = time.monotonic()
        self._last_warning = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.announced.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.announced.add(trial.trial_id)

    def on_step_begin(self, iteration, trials, **info):
        if not self._baseline_taken:  # a resumed run: trials that ended before it were announced then
            self.announced.update(t.trial_id for t in trials if t.status in _ENDED)
            self._baseline_taken = True

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:
            if trial.status in _ENDED and trial.trial_id not in self.announced:
                self._announce(iteration, trials, trial)
        self._free_orphaned_slots(trials)
        self._watch(trials)

    def _announce(self, iteration, trials, trial) -> None:
        """What Ray does for a trial that ends normally (``TuneController._process_trial_failure``, ``stop_trial``)."""
        self.announced.add(trial.trial_id)
        self.lost.append(str(trial))
        for callback in self.callbacks:
            event = callback.on_trial_error if trial.status == Trial.ERROR else callback.on_trial_complete
            event(iteration=iteration, trials=trials, trial=trial)

    def _free_orphaned_slots(self, trials) -> None:
        """A slot held by a trial that is over, or that Tune does not know, is given back to the searcher.

        Ray tells the searcher before it marks a trial ended, and adds a trial in the
        step that proposed it, so at a step's end such a slot can never be freed otherwise.
        The searcher records the trial as failed: it has no result to learn from.
        """
        held = getattr(self.searcher, "live_trials", None)
        if not held:
            return
        status = {t.trial_id: t.status for t in trials}
        for trial_id in list(held):
            if status.get(trial_id, Trial.ERROR) in _ENDED:
                self.searcher.on_trial_complete(trial_id, error=True)

    def _watch(self, trials) -> None:
        now = time.monotonic()
        if any(t.status == Trial.RUNNING for t in trials):
            self._last_running = now
            return
        unproposed = 1 if self.num_samples is None else max(0, self.num_samples - len(trials))  # None: until the time limit
        to_run = unproposed + sum(t.status in (Trial.PENDING, Trial.PAUSED) for t in trials)
        idle = now - self._last_running
        if not to_run or idle < self.stall_warning_s or now - self._last_warning < self.stall_warning_s:
            return
        self._last_warning = now
        counts = {s: sum(t.status == s for t in trials) for s in (Trial.PENDING, Trial.PAUSED, Trial.ERROR, Trial.TERMINATED)}
        held = sorted(getattr(self.searcher, "live_trials", ()))
        print(f"watchdog: no trial has run for {idle:.0f} s with {to_run} trial(s) still to run; "
              f"trials by status {counts}; searcher slots held by {held or 'none'}. "
              "Pending trials wait for free CPUs/GPUs (check `ray status`); press Ctrl+C to stop, "
              "then resume with the printed command.", file=sys.stdout, flush=True)
