"""``python -m search.run STUDY_FILE``: run a study on local Ray or a cluster.

Everything that can be wrong with the study file or the data is checked
before Ray starts. If the run fails, the exact command that resumes it is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from search.argtypes import ArgumentParser, non_empty, non_negative_float, non_negative_int, positive_float, positive_int
from search.budget import budget_record, budget_text, stop_reason

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 the legacy reporter stays quiet; ProgressPrinter speaks
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # we checkpoint only on improvement

SMOKE = {"num_samples": 2, "max_epochs": 2, "grace_period": 1}  # --smoke: try a study file in a minute
EXIT_USAGE, EXIT_FAILED = 2, 1
EXIT_INTERRUPTED = 130  # Ctrl+C (SIGINT): 128 + 2, as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM (a batch scheduler, Kubernetes, docker stop): 128 + 15, as those report it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m search.run",
        allow_abbrev=False,  # a misspelt flag is an error, not a guess
        description="Run a hyperparameter study: Optuna TPE proposes, ASHA stops weak trials, Ray Tune schedules.",
        epilog="Example: python -m search.run spaces/quickstart.py --num-samples 8",
    )
    parser.add_argument("study_file", help="a study file, e.g. spaces/quickstart.py")
    parser.add_argument("--num-samples", type=positive_int, help="number of trials (overrides the study)")
    parser.add_argument("--max-epochs", type=positive_int, help="epochs per trial at most (overrides the study)")
    parser.add_argument("--storage", type=non_empty, default="runs",
                        help="results folder; one subfolder per study (default: ./runs)")
    parser.add_argument("--address", type=non_empty,
                        help="an existing Ray cluster, e.g. 'auto' or 'ray://head:10001' (default: start local Ray)")
    parser.add_argument("--data-dir", type=non_empty, help="dataset location (overrides the study's dataset path)")
    parser.add_argument("--weights-dir", type=non_empty,
                        help="folder of official Keras ImageNet weight files, for offline machines")
    parser.add_argument("--seed", type=non_negative_int, help="seed for the sampler and trials (overrides the study)")
    parser.add_argument("--cpus-per-trial", type=positive_float, help="CPUs each trial reserves (overrides the study)")
    parser.add_argument("--gpus-per-trial", type=non_negative_float,
                        help="GPUs each trial reserves, e.g. 0.25 or 0 for CPU only (overrides the study)")
    parser.add_argument("--max-concurrent", type=positive_int, help="trials running at once (overrides the study)")
    parser.add_argument("--cv-folds", type=positive_int, metavar="K",
                        help="select by K-fold cross-validation on train+val: each trial trains K models and reports "
                        "their mean; 1 = one validation split (overrides the study)")
    parser.add_argument("--no-activation-cache", dest="activation_cache", action="store_false", default=None,
                        help="run frozen backbones on every image every epoch, instead of training on cached features")
    parser.add_argument("--no-near-duplicates", dest="near_duplicates", action="store_false", default=None,
                        help="skip the leakage audit (near-duplicate images across splits), which runs before "
                        "every study: a forward pass of efficientnet_lite0 over the images, once per image set")
    parser.add_argument("--warm-start", type=non_empty, metavar="RUN_DIR",
                        help="seed the searcher with a finished study's trials that fit this study (its results "
                        "folder, e.g. runs/first; overrides the study's warm_start)")
    parser.add_argument("--name", type=non_empty, help="results folder name under --storage (default: the study's name; "
                        "a completed study there gets a numbered new folder, NAME-2, NAME-3, ...)")
    parser.add_argument("--resume", action="store_true", help="continue the study's earlier run in --storage")
    parser.add_argument("--force", action="store_true", help="with --resume: resume even if the study file changed")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget and data subset, to try a study file quickly")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable images out (they are counted and listed) instead of stopping")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the trials' own logs")
    parser.add_argument("--mlflow-uri", type=non_empty, metavar="URI",
                        help="also log each trial as an MLflow run there, e.g. file:///path/mlruns, sqlite:///mlflow.db "
                        "or http://host:5000 (needs: pip install 'medsearch[mlflow]')")
    return parser.parse_args(argv)


# Flags that define the search. Recorded in study.json when a study starts and re-applied by --resume;
# giving one again with another value is refused, since the restored searcher and ASHA keep the old one.
SEARCH_FLAGS = ("num_samples", "max_epochs", "seed", "data_dir", "smoke", "skip_corrupt", "activation_cache",
                "cv_folds", "near_duplicates", "warm_start")
# Switches that default to on: recorded when given (off), unlike the others, which are recorded when on.
_OFF_SWITCHES = ("activation_cache", "near_duplicates")
# Flags that say where and with what it runs: recorded and re-applied too, but a resume may change them.
RESOURCE_FLAGS = ("weights_dir", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "mlflow_uri")


def given_flags(args) -> dict:
    """The recordable flags given on this command line (a switch only when it is on)."""
    given = {}
    for name in SEARCH_FLAGS + RESOURCE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value is not False or (name in _OFF_SWITCHES and value is False):
            given[name] = value
    return given


def with_recorded_flags(args, record: dict):
    """``args`` for --resume: the flags the study started with, unless this command gives them again.

    A search flag given with another value than it started with is refused, showing the difference.
    """
    from search.study import StudyError

    recorded = record.get("flags")
    if recorded is None:  # a folder written before flags were recorded: the command line is all there is
        return args
    given = given_flags(args)
    conflicts = [f"{_flag(name)}: the study started with {_shown(recorded.get(name))}, "
                 f"this command gives {_shown(given[name])}"
                 for name in SEARCH_FLAGS if name in given and given[name] != recorded.get(name)]
    if conflicts:
        raise StudyError("--resume continues the study as it started, and these flags would change it:\n  "
                         + "\n  ".join(conflicts)
                         + "\nLeave them out (the resume re-applies the flags recorded in study.json), "
                         "or start a new study (another --storage).")
    merged = dict(vars(args))
    merged.update({name: value for name, value in recorded.items() if name not in given})
    return argparse.Namespace(**merged)


def _flag(name: str) -> str:
    """The flag as typed: ``--no-activation-cache`` for a switch that is on by default."""
    return f"--{'no-' if name in _OFF_SWITCHES else ''}{name.replace('_', '-')}"


def _shown(value) -> str:
    return "no such flag" if value is None else repr(value)


def apply_overrides(study, args):
    """The study with the command line's overrides, validated again."""
    changes = {}
    if args.smoke:
        changes.update(SMOKE)
    for field in ("num_samples", "max_epochs", "seed", "weights_dir", "cpus_per_trial", "gpus_per_trial",
                  "max_concurrent", "activation_cache", "cv_folds", "warm_start"):
        value = getattr(args, field, None)  # cv_folds, warm_start: absent from a Namespace recorded before them
        if value is not None:
            changes[field] = value
    if getattr(args, "near_duplicates", None) is False:  # --no-near-duplicates (absent from older recorded flags)
        changes["dataset"] = dataclasses.replace(study.dataset, near_duplicates=False)
    if changes.get("max_epochs") is not None and study.grace_period > changes["max_epochs"]:
        changes["grace_period"] = changes["max_epochs"]
    return dataclasses.replace(study, **changes) if changes else study


