"""One writer per results folder (``search.folder_lock``): held, refused by name, stale locks taken over.

The holders here are real processes: a lock is about processes, and a stub of one would prove nothing.
"""

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from search.folder_lock import EVALUATE_LOCK, RUN_LOCK, FolderLock, FolderLockedError
from search.storage import StudyFolder

ROOT = Path(__file__).resolve().parents[2]


def hold_in_another_process(folder: Path, name: str) -> subprocess.Popen:
    """A process that takes ``folder``'s lock ``name`` and holds it until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        from search.folder_lock import FolderLock
        from search.storage import StudyFolder
        lock = FolderLock(StudyFolder({str(folder.parent)!r}, {folder.name!r}), {name!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_a_second_holder_naming_it_and_is_removed_when_released(tmp_path):
    folder = tmp_path / "study"
    holder = hold_in_another_process(folder, RUN_LOCK)
    try:
        body = json.loads((folder / RUN_LOCK).read_text())
        assert body["pid"] == holder.pid and body["host"] == socket.gethostname() and body["since"]
        assert str(tmp_path) not in (folder / RUN_LOCK).read_text()  # a sealed folder: no path in the lock
        with pytest.raises(FolderLockedError) as refused:
            FolderLock(StudyFolder(tmp_path, "study"), RUN_LOCK).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in message and body["since"] in message
        assert RUN_LOCK in message and "wait for it to end" in message
        # The evaluation's lock is another: a study still running can be evaluated.
        with FolderLock(StudyFolder(tmp_path, "study"), EVALUATE_LOCK):
            assert (folder / EVALUATE_LOCK).exists()
        assert not (folder / EVALUATE_LOCK).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path):
    folder = tmp_path / "study"
    holder = hold_in_another_process(folder, RUN_LOCK)
    holder.kill()  # SIGKILL: no chance to remove its lock
    holder.wait()
    assert (folder / RUN_LOCK).exists()
    notes = []
    lock = FolderLock(StudyFolder(tmp_path, "study"), RUN_LOCK, note=notes.append)
    lock.acquire()
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer running" in notes[0]
    assert json.loads((folder / RUN_LOCK).read_text())["pid"] != holder.pid
    lock.release()
    assert not (folder / RUN_LOCK).exists()


def test_a_lock_held_on_another_host_is_refused_with_how_to_remove_it(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / RUN_LOCK).write_text(json.dumps({"host": "node-7", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(FolderLockedError, match=r"pid 1 on host 'node-7'.*this machine cannot check.*delete"):
        FolderLock(StudyFolder(tmp_path, "study"), RUN_LOCK).acquire()


def test_a_second_evaluation_of_a_folder_is_refused_by_name(tmp_path):
    from fixtures.runs import make_run_dir

    from analysis.errors import EvaluateError
    from analysis.evaluate import evaluate_top_k, main

    run = make_run_dir(tmp_path)
    holder = hold_in_another_process(run, EVALUATE_LOCK)
    try:
        with pytest.raises(EvaluateError, match=rf"in use by an analysis.evaluate run \(pid {holder.pid} on host"):
            evaluate_top_k(run, k=1, n_boot=10, log=lambda _: None)
        assert main([str(run), "--top-k", "1"]) == 2
    finally:
        holder.kill()
        holder.wait()
    # Alone, the evaluation takes the lock and gives it back however it ends (here: no checkpoints to score).
    (run / EVALUATE_LOCK).unlink()
    with pytest.raises(EvaluateError):
        evaluate_top_k(run, k=1, n_boot=10, log=lambda _: None)
    assert not (run / EVALUATE_LOCK).exists()


def test_an_unreadable_lock_is_stale_only_once_its_writer_had_time_to_finish(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / RUN_LOCK).write_text('{"host": ')  # cut off as a crash mid-write leaves it
    with pytest.raises(FolderLockedError):
        FolderLock(StudyFolder(tmp_path, "study"), RUN_LOCK).acquire()
    old = time.time() - 60
    import os

    os.utime(folder / RUN_LOCK, (old, old))
    with FolderLock(StudyFolder(tmp_path, "study"), RUN_LOCK, note=lambda _: None):
        assert json.loads((folder / RUN_LOCK).read_text())["pid"] == os.getpid()
