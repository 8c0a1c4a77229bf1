"""TrialAccountant on real Ray Tune trials and a real Optuna searcher behind a ConcurrencyLimiter."""

import optuna
import pytest
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search.accounting import TrialAccountant


class Recorder(tune.Callback):
    def __init__(self):
        self.events = []

    def on_trial_error(self, iteration, trials, trial, **info):
        self.events.append(("error", trial.trial_id))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.events.append(("complete", trial.trial_id))


def limiter(max_concurrent=2):
    searcher = OptunaSearch(space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric="m", mode="max",
                            sampler=optuna.samplers.RandomSampler(seed=0))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def proposed(searcher, n):
    trials = []
    for _ in range(n):
        trial = Trial("__fake", stub=True)
        assert searcher.suggest(trial.trial_id) is not None
        trials.append(trial)
    return trials


def test_a_trial_ended_without_a_word_is_announced_and_its_slot_freed():
    searcher = limiter()
    recorder = Recorder()
    accountant = TrialAccountant(searcher, [recorder], num_samples=4)
    a, b = proposed(searcher, 2)
    accountant.on_step_begin(0, [a, b])
    assert searcher.suggest("third") is None  # both slots taken
    a.set_status(Trial.RUNNING)
    b.set_status(Trial.ERROR)  # what a failed actor reset leaves: no callback, no searcher call
    accountant.on_step_end(1, [a, b])
    assert recorder.events == [("error", b.trial_id)]
    assert accountant.lost == [str(b)]
    assert searcher.suggest("third") is not None  # the slot is back
    accountant.on_step_end(2, [a, b])
    assert recorder.events == [("error", b.trial_id)]  # once only
    # Optuna was told the trial failed: it learns nothing from a trial without a result.
    states = [t.state for t in searcher.searcher._ot_study.trials]
    assert optuna.trial.TrialState.FAIL in states


def test_trials_ray_announced_are_left_alone():
    searcher = limiter()
    recorder = Recorder()
    accountant = TrialAccountant(searcher, [recorder], num_samples=2)
    (a,) = proposed(searcher, 1)
    accountant.on_step_begin(0, [a])
    searcher.on_trial_complete(a.trial_id, result={"m": 0.5})  # Ray tells the searcher, then the callbacks
    accountant.on_trial_complete(1, [a], a)
    a.set_status(Trial.TERMINATED)
    accountant.on_step_end(1, [a])
    assert recorder.events == [] and accountant.lost == []


def test_trials_that_ended_before_a_resume_are_not_announced_again():
    searcher = limiter()
    recorder = Recorder()
    accountant = TrialAccountant(searcher, [recorder], num_samples=3)
    old = Trial("__fake", stub=True)
    old.set_status(Trial.ERROR)
    accountant.on_step_begin(0, [old])
    accountant.on_step_end(0, [old])
    assert recorder.events == []


def test_the_watchdog_speaks_when_nothing_has_run_for_a_while(capsys):
    searcher = limiter()
    accountant = TrialAccountant(searcher, [], num_samples=3, stall_warning_s=0.0)
    (a,) = proposed(searcher, 1)
    accountant.on_step_begin(0, [a])  # pending, never running: e.g. no free CPUs
    accountant.on_step_end(0, [a])
    out = capsys.readouterr().out
    assert "watchdog: no trial has run" in out and "3 trial(s) still to run" in out


@pytest.mark.parametrize("status", [Trial.RUNNING])
def test_the_watchdog_is_quiet_while_a_trial_runs(capsys, status):
    searcher = limiter()
    accountant = TrialAccountant(searcher, [], num_samples=3, stall_warning_s=0.0)
    (a,) = proposed(searcher, 1)
    a.set_status(status)
    accountant.on_step_begin(0, [a])
    accountant.on_step_end(0, [a])
    assert "watchdog" not in capsys.readouterr().out
