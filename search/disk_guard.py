"""A full disk stops the study by name and leaves its folder resumable.

What a full disk did before: the trials' checkpoint writes failed and were
retried, the driver's leaderboard write raised from a Ray callback, the outcome
could not be recorded (a Python traceback, exit 1), and Ray's background sync of
its experiment state copied onto the full disk, leaving ``searcher-state-*.pkl``
empty: the next ``--resume`` failed to restore it (``EOFError: Ran out of input``),
and Ray quietly started a new experiment instead.

``DiskGuard``, a Ray Tune callback of the driver:

- stops the study when the folder's disk has less than ``LOW_WATER_BYTES`` free,
  or when a trial fails with ENOSPC/EDQUOT, before the retries burn through
  ``max_failures``: as Ctrl+C does (Ray Tune's own stop, so Ray saves its state and
  running trials are marked ``interrupted``), and ``full`` holds the ``DiskFullError``
  the driver then raises. An error raised from a callback instead would be taken by
  Ray for the trial's (``Error stopping trial``, and a retry of a trial that had ended);
- keeps ``RESERVE_BYTES`` of the disk in a file of its own, released when the disk
  fills, so Ray's last state save, the last leaderboard and study.json's ``outcome`` still fit;
- copies Ray's resume state (``RAY_STATE``) to ``BACKUP_DIR`` whenever a complete,
  well-formed set is on disk: the last good copy is never overwritten by a bad one
  (each copy is written atomically, and a failed write keeps the previous one).

``repair_ray_state`` runs before a ``--resume``: a state file that is empty or cut
off is replaced by its good copy, with a note; without one, a named error.
``estimated_bytes`` is what a study's checkpoints will need, for a warning at start.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import pickletools
import shutil
import signal
import time
from pathlib import Path

from ray import tune

from search.storage import DiskFullError, StorageError, StudyFolder, write_atomic

LOW_WATER_BYTES = 8_000_000  # below this much free space the driver stops, before a write fails half way
RESERVE_BYTES = 4_000_000  # kept back for the last leaderboard, epochs and study.json writes
RESERVE = ".disk-reserve"  # the file that holds it (zeros)
CHECK_EVERY_S = 1.0  # free space and Ray's state are looked at this often, at most
SETTLED_S = 1.0  # a state file untouched this long is not being synced by Ray right now
BACKUP_DIR = "ray-state-backup"  # the last good copy of Ray's resume state (absolute paths: Ray's own, as in tuner.pkl)
RAY_STATE = ("tuner.pkl", "experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
DISK_FULL_TEXTS = ("[Errno 28]", "No space left on device", "[Errno 122]", "Disk quota exceeded")

# Bytes a checkpoint of each backbone may take: float32 weights with the optimizer's two Adam slots.
# (Parameter counts without the classifier top, as Keras builds them; the head adds little.)
BACKBONE_PARAMS = {
    "mobilenet_v2": 2_257_984, "efficientnet_b0": 4_049_571, "efficientnet_b1": 6_575_239,
    "vgg16": 14_714_688, "resnet50": 23_587_712, "densenet121": 7_037_504,
    "efficientnet_lite0": 3_413_024, "efficientnet_lite1": 4_190_496, "efficientnet_lite2": 4_869_168,
    "cnn_s2": 500_000, "cnn_s3": 500_000,
}
UNKNOWN_BACKBONE_PARAMS = 25_000_000  # a backbone registered by a study: assume a large one
# A study that runs until its time limit (num_samples=None) has no trial count: warn below room for this many.
OPEN_ENDED_TRIALS = 20
BYTES_PER_PARAM = 4 * 3
TRIAL_OVERHEAD_BYTES = 2_000_000  # Ray's result.json, progress.csv, TensorBoard events, trial.json


def _print(line: str) -> None:
    print(line, flush=True)


def ray_state_files(folder: StudyFolder) -> list[str]:
    """The names of Ray's resume state files at the top of ``folder``."""
    try:
        names = os.listdir(folder.path)
    except OSError:
        return []
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in RAY_STATE))


def well_formed(name: str, data: bytes) -> bool:
    """Whether ``data`` is a whole JSON document or a whole pickle (read without running it).

    Not by ``name``: Ray writes ``search_gen_state-*.json`` as a pickle.
    """
    if not data:
        return False
    if name.endswith(".json") and not data.startswith(b"\x80"):  # a pickle of protocol 2+ opens with 0x80
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    try:
        for _ in pickletools.genops(io.BytesIO(data)):  # walks the opcodes to STOP; a cut-off pickle raises
            pass
    except Exception:  # noqa: BLE001  ValueError for a truncated or garbled stream
        return False
    return True


