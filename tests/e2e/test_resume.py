"""--resume continues the study that started: its flags, and the study file it checked."""

import json
import os
import re
import shlex
import signal
import time

import pandas as pd
import pytest

from fixtures.driver import Driver, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

FLAGS = ("--num-samples", "3", "--max-epochs", "2", "--seed", "4")


def test_the_printed_resume_command_continues_the_same_study_from_a_moved_study_file(tmp_path):
    first_file = tmp_path / "first" / "tiny.py"
    first_file.parent.mkdir()
    first_file.write_text("from search import Dataset, Study\n"
                          + TINY_STUDY.replace("NUM_SAMPLES", "6").replace("MAX_EPOCHS", "4"))
    storage = tmp_path / "runs"
    folder = storage / "tiny"

    first = Driver(first_file, storage, *FLAGS)
    try:
        first.wait_for("finished trial_", timeout=240)
        os.kill(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130, first.output
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    printed = re.search(r"Resume with:\n  (.+)", first.output).group(1)
    record = json.loads((folder / "study.json").read_text())
    assert record["flags"] == {"num_samples": 3, "max_epochs": 2, "seed": 4}

    # The study file moves; the old path is gone. The resume must use the file it checked.
    moved = tmp_path / "moved" / "tiny.py"
    moved.parent.mkdir()
    moved.write_bytes(first_file.read_bytes())
    first_file.unlink()

    # A search flag with another value than the study started with is refused before Ray starts.
    conflicting = Driver(moved, storage, "--resume", "--num-samples", "5")
    assert conflicting.wait(timeout=120) == 2
    assert "--num-samples: the study started with 3, this command gives 5" in conflicting.output

    command = shlex.split(printed.replace(str(first_file), str(moved)))
    assert command[:6] == ["python", "-m", "search.run", str(moved), "--storage", str(storage)]
    assert "--num-samples" not in command  # recorded in study.json instead
    resumed = Driver(moved, storage, *command[6:])
    assert resumed.wait(timeout=420) == 0, resumed.output

    board = read_board(folder)
    assert len(board) == 3 and sorted(board["trial_number"]) == [0, 1, 2]  # --num-samples 3, not the file's 6
    assert board["epochs"].max() <= 2 and set(board["status"]) <= {"finished", "stopped"}  # --max-epochs 2
    record = json.loads((folder / "study.json").read_text())
    assert record["outcome"] == "completed" and record["study"]["seed"] == 4 and record["resumed_at"]
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()


def test_a_run_killed_before_its_first_trial_starts_again_on_resume(tmp_path):
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "1"))
    storage = tmp_path / "runs"
    first = Driver(study, storage, "--seed", "1")
    try:
        while not (storage / "tiny" / "study.json").exists():  # study.json is written before Ray starts
            assert first.poll() is None, first.output
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    except ProcessLookupError:
        pass
    assert not (storage / "tiny" / "tuner.pkl").exists(), "killed too late: Ray Tune had started"
    resumed = Driver(study, storage, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.output
    assert "stopped before its first trial; starting the study again" in resumed.output
    assert len(read_board(storage / "tiny")) == 2
