"""Kill the driver (SIGINT, SIGKILL) mid-study, resume, and check that nothing was lost or run twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 6


def start(study: Path, storage: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", str(study), "--storage", str(storage), "--seed", "5", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: Ray's processes can be cleaned up after a SIGKILL
    )


def read_board(folder: Path) -> pd.DataFrame:
    """The leaderboard, which must be readable at every moment (atomic writes)."""
    path = folder / "leaderboard.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["status", "trial_id"])


def wait_for_finished(proc, folder: Path, n: int, timeout: float = 240) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        board = read_board(folder)
        if board["status"].isin(["finished", "stopped"]).sum() >= n:
            return board
        assert proc.poll() is None, proc.stdout.read()
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
        output = first.communicate(timeout=120)[0]
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # Ray processes a SIGKILLed driver left behind
        except ProcessLookupError:
            pass
    if sig == signal.SIGINT:
        assert first.returncode == 130 and "--resume" in output, output
    ended_before = set(before.loc[before["status"].isin(["finished", "stopped"]), "trial_id"])

    again = start(study, storage)  # without --resume: refused, nothing touched
    assert again.wait(timeout=120) == 2 and "--resume" in again.stdout.read()

    resumed = start(study, storage, "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output

    board = read_board(folder)
    assert board["trial_id"].is_unique and board["trial_number"].is_unique
    assert len(board) == TRIALS  # the searcher's state came back: no extra trials
    assert set(board["status"]) <= {"finished", "stopped"}
    assert ended_before <= set(board["trial_id"])  # finished work kept
    kept = board.set_index("trial_id").loc[sorted(ended_before)]
    assert (kept["epochs"] >= before.set_index("trial_id").loc[sorted(ended_before), "epochs"]).all()
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