class DiskGuard(tune.Callback):
    """See the module's doc. ``folder`` is the study's results folder (local; on a bucket it does nothing)."""

    def __init__(self, folder: StudyFolder, *, say=_print):
        self.folder, self.say = folder, say
        self.active = folder.is_local
        self.full: DiskFullError | None = None  # set when the disk filled: the driver raises it after the stop
        self._last_check = 0.0
        self._backed_up: dict[str, tuple] = {}
        if self.active:
            self._hold_reserve()

    # -- the reserve ---------------------------------------------------------
    def _hold_reserve(self) -> None:
        path = Path(self.folder.path, RESERVE)
        if path.exists() and path.stat().st_size >= RESERVE_BYTES:
            return
        try:
            write_atomic(path, bytes(RESERVE_BYTES))
        except OSError:  # too little room even for that: the first check below stops the study
            pass

    def release_reserve(self) -> bool:
        """Give the reserve back to the disk; whether there was one."""
        path = Path(self.folder.path, RESERVE)
        if not path.exists():
            return False
        path.unlink(missing_ok=True)
        return True

    # -- Tune callbacks ------------------------------------------------------
    # This callback runs first (search.run puts it there), so it sees a full disk before the leaderboard's write.
    def on_step_end(self, iteration, trials, **info):
        if not self.active or self.full is not None or time.monotonic() - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = time.monotonic()
        if self._check_free():
            self.back_up()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._check_free()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._check_free()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._check_free()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._stop_if_disk_full(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stop_if_disk_full(trial)

    def _check_free(self) -> bool:
        """Whether the disk has room; else the study is stopped (a statvfs: cheap enough for every event)."""
        if not self.active or self.full is not None:
            return self.full is None
        free = shutil.disk_usage(self.folder.path).free
        if free >= LOW_WATER_BYTES:
            return True
        self._stop(f"the disk holding {str(self.folder)!r} is nearly full ({free / 1e6:.1f} MB free, less than the "
                   f"{LOW_WATER_BYTES / 1e6:.0f} MB the driver keeps free); free space there or move the folder to a "
                   "larger disk")
        return False

    def _stop(self, reason: str) -> None:
        """Free the reserve and stop the study as Ctrl+C does; where Ray Tune's handler is not set, raise."""
        self.release_reserve()
        self.full = DiskFullError(errno.ENOSPC, reason)
        self.say(f"stopping the study: {reason}")
        handler = signal.getsignal(signal.SIGINT)  # Ray Tune's while it runs in the main thread: stop, save, return
        if not callable(handler) or handler is signal.default_int_handler:
            raise self.full
        handler(signal.SIGINT, None)

    def _stop_if_disk_full(self, trial) -> None:
        """A trial that failed for want of disk space would fail again: stop now, keep its retries for later."""
        path = trial.error_file
        try:
            text = Path(path).read_text(errors="replace") if path and os.path.exists(path) else ""
        except OSError:
            text = ""
        if any(t in text for t in DISK_FULL_TEXTS) and self.full is None:
            free = shutil.disk_usage(self.folder.path).free / 1e6 if self.active else float("nan")
            self._stop(f"the disk holding {str(self.folder)!r} is full ({free:.1f} MB free): {trial} could not write "
                       "its checkpoint; free space there or move the folder to a larger disk")

    # -- Ray's resume state --------------------------------------------------
    def back_up(self) -> None:
        """Copy Ray's state files to ``BACKUP_DIR`` if every one is whole and none is being written now."""
        names = ray_state_files(self.folder)
        if not names:
            return
        stats = {name: _stat(Path(self.folder.path, name)) for name in names}
        if stats == self._backed_up or None in stats.values():
            return
        if any(time.time_ns() - mtime_ns < SETTLED_S * 1e9 for mtime_ns, _ in stats.values()):
            return  # Ray is syncing: a set read now could mix two saves
        try:
            data = {name: Path(self.folder.path, name).read_bytes() for name in names}
        except OSError:
            return
        if not all(well_formed(n, d) for n, d in data.items()):
            return
        if any(_stat(Path(self.folder.path, n)) != s for n, s in stats.items()):
            return  # changed while read
        backup = Path(self.folder.path, BACKUP_DIR)
        for name, content in data.items():
            write_atomic(backup / name, content)  # a full disk raises here, keeping the previous copy whole
        self._backed_up = stats


def _stat(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def repair_ray_state(folder: StudyFolder, say=_print) -> list[str]:
    """Before a resume: replace each empty or cut-off Ray state file by its good copy; return the names repaired.

    Raises ``StorageError`` naming a damaged file that has no good copy, since Ray would otherwise
    quietly start the experiment anew (and the study would run its trials twice).
    """
    if not folder.is_local:
        return []
    backup = Path(folder.path, BACKUP_DIR)
    damaged = [n for n in ray_state_files(folder) if not well_formed(n, Path(folder.path, n).read_bytes())]
    if not damaged:
        return []
    missing = [n for n in damaged if not (backup / n).exists() or not well_formed(n, (backup / n).read_bytes())]
    if missing and _fall_back_a_session(folder, missing, say):
        return repair_ray_state(folder, say) + missing
    if missing:
        raise StorageError(
            f"Ray's saved state in {str(folder)!r} is damaged ({', '.join(missing)}: empty or cut off, as a full "
            f"disk leaves it) and {BACKUP_DIR}/ holds no good copy of it, so the run cannot be resumed as it was. "
            "Start the study again under another --name (or another --storage); its finished trials stay in this "
            "folder's leaderboard")
    # The whole backed-up set, not only the damaged files: the searcher's and the trials' states belong together.
    restored = sorted(p.name for p in backup.iterdir() if p.is_file())
    for name in restored:
        write_atomic(Path(folder.path, name), (backup / name).read_bytes())
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min((backup / n).stat().st_mtime for n in restored)))
    say(f"note: Ray's saved state {', '.join(damaged)} in {folder} was empty or cut off (a full disk?); "
        f"restored the last good copy, saved {when}: trials that ran after it restart from their checkpoints")
    return damaged


