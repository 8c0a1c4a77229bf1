"""One writer per results folder: a lock file naming its holder (host, pid, since when).

Two ``search.run`` drivers on one folder would start two Ray experiments writing
the same leaderboard and trial folders; two ``analysis.evaluate`` runs would
interleave their ``final_model.json`` and test log. Each takes its lock before it
writes anything (a driver before Ray starts) and removes it when it ends.

The lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on a local
disk and on NFS v3+). Its body holds the host name, the pid, the process's start
time (so a pid reused by another process is not taken for the holder) and when
it was taken, and no path: a results folder is sealed (see ``search.storage``).
A lock whose holder is gone (same host, pid not alive) is stale, as a SIGKILLed
driver leaves it, and is taken over with a note. A holder on another host cannot
be checked from here: the error says how to remove its lock once that run is gone.
On an object store (``s3://``) there is no exclusive create: the lock is
checked, then written, which catches a second run started by hand but not a race.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

from search.storage import StorageError, StudyFolder

RUN_LOCK = "search.lock"  # held by a search.run driver while it runs or resumes the study
EVALUATE_LOCK = "evaluate.lock"  # held by analysis.evaluate while it fits and scores the final model
_WHAT = {RUN_LOCK: "a search.run driver", EVALUATE_LOCK: "an analysis.evaluate run"}


class FolderLockedError(StorageError):
    """Another live process holds the results folder's lock: the message names it and the fix."""


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started  # a reused pid started at another time


class FolderLock:
    """``with FolderLock(folder, RUN_LOCK): ...``: hold ``folder``'s lock, or raise ``FolderLockedError``.

    ``note`` prints the take-over of a stale lock. ``fix`` ends the refusal's message (what to do instead).
    """

    def __init__(self, folder: StudyFolder, name: str = RUN_LOCK, *, note=None, fix: str = ""):
        self.folder, self.name, self.fix = folder, name, fix
        self.note = note or (lambda line: print(line, flush=True))
        self.held = False
        self._body = b""

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def body(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": _WHAT.get(self.name, self.name)}

    def acquire(self) -> None:
        self.folder.mkdir()
        self._body = json.dumps(self.body(), indent=1).encode()
        for _ in range(3):  # a stale lock removed, then a race with another taker: look again
            if self._create():
                self.held = True
                return
            holder = self.holder()
            if holder is None:  # removed between our create and our read
                continue
            if not self._stale(holder):
                raise FolderLockedError(self._refusal(holder))
            self.note(f"note: {self.folder.uri(self.name)} was left by {self._who(holder)}, which is no longer "
                      "running (killed?); taking it over")
            self._remove_stale(holder)
        raise FolderLockedError(f"could not take {self.folder.uri(self.name)}: other processes keep taking it")

    def _create(self) -> bool:
        path = f"{self.folder.path}/{self.name}"
        if not self.folder.is_local:
            if self.folder.exists(self.name):
                return False
            self.folder.write_bytes(self.name, self._body)
            return True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._body)
        except BaseException:
            os.close(fd)
            os.unlink(path)  # a lock with no holder named would be refused by every later run
            raise
        os.close(fd)
        return True

    def holder(self) -> dict | None:
        """The lock's body; ``{}`` for one that cannot be read (cut off by a crash mid-write); None if absent."""
        try:
            text = self.folder.read_text(self.name)
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            body = json.loads(text)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _stale(self, holder: dict) -> bool:
        if not holder:  # unreadable: its writer died while writing it, within a second of starting
            return time.time() - self._mtime() > 10
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another machine's process: cannot be checked from here
        return not _alive(holder["pid"], holder.get("process_start"))

    def _mtime(self) -> float:
        try:
            return self.folder.fs.get_file_info(f"{self.folder.path}/{self.name}").mtime.timestamp()
        except (OSError, AttributeError):
            return 0.0

    def _remove_stale(self, holder: dict) -> None:
        """Remove the stale lock, unless another taker replaced it meanwhile (then the next look sees theirs)."""
        if self.holder() == holder:
            try:
                self.folder.delete(self.name)
            except FileNotFoundError:
                pass

    def _who(self, holder: dict) -> str:
        if not holder:
            return "a process that did not finish writing it"
        return (f"{holder.get('what', 'a process')} (pid {holder.get('pid')} on host {holder.get('host')!r}, "
                f"since {holder.get('since')})")

    def _refusal(self, holder: dict) -> str:
        here = not holder or holder.get("host") == socket.gethostname()
        gone = ("if that process is gone" if here else
                f"if that process is no longer running on {holder.get('host')!r} (this machine cannot check)")
        return (f"the results folder {str(self.folder)!r} is in use by {self._who(holder)}: its lock "
                f"{self.name} says so. One {_WHAT.get(self.name, 'process').split(' ', 1)[1]} at a time per folder: "
                f"wait for it to end{', or stop it' if here else ''}{self.fix}; {gone}, delete "
                f"{self.folder.uri(self.name)} and run again")

    def release(self) -> None:
        """Remove the lock if it is still ours (a holder ending normally leaves nothing behind)."""
        if not self.held:
            return
        self.held = False
        try:
            if self.folder.read_bytes(self.name) == self._body:
                self.folder.delete(self.name)
        except (FileNotFoundError, OSError):
            pass