def resume_command(args) -> str:
    """The command that continues this run. The search's flags are in study.json, so only where it runs is given."""
    if args.study_file is None:  # a Study built in code, run through search.run_study
        where = "".join(f", {flag}={getattr(args, flag)!r}" for flag in ("name", "address", "data_dir") if getattr(args, flag, None))
        return f"run_study(<the same Study>, storage={args.storage!r}, resume=True{where})"
    parts = ["python", "-m", "search.run", args.study_file, "--storage", args.storage, "--resume"]
    for flag in ("name", "address", "data_dir"):  # data_dir: the data may sit elsewhere on the machine that resumes
        if getattr(args, flag, None) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join(parts)


class StudyInterrupted(Exception):
    """The run stopped before the study ended (Ctrl+C, SIGTERM); the message says how to resume it."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name  # "SIGTERM", or None for Ctrl+C


_RECEIVED: dict[str, str | None] = {"signal": None}  # the signal that stopped this run: its exit code and message


def _on_sigterm(signum, frame) -> None:
    """SIGTERM stops the run as Ctrl+C does: trials stopped and marked interrupted, Ray's state saved, resumable.

    Without this, the handler ``ray.init`` installs (Ray's native one) aborts the driver with a
    stack dump (exit 134), recording nothing. While the tuner runs, SIGINT's handler is Ray Tune's
    (stop the trials, save, return); otherwise it is Python's, which raises KeyboardInterrupt.
    """
    _RECEIVED["signal"] = "SIGTERM"
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored or default: still stop
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def catch_sigterm():
    """Route SIGTERM to ``_on_sigterm``; returns the handler it replaced (None off the main thread, where
    Python cannot set one). Called again after ``ray.init``, which installs its own."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


class StudyDiskFull(Exception):
    """The disk holding the results folder filled during the run; the message says where, and how to resume."""


class StudyFailed(Exception):
    """Ray Tune failed, or every trial failed; the message says why (and how to resume, where that helps)."""


def usage_errors() -> tuple[type[Exception], ...]:
    """What is wrong with the study, its data, its storage or its weights: found before Ray starts."""
    from search.storage import StorageError
    from search.study import StudyError
    from trainables.datasets import DatasetError
    from trainables.weights import WeightsUnavailableError

    return StudyError, StorageError, DatasetError, WeightsUnavailableError


def main(argv: list[str] | None = None) -> int:
    """The command line: ``execute`` with its exceptions turned into messages and exit codes."""
    args = parse_args(argv)
    try:
        execute(args)
    except usage_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StudyInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_TERMINATED if exc.signal_name == "SIGTERM" else EXIT_INTERRUPTED
    except (StudyFailed, StudyDiskFull) as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # while the study file loaded: nothing was written yet
        print("\ninterrupted before the study started; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED if _RECEIVED["signal"] == "SIGTERM" else EXIT_INTERRUPTED
    return 0


def execute(args, study=None, callbacks: tuple = (), deadline: float | None = None):
    """Run (or resume) the study that ``args`` names, or ``study`` if given; return its ``StudyFolder``.

    Raises the ``usage_errors()`` before Ray starts, ``StudyInterrupted`` or ``StudyFailed`` after.
    ``callbacks`` are extra Ray Tune callbacks and ``deadline`` a wall-clock time (``time.time()``) after
    which no trial starts (the Python API's seams, e.g. for benchmarks).
    """
    from search.folder_lock import RUN_LOCK, FolderLock
    from search.storage import StudyFolder, is_disk_full
    from search.study import load_study

    previous_sigterm = catch_sigterm()
    try:
        study = study if study is not None else load_study(args.study_file)
        requested = StudyFolder(args.storage, args.name or study.name)
        lock = take_run_lock(requested, args)  # before check_folder judges what the folder holds
        try:
            folder, args = check_folder(requested, args)
            if folder.path != requested.path:  # a completed study there: this run writes a numbered folder
                lock.release()
                lock = FolderLock(folder, RUN_LOCK)
                lock.acquire()
            try:
                return _execute(args, study, folder, callbacks, deadline)
            except KeyboardInterrupt:  # outside Ray Tune's own handling: data loading, Ray's start, the summary
                raise interrupted(folder, args) from None
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, folder, args) from exc
                raise
        finally:
            lock.release()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def take_run_lock(folder, args):
    """The driver's lock on ``folder``: one driver per results folder (see ``search.folder_lock``).

    A folder holding a completed study, run again without ``--resume``, is left alone (the run
    writes a numbered folder), so its lock is not taken: an evaluation may be using it.
    """
    from search.folder_lock import RUN_LOCK, FolderLock

    if folder.exists("study.json") and not args.resume and not args.name and _outcome(folder) == "completed":
        return FolderLock(folder, RUN_LOCK)  # not acquired: releasing it does nothing
    check_storage(folder)  # an unwritable --storage gets its named error, not the lock's
    lock = FolderLock(folder, RUN_LOCK)
    lock.acquire()
    return lock


def interrupted(folder, args) -> StudyInterrupted:
    """The interruption recorded in study.json (unless the study had completed) and how to resume."""
    received = _RECEIVED["signal"]
    if folder.exists("study.json") and _outcome(folder) != "completed":
        record_outcome_if_room(folder, "interrupted")
    return StudyInterrupted(f"interrupted{f' ({received})' if received else ''}; finished trials are kept in "
                            f"{folder}. Resume with:\n  {resume_command(args)}", received)


def disk_full(exc: OSError, folder, args) -> StudyDiskFull:
    """The full disk named, the outcome recorded if there is room for it, and how to resume once there is."""
    from search.storage import DiskFullError

    reason = exc.strerror if isinstance(exc, DiskFullError) else (
        f"the disk holding {str(folder)!r} is full ({exc.strerror or exc}); free space there or move the folder "
        "to a larger disk")
    recorded = record_outcome_if_room(folder, "failed", error=f"disk full: {reason}")
    return StudyDiskFull(
        f"the study stopped: {reason}.\nFinished trials are kept in {folder}, and the run can be resumed; "
        + ("study.json records outcome 'failed'." if recorded else
           "study.json could not record the outcome (no room left), which --resume does not need.")
        + f"\nOnce there is room, resume with:\n  {resume_command(args)}")


def _execute(args, study, folder, callbacks, deadline):
    from search.disk_guard import repair_ray_state, warn_if_short
    from search.study import file_hash
    from search.weights import study_weight_files

    if folder.name != study.name:  # Ray's experiment, the records and the folder share one name
        study = dataclasses.replace(study, name=folder.name)
    if args.resume:
        if not args.force and args.study_file is not None:
            check_study_unchanged(folder, Path(args.study_file))
        args = with_recorded_flags(args, json.loads(folder.read_text("study.json")))
    study = apply_overrides(study, args)
    check_storage(folder)
    warn_if_short(study, folder)
    if args.resume:
        repair_ray_state(folder)  # an empty state file (a full disk) would make Ray start the experiment anew
    if getattr(args, "mlflow_uri", None):  # given, or recorded and re-applied by --resume
        from search.dashboards import check_mlflow

        check_mlflow(args.mlflow_uri)
    if args.address:
        check_address(args.address)
    weights, random_init = study_weight_files(study, smoke=args.smoke)
    warm = None
    if study.warm_start is not None and not args.resume:  # a resumed searcher is restored with what it took
        from search.warm_start import warm_trials

        warm = warm_trials(study.warm_start, study)
        print(warm.summary(), flush=True)
    prepared = prepare(study, args, folder)
    study_hash = file_hash(args.study_file) if args.study_file is not None else None
    write_study_json(study, args, folder, study_hash, warm=warm,
                     skipped=list(zip(prepared.names([p for p, _ in prepared.skipped]), [w for _, w in prepared.skipped])))
    run_tuner(study, args, folder, prepared, weights, random_init, callbacks=callbacks, deadline=deadline, warm=warm)
    return folder


def check_folder(folder, args):
    """``(folder, args)`` after checking that the folder holds what ``--resume`` says, or nothing without it.

    Without ``--resume`` or ``--name``, a folder holding a *completed* study is left alone and the run gets
    the next free numbered folder (``quickstart-2``), so a command can be run again; an unfinished study
    there is refused, since it is probably meant to be resumed. A run that stopped after writing
    study.json but before Ray Tune saved any state ran no trial: ``--resume`` starts it again.
    """
    from search.storage import StudyFolder
    from search.study import StudyError

    started = folder.exists("study.json")
    if started and not args.resume:
        outcome = _outcome(folder)
        if outcome != "completed" or args.name:
            raise StudyError(f"results folder {str(folder)!r} already holds this study (outcome: {outcome}); add "
                             "--resume to continue it, or use another --storage or --name")
        number = 2
        while StudyFolder(folder.storage, f"{folder.name}-{number}").exists("study.json"):
            number += 1
        fresh = StudyFolder(folder.storage, f"{folder.name}-{number}")
        print(f"note: {folder} holds a completed run of this study; this run writes {fresh} "
              f"(--resume continues a run; --name picks the folder)", flush=True)
        return fresh, argparse.Namespace(**{**vars(args), "name": fresh.name})
    if args.resume and not folder.exists("tuner.pkl"):
        if not started:
            raise StudyError(f"nothing to resume in {str(folder)!r}; run without --resume to start the study")
        print(f"note: the earlier run in {folder} stopped before its first trial; starting the study again", flush=True)
        return folder, argparse.Namespace(**{**vars(with_recorded_flags(args, json.loads(folder.read_text("study.json")))),
                                             "resume": False, "restarted": True})
    return folder, args


def _outcome(folder) -> str:
    try:
        return json.loads(folder.read_text("study.json")).get("outcome", "running or stopped")
    except (OSError, ValueError):
        return "unreadable study.json"


def check_study_unchanged(folder, study_file: Path) -> None:
    """A resumed search must be the search that started: refuse an edited study file, showing the edit."""
    import difflib

    from search.study import StudyError, file_hash

    record = json.loads(folder.read_text("study.json"))
    if record.get("study_file_sha256") in (None, file_hash(study_file)):
        return
    old = folder.read_text("study_file.py").splitlines() if folder.exists("study_file.py") else []
    diff = "\n".join(difflib.unified_diff(old, study_file.read_text().splitlines(), "study file at the start",
                                          str(study_file), lineterm="", n=1))
    raise StudyError(f"{study_file} changed since this study started, so resuming would mix two searches:\n"
                     f"{diff or '(the original text was not saved)'}\n"
                     "Undo the change, start a new study (another name or --storage), or add --force to resume anyway.")


def check_storage(folder, min_free_bytes: int = 200_000_000) -> None:
    """Fail now, not hours in, if results cannot be written: the folder must be writable with room to spare."""
    from search.study import StudyError

    probe = f".write-test-{os.getpid()}"
    try:
        folder.mkdir()
        folder.write_bytes(probe, b"ok")
        folder.delete(probe)
    except OSError as exc:  # pyarrow raises OSError too: no bucket, no credentials, access denied
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise StudyError(f"cannot write results to {str(folder)!r}: {reason}; choose a writable --storage"
                         + ("" if folder.is_local else " (and check the bucket exists and your credentials)")) from exc
    free = folder.free_bytes()
    if free is not None and free < min_free_bytes:
        raise StudyError(f"only {free / 1e6:.0f} MB free under {str(folder)!r}; checkpoints need more. "
                         "Free some space or choose another --storage")


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """An unreachable cluster fails in seconds with its address, instead of Ray retrying for minutes."""
    import socket

    from search.study import StudyError

    if address == "auto":
        return  # Ray finds a local cluster's address itself, and says at once when there is none
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise StudyError(f"cannot reach the Ray cluster at --address {address!r} ({exc.strerror or exc}) "
                         f"within {timeout_s:g} s. Check that the head node is up (ray status there) and that "
                         "this machine may connect to that port; omit --address to run on a local Ray.") from exc


def prepare(study, args, folder):
    from search.prepare import prepare_data, write_near_duplicates, write_splits

    started = time.monotonic()
    print(f"study {study.name}: loading {study.dataset.loader} data at {study.dataset.image_size} px ...", flush=True)
    prepared = prepare_data(study, data_dir=args.data_dir, smoke=args.smoke, skip_corrupt=args.skip_corrupt)
    write_splits(prepared, folder)
    counts = prepared.splits["split"].value_counts().to_dict()
    print(f"  classes {prepared.class_names}; images per split {counts}; "
          f"{time.monotonic() - started:.1f} s (test split not loaded)", flush=True)
    if prepared.skipped:
        listed = ", ".join(f"{Path(p).name} ({why})" for p, why in prepared.skipped[:5])
        more = f" and {len(prepared.skipped) - 5} more" if len(prepared.skipped) > 5 else ""
        print(f"  skipped {len(prepared.skipped)} unreadable image(s) (--skip-corrupt): {listed}{more}; "
              "all are listed in study.json", flush=True)
    if prepared.rotated:
        from trainables.data import rotated_note

        print(f"  {rotated_note(prepared.rotated)}", flush=True)
    report_duplicates(prepared, folder)
    if prepared.near_duplicates is not None:  # the leakage audit (Dataset.near_duplicates): one line and its file
        write_near_duplicates(prepared, folder)
        print(f"  {prepared.near_duplicates.summary(prepared.splits)}", flush=True)
    return prepared


def report_duplicates(prepared, folder) -> None:
    """Byte-identical images inflate scores when copies land in different splits: say so, and list them."""
    pairs = prepared.duplicates
    if pairs is None or pairs.empty:
        return
    pairs = pairs.assign(**{c: prepared.names(pairs[c]) for c in ("path_a", "path_b") if c in pairs})
    folder.write_parquet("duplicates.parquet", pairs)
    crossing = int(pairs["cross_split"].sum())
    conflicting = int((~pairs["same_label"]).sum())
    print(f"  warning: {len(pairs)} pair(s) of identical image files, {crossing} across splits, "
          f"{conflicting} with different labels; listed in duplicates.parquet", flush=True)


def write_study_json(study, args, folder, study_hash: str, skipped=(), warm=None) -> None:
    from importlib import metadata

    versions = {}
    for package in ("ray", "optuna", "tensorflow", "keras", "numpy", "scikit-learn", "pandas", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        # not "source": that is the study file resolved, a place on this machine; study_file has it as typed
        "study": {k: v for k, v in dataclasses.asdict(study).items() if k not in ("space", "source")},
        # as typed, not resolved: the folder names no place on the machine it did not need (its copy is study_file.py)
        "study_file": args.study_file,
        "study_file_sha256": study_hash,
        "command": shlex.join(["python", "-m", "search.run", *sys.argv[1:]]),  # the interpreter: "python" above
        "smoke": args.smoke,
        "flags": given_flags(args),  # what --resume re-applies
        "skipped_images": [{"path": p, "reason": why} for p, why in skipped],
        "started_at": datetime.now(timezone.utc).isoformat(),
        "python": platform.python_version(),
        "versions": versions,
    }
    if warm is not None:
        record["warm_start"] = {"from": warm.source, "taken": len(warm.trials), "left_out": warm.left_out,
                                "examples": warm.examples}
    restarted = getattr(args, "restarted", False)
    if args.study_file is not None and (restarted or not folder.exists("study_file.py")):  # a resume compares with it
        folder.write_bytes("study_file.py", Path(args.study_file).read_bytes())
    if folder.exists("study.json") and not restarted:  # a resume keeps the original record
        old = json.loads(folder.read_text("study.json"))
        old.setdefault("resumed_at", []).append(record["started_at"])
        record = old
    _write_json(folder, record)


def run_tuner(study, args, folder, prepared, weights: list[Path], random_init: tuple[str, ...] = (),
              callbacks: tuple = (), deadline: float | None = None, warm=None) -> None:
    """Start Ray, run the tuner, record the outcome and print the summary; raise if the study did not end.

    ``deadline``: the search's time limit becomes what is left until then when the Tuner is made (Ray
    counts its ``time_budget_s`` from ``Tuner.fit``), so data loading and Ray's start count against it.
    """
    import pandas as pd
    import ray

    from search.disk_guard import DiskGuard
    from search.local_ray import local_ray_options
    from search.study import StudyError, cv_folds
    from search.tuner import make_tuner, space_exhausted, worker_env
    from trainables.train import TrialSettings
    from trainables.weights import pack_weights

    settings = TrialSettings(
        max_epochs=study.max_epochs,
        metric=study.metric,
        mode=study.mode,
        class_names=tuple(prepared.class_names),
        positive=prepared.positive,
        seed=study.seed,
        cpus=study.cpus_per_trial,
        weights_dir=study.weights_dir,
        random_init=random_init,
        activation_cache=study.activation_cache,
        augment_views=study.augment_views,
        mixed_precision=study.mixed_precision,
        cv_folds=cv_folds(study),
    )
    env = {"env_vars": worker_env()}
    with local_ray_options(args.address) as local:  # a local Ray listens on 127.0.0.1 only
        context = ray.init(address=args.address, log_to_driver=args.verbose, runtime_env=env,
                           configure_logging=args.verbose, logging_level="INFO" if args.verbose else "ERROR", **local)
    catch_sigterm()  # ray.init installed Ray's own SIGTERM handler, which aborts the driver
    guard = DiskGuard(folder)
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        print(f"Ray dashboard: http://{dashboard}", flush=True)
    try:
        study = fit_resources(study, ray.cluster_resources(), local=args.address is None, smoke=args.smoke)
        settings = dataclasses.replace(settings, cpus=study.cpus_per_trial)
    except StudyError:
        ray.shutdown()
        guard.release_reserve()
        raise
    tuner = None
    try:
        if weights:
            print(f"shipping ImageNet weights to the trials: {', '.join(p.name for p in weights)}", flush=True)
        if deadline is not None:  # run_end below judges the run by this same limit
            left = max(1.0, deadline - time.time())
            study = dataclasses.replace(study, time_limit_s=min(left, study.time_limit_s or math.inf))
        tuner = make_tuner(study, folder=folder, data=prepared.arrays, settings=settings,
                           weights_files=pack_weights(weights), resume=args.resume, callbacks=(guard, *callbacks),
                           mlflow_uri=getattr(args, "mlflow_uri", None), warm=warm)
        callbacks_run = tuner._local_tuner._run_config.callbacks  # noqa: SLF001 (those Tune calls, in order)
        callbacks_run.insert(0, callbacks_run.pop(callbacks_run.index(guard)))  # sees a full disk before any write
        fit_started = time.monotonic()
        results = tuner.fit()
        if guard.full is not None:  # it stopped the study as Ctrl+C does: Ray's state saved, trials marked interrupted
            raise guard.full
        board = folder.read_parquet("leaderboard.parquet") if folder.exists("leaderboard.parquet") else pd.DataFrame()
        end = run_end(study, board, time.monotonic() - fit_started, space_exhausted=space_exhausted(tuner))
        if end["stopped_because"] is None:
            raise KeyboardInterrupt  # Ray Tune caught Ctrl+C, saved its state and returned early
    except KeyboardInterrupt:
        raise interrupted(folder, args) from None
    except Exception as exc:
        full = disk_full_cause(exc)
        if full is not None:  # execute says so, once the last records are written into the reserve
            guard.release_reserve()
            flush_leaderboard(tuner)
            raise full from exc
        record_outcome(folder, "failed")
        if args.verbose:
            traceback.print_exc()
        raise StudyFailed(f"the study failed: {type(exc).__name__}: {exc}\nResume with:\n  {resume_command(args)}") from exc
    finally:
        if args.address is None:
            ray.shutdown()
        guard.release_reserve()
    record_outcome(folder, "completed", **end)
    summarise(study, folder, results)
    print(budget_text(end, study.num_samples, study.time_limit_s), flush=True)


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc`` (Ray Tune re-raises a callback's error, or wraps it), if any."""
    from search.storage import is_disk_full

    seen = set()
    while exc is not None and id(exc) not in seen:
        if is_disk_full(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def flush_leaderboard(tuner) -> None:
    """The leaderboard's last state (trials still running marked ``interrupted``), if there is room for it.

    Ray Tune ends the experiment's callbacks when a callback raises; the leaderboard's own final write
    may have been what hit the full disk, so it is tried again once the reserve is free.
    """
    from search.results import LeaderboardWriter

    run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)  # the Tuner's callbacks
    for callback in getattr(run_config, "callbacks", None) or []:
        if isinstance(callback, LeaderboardWriter):
            try:
                callback.on_experiment_end(trials=[])
            except OSError:
                pass  # still no room: the last leaderboard written stays, whole


def run_end(study, board, elapsed_s: float, space_exhausted: bool = False) -> dict:
    """How ``Tuner.fit`` ended, judged by the leaderboard ``board``: ``search.budget.budget_record``'s fields,
    with ``stopped_because`` None when it returned before the study's end.

    On SIGINT Ray Tune stops its trials and returns normally; its ResultGrid then
    calls the stopped trials TERMINATED, but the leaderboard marks them ``interrupted``.
    """
    cut_off = "status" in board.columns and bool((board["status"] == "interrupted").any())
    reason = stop_reason(study, len(board), elapsed_s, space_exhausted=space_exhausted, cut_off=cut_off)
    return budget_record(study, len(board), elapsed_s, reason)


def record_outcome(folder, outcome: str, **extra) -> None:
    """``finished_at`` and ``outcome`` in study.json: how a report tells finished results from partial ones."""
    record = json.loads(folder.read_text("study.json"))
    record.update(finished_at=datetime.now(timezone.utc).isoformat(), outcome=outcome, **extra)
    _write_json(folder, record)


def record_outcome_if_room(folder, outcome: str, **extra) -> bool:
    """``record_outcome``, unless the disk has no room for it (study.json keeps its last whole version)."""
    try:
        record = json.loads(folder.read_text("study.json"))
        record.update(finished_at=datetime.now(timezone.utc).isoformat(), outcome=outcome, **extra)
        _write_json(folder, record)
    except OSError:
        return False
    return True


def _write_json(folder, record: dict) -> None:
    folder.write_text("study.json", json.dumps(record, indent=2, default=str))  # atomic: see search.storage


def fit_resources(study, available: dict, *, local: bool, smoke: bool):
    """Refuse a per-trial request the cluster can never meet: Ray Tune would wait for it forever.

    ``--smoke`` shrinks the request to fit instead. On a cluster (``--address``)
    an autoscaler may still add nodes, so a shortfall there is a warning.
    """
    from search.study import StudyError

    cpus, gpus = available.get("CPU", 0), available.get("GPU", 0)
    short = []
    if study.cpus_per_trial > cpus:
        short.append(f"{study.cpus_per_trial:g} CPUs per trial but Ray has {cpus:g} (--cpus-per-trial {max(1, int(cpus))})")
    if study.gpus_per_trial > gpus:
        short.append(f"{study.gpus_per_trial:g} GPUs per trial but Ray has {gpus:g} (--gpus-per-trial {gpus:g})")
    if not short:
        return study
    if smoke:
        print(f"  smoke: shrinking the trial's request to fit this machine: {'; '.join(short)}", flush=True)
        return dataclasses.replace(study, cpus_per_trial=min(study.cpus_per_trial, max(cpus, 1)),
                                  gpus_per_trial=min(study.gpus_per_trial, gpus))
    message = f"the study asks {'; and '.join(short)}: no trial could ever start."
    if not local:
        print(f"warning: {message} Waiting for the autoscaler to add nodes.", file=sys.stderr, flush=True)
        return study
    raise StudyError(f"{message} Override as shown in brackets, or run on a cluster with --address.")


def summarise(study, folder, results) -> None:
    import pandas as pd

    board = folder.read_parquet("leaderboard.parquet")
    print()
    print(format_leaderboard(board, study.metric))
    print(f"\nresults: {folder}\n  leaderboard: {folder.uri('leaderboard.parquet')}\n  leaderboard.parquet  epochs.parquet  splits.parquet  study.json")
    report_unreported(board)
    from search.progress import next_steps, selection_note

    note = selection_note(folder, board, study.metric)
    if note:
        print("\n" + note)
    if board.empty or board["status"].isin(["errored", "diverged"]).all():
        reasons = board.get("error", pd.Series(index=board.index, dtype=object)).astype(object)
        reasons[board["status"] == "diverged"] = "diverged: the training loss became NaN or inf"
        counts = "\n".join(f"  {count} x {error}" for error, count in reasons.value_counts().items())
        raise StudyFailed(f"every trial failed:\n{counts}")
    print("\n" + "\n".join(next_steps(folder)), flush=True)


def report_unreported(board) -> None:
    """Trials that ended before reporting an epoch hold no result: count and name them, never leave them out."""
    if board.empty or "status" not in board.columns:
        return
    epochs = board["epochs"] if "epochs" in board.columns else None
    never = board[(board["status"] == "errored") & (epochs.isna() | (epochs == 0) if epochs is not None else True)]
    if never.empty:
        return
    print(f"\nnote: {len(never)} trial(s) ended before their first report (status errored, no epochs):", file=sys.stderr)
    for row in never.itertuples():
        print(f"  {row.trial_name}: {getattr(row, 'error', None) or 'unknown error'}", file=sys.stderr)


def format_leaderboard(board, metric: str, top: int = 20) -> str:
    columns = ["trial_name", "status", "epochs", f"best_{metric}", "backbone", "learning_rate", "unfreeze",
               "dropout", "augment", "wall_time_s"]
    shown = board[[c for c in columns if c in board.columns]].head(top)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


if __name__ == "__main__":
    sys.exit(main())
