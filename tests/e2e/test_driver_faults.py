"""The driver's faults (issue 27): SIGTERM, a disk that fills mid-run, two drivers on one folder.

Each ends with a named message, the outcome in study.json, the resume command printed, and a
folder that the printed command resumes to the end, with every trial once.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from fixtures.driver import Driver, kill_session, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e

TRIALS = 4
NATIVE_DUMP = ("*** SIGTERM received", "PC: @", "logging.cc")  # Ray's native handler's abort, as it printed


def tiny_study(tmp_path: Path, trials: int = TRIALS, epochs: int = 3) -> Path:
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(trials)).replace("MAX_EPOCHS", str(epochs)))
    return study


def wait_for_file(driver: Driver, path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert driver.poll() is None, f"search.run ended before {path.name} appeared:\n{driver.output}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s:\n{driver.output}"
        time.sleep(0.1)


def printed_resume(output: str) -> list[str]:
    found = re.search(r"[Rr]esume with:\n  (.+)", output)
    assert found, output
    return shlex.split(found.group(1))


def resume_as_printed(command: list[str], timeout: float = 420) -> Driver:
    assert command[:3] == ["python", "-m", "search.run"] and command[4] == "--storage" and "--resume" in command
    driver = Driver(Path(command[3]), Path(command[5]), *command[6:])
    try:
        assert driver.wait(timeout=timeout) == 0, driver.output
    finally:
        kill_session(driver.pid)
    return driver


def assert_complete(folder: Path, trials: int = TRIALS) -> None:
    board = read_board(folder)
    assert sorted(board["trial_number"]) == list(range(trials)) and board["trial_id"].is_unique, board.to_string()
    assert set(board["status"]) <= {"finished", "stopped"}, board[["trial_name", "status"]].to_string()
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert json.loads((folder / "study.json").read_text())["outcome"] == "completed"
    assert not (folder / "search.lock").exists()  # the holder ended normally: no lock left behind


def test_sigterm_stops_the_driver_as_ctrl_c_does_and_the_printed_command_resumes_it(tmp_path):
    study, storage = tiny_study(tmp_path), tmp_path / "runs"
    folder = storage / "tiny"
    first = Driver(study, storage, "--seed", "2")
    try:
        wait_for_file(first, folder / "epochs.parquet")  # a trial has reported an epoch
        os.kill(first.pid, signal.SIGTERM)  # what SLURM, Kubernetes and docker stop send
        code = first.wait(timeout=180)
    finally:
        kill_session(first.pid)
    output = first.output
    assert code == 143, output  # 128 + SIGTERM, documented in the README; it was -6 (SIGABRT) with a stack dump
    assert not any(text in output for text in NATIVE_DUMP) and "Traceback" not in output, output
    assert "interrupted (SIGTERM)" in output
    record = json.loads((folder / "study.json").read_text())
    assert record["outcome"] == "interrupted" and record["finished_at"]
    board = read_board(folder)
    assert len(board) and "running" not in set(board["status"]), board[["trial_name", "status"]].to_string()
    assert set(board["status"]) <= {"finished", "stopped", "interrupted"}
    assert not (folder / "search.lock").exists()

    resume_as_printed(printed_resume(output))
    assert_complete(folder)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          check=False)
    return done.returncode == 0


def test_a_disk_that_fills_mid_run_stops_the_study_by_name_and_resume_completes_it_once_space_is_freed(tmp_path):
    """A real full disk: the results folder on a small tmpfs, filled with dd once a trial has reported.

    Ray's background sync of its experiment state onto a full disk leaves its files empty (the reported
    ``EOFError: Ran out of input`` on resume, after which Ray quietly started the experiment anew): that
    file is emptied here as the sync left it, and the resume must restore the last good copy.
    """
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "300m"):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN); a small filesystem is how a full disk is made")
    try:
        study = tiny_study(tmp_path)
        folder = disk / "tiny"
        first = Driver(study, disk, "--seed", "3")
        try:
            wait_for_file(first, folder / "epochs.parquet")
            deadline = time.monotonic() + 30  # Ray's state is backed up once it has settled
            while not list(folder.glob("ray-state-backup/searcher-state-*.pkl")) and time.monotonic() < deadline:
                time.sleep(0.2)
            subprocess.run(["dd", "if=/dev/zero", f"of={disk}/filler-{uuid.uuid4().hex}", "bs=1M"],
                           capture_output=True, check=False)  # dd ends on ENOSPC
            code = first.wait(timeout=240)
        finally:
            kill_session(first.pid)
        output = first.output
        assert code == 1, output
        assert "Traceback" not in output, output
        assert re.search(r"the study stopped: .*the disk holding '.*tiny' is (nearly )?full", output), output
        record = json.loads((folder / "study.json").read_text())
        assert record["outcome"] == "failed" and record["error"].startswith("disk full"), record
        for name in ("leaderboard.parquet", "epochs.parquet"):  # whole, never half written
            pd.read_parquet(folder / name)
        assert "running" not in set(read_board(folder)["status"])
        assert not (folder / "search.lock").exists()

        # What Ray's sync leaves when it copies onto the full disk: its searcher state empty.
        searcher_state = max(folder.glob("searcher-state-*.pkl"))
        searcher_state.write_bytes(b"")
        for filler in disk.glob("filler-*"):
            filler.unlink()

        resumed = resume_as_printed(printed_resume(output))
        assert "Failed to restore the run state" not in resumed.output, resumed.output
        assert "restored the last good copy" in resumed.output, resumed.output
        assert_complete(folder)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
        shutil.rmtree(disk, ignore_errors=True)


def test_a_second_driver_on_a_folder_in_use_is_refused_by_name_before_ray_starts(tmp_path):
    """The reported case: a --resume while the first driver still loaded its data started its own Ray there."""
    study, storage = tiny_study(tmp_path, trials=2, epochs=1), tmp_path / "runs"
    folder = storage / "tiny"
    first = Driver(study, storage, "--seed", "4")
    try:
        first.wait_for(": loading ", timeout=120)  # the lock is taken before the data is loaded
        holder = json.loads((folder / "search.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["since"]
        second = Driver(study, storage, "--resume")
        assert second.wait(timeout=120) == 2, second.output
        assert f"in use by a search.run driver (pid {first.pid} on host" in second.output, second.output
        assert "starting the study again" not in second.output and "Ray dashboard" not in second.output
        assert first.poll() is None  # the first driver is untouched
        os.kill(first.pid, signal.SIGTERM)  # stops it wherever it is: loading data or training
        assert first.wait(timeout=180) == 143, first.output
    finally:
        kill_session(first.pid)
    assert "Traceback" not in first.output, first.output
    assert not (folder / "search.lock").exists()
