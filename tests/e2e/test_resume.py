"""--resume continues the study that started: its flags, and the study file it checked."""

import json
import os
import re
import shlex
import shutil
import signal
import time

import pandas as pd
import pytest

from fixtures.driver import Driver, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

FLAGS = ("--num-samples", "6", "--max-epochs", "2", "--seed", "4")


def test_the_printed_resume_command_continues_the_same_study_from_a_moved_study_file_and_a_copied_folder(tmp_path):
    """The study file moves and the results folder is copied elsewhere, the original moved away: the printed
    command (with the copy's --storage) resumes the study, and every trial, those created after the resume
    too, writes and reads only inside the copy (Ray would create them in the original folder)."""
    from analysis.reader import locate_checkpoint
    from trainables.checkpoint import load_classifier  # imports Keras: here, not when the module is collected

    first_file = tmp_path / "first" / "tiny.py"
    first_file.parent.mkdir()
    first_file.write_text("from search import Dataset, Study\n"
                          + TINY_STUDY.replace("NUM_SAMPLES", "8").replace("MAX_EPOCHS", "4"))
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
    assert record["flags"] == {"num_samples": 6, "max_epochs": 2, "seed": 4}
    # Not all 6 trials started (2 at a time): the resume restores some and creates at least one.
    assert len(read_board(folder)) < 6

    # The results folder is copied elsewhere and the original moved away: anything written there shows.
    copy, away = tmp_path / "copy", tmp_path / "away"
    shutil.copytree(storage, copy, symlinks=True)
    storage.rename(away)
    listing = sorted((str(p.relative_to(away)), p.stat().st_size) for p in away.rglob("*"))

    # The study file moves; the old path is gone. The resume must use the file it checked.
    moved = tmp_path / "moved" / "tiny.py"
    moved.parent.mkdir()
    moved.write_bytes(first_file.read_bytes())
    first_file.unlink()

    # A search flag with another value than the study started with is refused before Ray starts.
    conflicting = Driver(moved, copy, "--resume", "--num-samples", "5")
    assert conflicting.wait(timeout=120) == 2
    assert "--num-samples: the study started with 6, this command gives 5" in conflicting.output

    command = shlex.split(printed.replace(str(first_file), str(moved)))
    assert command[:6] == ["python", "-m", "search.run", str(moved), "--storage", str(storage)]
    assert "--num-samples" not in command  # recorded in study.json instead
    resumed = Driver(moved, copy, *command[6:])
    assert resumed.wait(timeout=420) == 0, resumed.output

    assert not storage.exists(), sorted(str(p) for p in storage.rglob("*"))
    assert sorted((str(p.relative_to(away)), p.stat().st_size) for p in away.rglob("*")) == listing
    folder = copy / "tiny"
    board = read_board(folder)
    assert len(board) == 6 and sorted(board["trial_number"]) == list(range(6))  # --num-samples 6, not the file's 8
    assert board["epochs"].max() <= 2 and set(board["status"]) <= {"finished", "stopped"}, board.to_string()
    for recorded, trial in zip(board["checkpoint_path"], board["trial_name"]):
        path, relocated = locate_checkpoint(folder, recorded, trial, "tiny")
        assert not os.path.isabs(recorded) and not relocated
        assert path.resolve().is_relative_to(folder.resolve())
        assert load_classifier(path).count_params() > 0
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
