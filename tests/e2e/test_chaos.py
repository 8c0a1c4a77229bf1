"""Chaos at fixed moments (``benchmarks/chaos.py``): SIGKILL the driver and a trial's Ray worker, resume, lose nothing."""

import json
import subprocess

import pandas as pd
import pytest

from benchmarks.chaos import WORKER_MOMENT, Step, format_step, mount_tmpfs, run_chaos

pytestmark = pytest.mark.e2e

TRIALS = 6


def steps_table(report: dict) -> str:
    return "\n".join(format_step(s) for s in report["steps"])


def failed_checks(report: dict) -> dict:
    steps = [(f"step {s['step']} {s['moment']}", s.get("checks", {})) for s in report["steps"]]
    return {f"{where}: {name}": value for where, checks in [*steps, ("end", report["final"]["checks"])]
            for name, value in checks.items() if value is not True}


def failing_output(report: dict) -> str:
    """The driver's last output at every step (and the end) whose checks failed: what to read to see why."""
    parts = [(f"step {s['step']} {s['moment']}", s.get("output_tail")) for s in report["steps"]]
    parts.append(("end", failing_output(report)))
    return "\n".join(f"--- {where} ---\n{tail}" for where, tail in parts if tail)


def test_driver_and_worker_kills_lose_and_repeat_nothing(tmp_path):
    # Three drivers in all (a kill after a trial ends is test_kill_resume's); each step waits for its moment.
    schedule = [
        Step("driver", "checkpoint write"),  # the first checkpoint appears: the resume restores from it
        Step("worker", WORKER_MOMENT),  # the resumed driver starts a trial: its worker dies, Ray retries it
        Step("driver", "final summary"),  # every trial done, the table printing: resume a completed study
    ]
    report = run_chaos(schedule, workdir=tmp_path, trials=TRIALS, epochs=3, seed=5, say=lambda line: None)

    # Every kill landed where it was aimed; a harness that missed them would prove nothing.
    assert [s["outcome"] for s in report["steps"]] == ["killed"] * 3, steps_table(report)
    assert [s["exit_code"] for s in report["steps"] if s["target"] == "driver"] == [-9, -9]
    assert "retry" in report["steps"][1]["retry"], report["steps"][1]
    assert not failed_checks(report), (failed_checks(report), steps_table(report), failing_output(report))

    # The same end state, read straight from the folder.
    folder = tmp_path / "runs" / "tiny"
    board = pd.read_parquet(folder / "leaderboard.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert sorted(board["trial_number"]) == list(range(TRIALS)) and board["trial_id"].is_unique
    assert set(board["status"]) <= {"finished", "stopped"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any() and not epochs.duplicated(["trial_number", "epoch"]).any()
    assert json.loads((folder / "study.json").read_text())["outcome"] == "completed"
    totals = report["totals"]
    assert (totals["kills_survived"], totals["trials_lost"], totals["duplicate_trials"],
            totals["duplicate_trial_epoch_rows"], totals["board_read_errors"]) == (3, 0, 0, 0, 0), totals



def test_sigterm_and_a_full_disk_freed_before_the_resume_lose_and_repeat_nothing(tmp_path):
    """A batch scheduler's SIGTERM while the first trial runs, then the results folder's disk fills while a
    trial checkpoints (a tmpfs, where one can be mounted); each is resumed, and the study ends complete."""
    probe = tmp_path / "probe"
    schedule = [Step("sigterm", "first trial", 0.5)]
    if mount_tmpfs(probe):
        subprocess.run(["umount", "-l", str(probe)], capture_output=True, check=False)
        schedule.append(Step("disk", "checkpoint write"))
    report = run_chaos(schedule, workdir=tmp_path, trials=4, epochs=2, seed=6, say=lambda line: None)

    assert [s["outcome"] for s in report["steps"]] == ["killed"] * len(schedule), steps_table(report)
    assert report["steps"][0]["exit_code"] == 143
    if len(schedule) == 2:
        assert report["steps"][1]["exit_code"] == 1 and report["steps"][1]["signal"] == "ENOSPC"
    assert not failed_checks(report), (failed_checks(report), steps_table(report), failing_output(report))
    totals = report["totals"]
    assert (totals["kills_survived"], totals["trials_lost"], totals["duplicate_trials"],
            totals["duplicate_trial_epoch_rows"], totals["trials"], totals["outcome"]) == (
        len(schedule), 0, 0, 0, 4, "completed"), totals