def _session(name: str) -> str | None:
    """The run (Ray's session) a state file belongs to: ``experiment_state-<session>.json`` and its siblings."""
    for prefix in ("experiment_state-", "search_gen_state-", "searcher-state-"):
        if name.startswith(prefix):
            return name[len(prefix):].rsplit(".", 1)[0]
    return None  # tuner.pkl: one for every session


def _fall_back_a_session(folder: StudyFolder, damaged: list[str], say) -> bool:
    """Set aside the state of the runs whose files are damaged with no good copy, if an earlier run's state remains.

    Each resume saves its own set; Ray restores the newest. A set damaged before its first backup
    (the disk filled soon after a resume) is moved to ``BACKUP_DIR/damaged-<session>/`` (a rename:
    no room needed), and Ray restores the run before it. Whether that left a set to restore.
    """
    sessions = {_session(n) for n in damaged}
    if None in sessions:
        return False
    names = ray_state_files(folder)
    left = [n for n in names if n.startswith("experiment_state-") and _session(n) not in sessions]
    if not left:
        return False
    for session in sorted(sessions):
        aside = Path(folder.path, BACKUP_DIR, f"damaged-{session}")
        aside.mkdir(parents=True, exist_ok=True)
        for name in names:
            if _session(name) == session:
                os.replace(Path(folder.path, name), aside / name)
    say(f"note: Ray's saved state {', '.join(damaged)} in {folder} was empty or cut off (a full disk?) and had no "
        f"good copy; set aside in {BACKUP_DIR}/, and the state saved by the run before ({max(left)}) is restored: "
        "trials that ran after it restart from their checkpoints")
    return True


def estimated_bytes(study) -> tuple[int, str]:
    """What the study's trials may write: one checkpoint of its largest backbone per trial, and Ray's files."""
    from search.study import sample_space
    from trainables.hparams import DEFAULTS

    try:
        backbones = {({**DEFAULTS, **hp})["backbone"] for hp in sample_space(study)}
    except Exception:  # noqa: BLE001  a space the sampler cannot walk was refused earlier; estimate from a large one
        backbones = set()
    largest = max(backbones or {"?"}, key=lambda b: BACKBONE_PARAMS.get(b, UNKNOWN_BACKBONE_PARAMS))
    per_trial = BACKBONE_PARAMS.get(largest, UNKNOWN_BACKBONE_PARAMS) * BYTES_PER_PARAM + TRIAL_OVERHEAD_BYTES
    return (study.num_samples or OPEN_ENDED_TRIALS) * per_trial, largest


def warn_if_short(study, folder: StudyFolder, say=_print) -> None:
    """A warning at start when the folder's disk has less room than the study's checkpoints may take."""
    free = folder.free_bytes()
    if free is None:
        return
    need, largest = estimated_bytes(study)
    if free < need + LOW_WATER_BYTES:
        trials = study.num_samples or OPEN_ENDED_TRIALS
        counted = f"{trials} trials" if study.num_samples else f"its first {trials} trials, of as many as the time limit allows"
        say(f"warning: this study may write about {need / 1e6:.0f} MB under {folder} ({counted}, "
            f"a checkpoint of up to {(need / trials) / 1e6:.0f} MB each for {largest}), but its disk has "
            f"{free / 1e6:.0f} MB free. When the disk fills, the study stops and can be resumed once space is freed "
            "(or choose another --storage)")
