"""Kill the driver (SIGINT, SIGKILL) mid-study, resume, and check that nothing was lost or run twice."""

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from fixtures.driver import Driver, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

TRIALS = 6


def start(study: Path, storage: Path, *extra: str) -> Driver:
    return Driver(study, storage, "--seed", "5", *extra)


def wait_for_finished(proc, folder: Path, n: int, timeout: float = 240) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        board = read_board(folder)
        if board["status"].isin(["finished", "stopped"]).sum() >= n:
            return board
        assert proc.poll() is None, proc.output
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} trials ended within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_driver_resumes_without_losing_or_repeating_trials(tmp_path, sig):
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(TRIALS)).replace("MAX_EPOCHS", "3"))
    storage = tmp_path / "runs"
    folder = storage / "tiny"

    first = start(study, storage)
    try:
        before = wait_for_finished(first, folder, 2)
        os.kill(first.pid, sig)
        first.wait(timeout=120)
        output = first.output
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # Ray processes a SIGKILLed driver left behind
        except ProcessLookupError:
            pass
    if sig == signal.SIGINT:
        assert first.proc.returncode == 130 and "--resume" in output, output
    ended_before = set(before.loc[before["status"].isin(["finished", "stopped"]), "trial_id"])

    again = start(study, storage)  # without --resume: refused, nothing touched
    assert again.wait(timeout=120) == 2 and "--resume" in again.output

    resumed = start(study, storage, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.output

    board = read_board(folder)
    assert board["trial_id"].is_unique and board["trial_number"].is_unique
    assert len(board) == TRIALS  # the searcher's state came back: no extra trials
    assert set(board["status"]) <= {"finished", "stopped"}
    assert ended_before <= set(board["trial_id"])  # finished work kept
    kept = board.set_index("trial_id").loc[sorted(ended_before)]
    assert (kept["epochs"] >= before.set_index("trial_id").loc[sorted(ended_before), "epochs"]).all()
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
