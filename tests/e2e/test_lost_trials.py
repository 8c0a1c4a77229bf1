"""Every trial the searcher proposes is accounted for, and a lost trial never holds a slot.

Ray Tune reuses a trial's actor for the next trial. When ASHA stops a trial, the
actor's ``reset_config`` waits ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (Ray's default:
2 s) for the stopped trial's thread to unwind. A slow unwind (a large model, a
busy machine) makes the reset fail, and Ray then marks the next trial ERROR
without telling the callbacks or the searcher: the trial vanished from the
leaderboard and its ``ConcurrencyLimiter`` slot was never freed, so a real
study ran one trial at a time after the first loss, and stalled after the second.

A timeout of 0 forces that failure path after every ASHA stop, with the real
trainable: the tests show the lost trials recorded, their slots reused and the
study ending with every trial accounted for.
"""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from fixtures.driver import Driver, read_board
from fixtures.studies import TINY_STUDY
from search.tuner import worker_env

pytestmark = pytest.mark.e2e

TRIALS = 8
REUSE_FAILED = "Trainable runner reuse"  # Ray's error for a failed actor reset


def tiny_study(tmp_path, trials: int = TRIALS, max_epochs: int = 4):
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(trials)).replace("MAX_EPOCHS", str(max_epochs)))
    return study


def finish(driver: Driver, timeout: float) -> int:
    """The driver's exit code; a driver still running after ``timeout`` fails the test with its output."""
    try:
        return driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the study did not end within {timeout} s:\n{driver.output}") from None
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's Ray processes
        except ProcessLookupError:
            pass


def test_trials_lost_to_failed_actor_reuse_are_recorded_and_their_slots_reused(tmp_path):
    study = tiny_study(tmp_path)
    storage = tmp_path / "runs"
    driver = Driver(study, storage, "--seed", "2", env={"TUNE_FUNCTION_THREAD_TIMEOUT_S": "0"})
    code = finish(driver, timeout=300)  # before the fix, the study stalls once two slots are lost
    output = driver.output
    board = read_board(storage / "tiny")

    # Every proposed trial is in the leaderboard once, with a status.
    assert len(board) == TRIALS and board["trial_number"].is_unique, output
    assert sorted(board["trial_number"]) == list(range(TRIALS))
    lost = board[board["error"].fillna("").str.contains(REUSE_FAILED)]
    assert len(lost) >= 1, f"no actor reuse failed, so nothing was tested:\n{output}"
    assert (lost["status"] == "errored").all()
    # The printer said so, line by line and in the summary.
    for name in lost["trial_name"]:
        assert f"errored  {name}" in output, output
    assert f"{len(lost)} trial(s) ended before their first report" in output, output
    assert code == 0, output
    assert json.loads((storage / "tiny" / "study.json").read_text())["outcome"] == "completed"

    # The slots of lost trials were given back. Before the fix each lost trial kept its slot for good, so once
    # as many trials were lost as the study has slots (max_concurrent = 2) no trial could start again: here
    # trials still start after that. (Whether two of them then overlap is Ray's actor reuse, not our slots: a
    # trial that reuses an actor is lost again, as this test's timeout of 0 makes every reuse fail.)
    assert len(lost) >= 2, f"fewer trials lost than the study has slots, so a stall could not show:\n{output}"
    all_held = pd.to_datetime(lost["ended_at"]).sort_values().iloc[1]
    started_later = board[pd.to_datetime(board["started_at"]) > all_held]
    assert len(started_later) >= 1, f"no trial started once two were lost:\n{board[['trial_name', 'status', 'started_at', 'ended_at']]}"


@pytest.mark.parametrize("env, lost", [({}, True), (worker_env(), False)], ids=["ray-default-2s", "worker_env"])
def test_a_reused_actor_waits_for_its_stopped_trial_to_unwind(env, lost):
    """The cause: Ray's 2 s wait loses the next trial of a reused actor; ``worker_env`` waits long enough."""
    import ray
    from ray import tune as ray_tune

    def slow_to_unwind(config):  # defined here, so Ray ships it by value to its workers
        """Reports, and once stopped takes 4 s to unwind, as a large model can on a busy machine."""
        try:
            for step in range(3):
                ray_tune.report({"score": config["x"] + step})
        finally:
            time.sleep(4)

    env = {k: v for k, v in env.items() if k == "TUNE_FUNCTION_THREAD_TIMEOUT_S"}
    ray.init(num_cpus=1, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    try:
        grid = ray_tune.Tuner(
            ray_tune.with_resources(slow_to_unwind, {"cpu": 1}),
            param_space={"x": ray_tune.grid_search([0, 1, 2])},
            # One CPU runs one trial at a time. (A concurrency limit instead would stall: a lost trial keeps its slot.)
            tune_config=ray_tune.TuneConfig(reuse_actors=True),
            run_config=ray_tune.RunConfig(stop={"training_iteration": 1}, verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    errors = [str(r.error) for r in grid if r.error is not None]
    assert bool(errors) == lost, errors
    assert all(REUSE_FAILED in e for e in errors), errors
