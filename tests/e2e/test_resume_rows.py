"""--resume after a driver killed right after a trial ended: the trial is kept, and every row is one training.

Ray Tune saves its experiment state every 10 s or so (and after each trial checkpoint), not when a trial
ends. A driver SIGKILLed right after a trial's end reached the leaderboard leaves that trial still running
in Ray's state, and ``Tuner.restore(resume_unfinished=True)`` used to train it again from its last
checkpoint under the same trial id: its row then mixed the two trainings (issue 27.3: "finished, 6 epochs"
while the re-run said "stopped after epoch 3 by ASHA"; a ``best_epoch`` whose checkpoint came from the re-run).
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from fixtures.driver import Driver, kill_session, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

TRIALS, EPOCHS = 6, 4
ENDED = ("finished", "stopped")
ENDED_LINES = ("] finished ", "] stopped ")  # ProgressPrinter's line, printed right after the leaderboard's write
KILL_TRIES = 3  # kills until one lands before Ray's state save (each lands within ms of the line; a save is ~10 s apart)
POLL_S = 0.005
STEP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 420


def ray_statuses(folder: Path) -> dict[str, str]:
    """``trial_id -> status`` in Ray's newest experiment state: what ``Tuner.restore`` will restore."""
    newest = max(folder.glob("experiment_state-*.json"))
    state = json.loads(newest.read_text())
    trials = (json.loads(trial_json) for trial_json, _metadata in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def kill_after_an_ended_line(driver: Driver) -> str:
    """SIGKILL the driver (and its Ray) as soon as it prints that a trial ended; return that line."""
    first_line = len(driver.lines)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not (line := next((l for l in driver.lines[first_line:] if any(t in l for t in ENDED_LINES)), None)):
        assert driver.poll() is None, f"the driver ended before a trial did:\n{driver.output}"
        assert time.monotonic() < deadline, f"no trial ended within {STEP_TIMEOUT_S} s:\n{driver.output}"
        time.sleep(POLL_S)
    driver.proc.kill()
    driver.wait(timeout=60)
    kill_session(driver.pid)  # Ray's GCS, raylet and workers, as when a machine's session ends
    return line.strip()


def epochs_of(epochs: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    return epochs[epochs["trial_id"] == trial_id].sort_values("epoch").reset_index(drop=True)


def test_a_trial_that_ended_after_rays_last_state_save_is_kept_and_every_row_is_one_training(tmp_path):
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(TRIALS)).replace("MAX_EPOCHS", str(EPOCHS)))
    storage, folder = tmp_path / "runs", tmp_path / "runs" / "tiny"
    ray_tmp = tempfile.mkdtemp(prefix="rows-ray-")  # short (socket paths), and no other test's Ray cluster
    env = {"RAY_TMPDIR": ray_tmp}
    try:
        # 1. Kill right after a trial's end reached the leaderboard, until Ray's state still has one running.
        kept, lines = set(), []
        for attempt in range(KILL_TRIES):
            driver = Driver(study, storage, "--seed", "3", *(["--resume"] if attempt else []), env=env)
            lines.append(kill_after_an_ended_line(driver))
            board = read_board(folder)
            in_ray = ray_statuses(folder)
            kept = {tid for tid in board.loc[board["status"].isin(ENDED), "trial_id"]
                    if in_ray.get(tid, "TERMINATED") != "TERMINATED"}  # ended here, unfinished in Ray's state
            if kept:
                break
        assert kept, f"every kill came after Ray's state save: {lines}"
        board_before = read_board(folder).set_index("trial_id")
        epochs_before = pd.read_parquet(folder / "epochs.parquet")

        # 2. Resume to the end.
        resumed = Driver(study, storage, "--resume", env=env)
        assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, resumed.output
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    board = read_board(folder)
    epochs = pd.read_parquet(folder / "epochs.parquet")
    metric = json.loads((folder / "study.json").read_text())["study"]["metric"]  # mode max

    # (a) The kept trials were not trained again: never started, their rows and epochs as recorded.
    for trial_id in kept:
        name = board_before.at[trial_id, "trial_name"]
        assert f"start    {name} " not in resumed.output, f"{name} ended before the kill and was trained again:\n" \
                                                          f"{resumed.output}"
        row = board.set_index("trial_id").loc[trial_id]
        for column in ("status", "epochs", "best_epoch", "checkpoint_path", f"best_{metric}"):
            assert row[column] == board_before.at[trial_id, column], (name, column)
        pd.testing.assert_frame_equal(epochs_of(epochs, trial_id)[list(epochs_before.columns)],
                                      epochs_of(epochs_before, trial_id))

    # The study is whole: every trial once, each (trial, epoch) once.
    assert len(board) == TRIALS and board["trial_id"].is_unique, board.to_string()
    assert sorted(board["trial_number"]) == list(range(TRIALS)), board.to_string()
    assert set(board["status"]) <= set(ENDED), board.to_string()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()

    # (b) Every row is one training: its epochs, status, best epoch and checkpoint agree.
    for row in board.itertuples():
        mine = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        assert list(mine["epoch"]) == list(range(1, row.epochs + 1)), (row.trial_name, list(mine["epoch"]))
        assert (row.status == "finished") == (row.epochs == EPOCHS), (row.trial_name, row.status, row.epochs)
        best = int(mine.loc[mine[metric].idxmax(), "epoch"])  # the first epoch at the best score
        assert row.best_epoch == best, (row.trial_name, row.best_epoch, best)
        saved = json.loads((folder / row.checkpoint_path / "trial.json").read_text())
        assert saved["epoch"] == row.best_epoch, (row.trial_name, saved["epoch"], row.best_epoch)
        assert saved[metric] == pytest.approx(getattr(row, f"best_{metric}")), row.trial_name
