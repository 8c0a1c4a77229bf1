"""Chaos, measured: SIGKILL a study's driver at seeded random moments, resume each time, and count what was lost.

    python benchmarks/chaos.py                    # 7 driver kills + 1 worker kill, seed 0 (5-9 min on 2 shared CPU cores)
    python benchmarks/chaos.py --seed 3 --kills 10

Runs a small study (``tests/fixtures/studies.py:TINY_STUDY``: tiny CNNs on
generated data) through ``python -m search.run`` and SIGKILLs the driver at
moments found by watching its output and its results folder, each plus a
random delay:

- ``data preparation``: after it prints ``loading``;
- ``Ray start-up``: after the data is ready, while Ray and the Tuner start;
- ``first trial``: after the driver's next ``start`` line (a resumed driver's first is a restored trial);
- ``checkpoint write``: when a new ``checkpoint_*`` folder appears in a trial's folder;
- ``between trials``: after a ``finished`` or ``stopped`` line;
- ``study end``: once every trial has ended on the leaderboard, before the outcome is recorded;
- ``final summary``: when the leaderboard table starts printing.

Two more faults, with ``--sigterms N`` and ``--disk-fills N``: the driver is sent
SIGTERM (what a batch scheduler sends) at a seeded moment and must stop as Ctrl+C
does, with exit 143, the resume command printed and no native stack dump; and the
results folder's disk (a tmpfs mounted for the run; skipped where mounting needs
root) is filled with ``dd`` while trials run, the driver must stop with its named
error and exit 1, and the space is freed before the next resume.

After a kill, whatever the driver's session left running (Ray's GCS, raylet,
workers) is killed too, as when a machine's session ends, and the study is
resumed as a user would: the same command plus ``--resume`` (where that is
refused, the command the refusal advises). Once, a Ray worker running a trial
is SIGKILLed instead; Ray must retry the trial (``Study.max_failures``).

After every step: the leaderboard and the epoch table are readable, every trial
appears once, no (trial, epoch) row twice, no more than ``num_samples`` trials,
and every trial seen ended is still there with at least its epochs. At the end:
exactly ``num_samples`` trials, all ended, ``outcome: completed`` in study.json.
While a driver runs, the leaderboard is also read every half second.

Ray keeps its files in a folder of this run's own (``RAY_TMPDIR``): a local
``ray.init`` otherwise joins whatever cluster ``ray start`` or a test's
``ray.cluster_utils.Cluster`` registered in /tmp/ray, and a chaos run sharing a
machine with one died with that cluster instead of by its own kills.

The schedule (moments, delays, where the worker kill goes) follows from
``--seed``, which also seeds the study; the instant a kill lands depends on the
machine's timing, so the table records what each kill interrupted.
Writes ``chaos.json`` and ``chaos.md`` to ``--out``; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # the Driver fixture and the tiny study are the e2e tests'

from fixtures.driver import Driver, kill_session, read_board, session_processes, trial_workers  # noqa: E402
from fixtures.studies import TINY_STUDY  # noqa: E402

ENDED = ("finished", "stopped")  # the statuses a trial may end with here: ran every epoch, or ASHA stopped it
POLL_S = 0.02  # a checkpoint folder or an output line is seen within this
BOARD_READ_EVERY_S = 0.5
STEP_TIMEOUT_S = 300.0
RETRY_TIMEOUT_S = 120.0
RAY_EXIT_S = 5.0  # how long Ray's processes get to end on their own after their driver is killed
WORKER_MOMENT = "trial running"
SIGTERM_EXIT_S = 180.0  # a SIGTERMed driver stops its trials and saves Ray's state before it exits
EXIT_TERMINATED = 143  # search.run's exit code after SIGTERM (README: The command line)
NATIVE_DUMP = ("*** SIGTERM received", "PC: @")  # what Ray's own SIGTERM handler printed as it aborted the driver
DISK_SIZE = "300m"  # the tmpfs holding --storage when a disk fill is scheduled
DISK_MOMENTS = ["first trial", "checkpoint write", "between trials"]  # trials still write then
OUT = ROOT / "benchmarks/results/chaos"


@dataclass
class Watch:
    """What a step sees: the driver's output since the step began, and the study folder."""

    driver: Driver
    folder: Path
    num_samples: int
    first_line: int = 0
    checkpoints: frozenset = frozenset()

    def lines(self) -> list[str]:
        return self.driver.lines[self.first_line:]


@dataclass(frozen=True)
class Moment:
    name: str
    delay_s: tuple[float, float]  # the kill comes this long after the trigger (a seeded draw)
    trigger: Callable[[Watch], str | None]  # what fired, or None while waiting


def printed(*texts: str) -> Callable[[Watch], str | None]:
    def trigger(watch: Watch) -> str | None:
        return next((line.strip() for line in watch.lines() if any(t in line for t in texts)), None)
    return trigger


def checkpoint_folders(folder: Path) -> frozenset:
    return frozenset(str(p.relative_to(folder)) for p in folder.glob("trial_*/checkpoint_*"))


def new_checkpoint(watch: Watch) -> str | None:
    new = sorted(checkpoint_folders(watch.folder) - watch.checkpoints)
    return f"{new[0]} appeared" if new else None


def every_trial_ended(watch: Watch) -> str | None:
    board = _board_or_none(watch.folder)
    if board is None or len(board) < watch.num_samples or not board["status"].isin([*ENDED, "errored", "diverged"]).all():
        return None
    return f"{len(board)} trials ended on the leaderboard"


MOMENTS = {m.name: m for m in [
    Moment("data preparation", (0.0, 0.15), printed(": loading ")),
    Moment("Ray start-up", (0.5, 4.0), printed("  classes [")),
    Moment("first trial", (0.0, 2.0), printed("] start ")),
    Moment("checkpoint write", (0.0, 0.05), new_checkpoint),
    Moment("between trials", (0.0, 0.3), printed("] finished ", "] stopped ")),
    Moment("study end", (0.0, 1.5), every_trial_ended),
    Moment("final summary", (0.0, 0.0), printed("trial_name ")),  # the table's header line
    Moment(WORKER_MOMENT, (0.2, 1.5), printed("] start ")),  # then a worker inside a trial is killed
]}
ISSUE_MOMENTS = ["data preparation", "first trial", "checkpoint write", "between trials", "final summary"]  # issue 13.6
MID = ["data preparation", "Ray start-up", "first trial", "checkpoint write", "between trials"]  # may repeat
LAST = ["study end", "final summary"]  # once each, in this order, after the rest: the study must be over by then


@dataclass
class Step:
    target: str  # "driver" (SIGKILL), "sigterm" (SIGTERM to the driver), "worker" (SIGKILL) or "disk" (filled)
    moment: str
    delay_s: float = 0.0


def make_schedule(kills: int, seed: int, worker_kill: bool = True, sigterms: int = 0,
                  disk_fills: int = 0) -> list[Step]:
    """``kills`` driver kills (the issue's five moments first, then every moment once, then any that may repeat),
    and ``sigterms`` SIGTERMs and ``disk_fills`` full disks at seeded moments among them, all before the last ones."""
    rng = random.Random(seed)
    names = (ISSUE_MOMENTS + [m for m in MID + LAST if m not in ISSUE_MOMENTS])[:kills]
    names += [rng.choice(MID) for _ in range(kills - len(names))]
    middle = [Step("driver", n) for n in names if n not in LAST]
    middle += [Step("sigterm", rng.choice(MID)) for _ in range(sigterms)]
    middle += [Step("disk", rng.choice(DISK_MOMENTS)) for _ in range(disk_fills)]
    rng.shuffle(middle)
    steps = middle + [Step("driver", n) for n in LAST if n in names]
    if worker_kill:
        steps.insert(rng.randint(0, len(middle)), Step("worker", WORKER_MOMENT))  # while trials still run
    for step in steps:
        step.delay_s = round(rng.uniform(*MOMENTS[step.moment].delay_s), 2)
    return steps


@dataclass
class Run:
    """One chaos run: the study, the driver now running, and what the checks have seen so far."""

    study: Path
    storage: Path
    num_samples: int
    seed: int
    env: dict = field(default_factory=dict)  # for every driver
    disk: bool = False  # whether --storage is a tmpfs of its own, which a "disk" step fills
    driver: Driver | None = None
    ended: dict = field(default_factory=dict)  # trial_number -> epochs, for every trial seen ended
    board_reads: int = 0
    board_read_errors: list = field(default_factory=list)
    retried: list = field(default_factory=list)  # trial names Ray retried after the worker kill
    _last_read: float = 0.0

    @property
    def folder(self) -> Path:
        return self.storage / "tiny"

    def launch(self, *, resume: bool) -> Driver:
        self.driver = Driver(self.study, self.storage, "--seed", str(self.seed), *(["--resume"] if resume else []),
                             env=self.env)
        return self.driver

    def read_board_now(self) -> None:
        """A reader in the middle of a run must never see half a Parquet file."""
        if time.monotonic() - self._last_read < BOARD_READ_EVERY_S:
            return
        self._last_read = time.monotonic()
        self.board_reads += 1
        try:
            read_board(self.folder)
        except Exception as exc:  # noqa: BLE001  any failure to read is the finding
            self.board_read_errors.append(f"{type(exc).__name__}: {exc}")


def run_chaos(schedule: list[Step], *, workdir: Path, trials: int, epochs: int, seed: int,
              say: Callable[[str], None] = print) -> dict:
    """Run ``schedule`` against a fresh study in ``workdir``; return every step's record, the final checks and totals."""
    started = time.monotonic()
    study = workdir / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(trials)).replace("MAX_EPOCHS", str(epochs)))
    # Short, under /tmp: Ray's socket paths inside it must stay under 108 characters.
    ray_tmp = tempfile.mkdtemp(prefix="chaos-ray-")
    run = Run(study=study, storage=workdir / "runs", num_samples=trials, seed=seed, env={"RAY_TMPDIR": ray_tmp})
    if any(step.target == "disk" for step in schedule):
        run.disk = mount_tmpfs(run.storage)
    steps = []
    try:
        for number, step in enumerate(schedule, 1):
            record = {"step": number, **asdict(step)}
            record.update(run_step(run, step))
            record["at_s"] = round(time.monotonic() - started, 1)  # when the kill came, from the chaos run's start
            if record["outcome"] != "fatal":
                record["checks"] = {**record.pop("fault_checks", {}), **check_step(run)}
            steps.append(record)
            say(format_step(record))
            if record["outcome"] == "fatal":
                break
        final = finish(run) if not steps or steps[-1]["outcome"] != "fatal" else {"checks": {"completed": "a step failed"}}
    finally:
        if run.driver is not None:  # an exception or a failed step left it running
            run.driver.proc.kill()
            run.driver.wait(timeout=60)
            kill_session(run.driver.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if run.disk and sys.exc_info()[0] is not None:
            subprocess.run(["umount", "-l", str(run.storage)], capture_output=True, check=False)
    try:  # the end state is read from the folder: before its tmpfs goes
        final["board_reads"], final["board_read_errors"] = run.board_reads, run.board_read_errors
        return {"schedule": [asdict(s) for s in schedule], "steps": steps, "final": final,
                "totals": totals(steps, final, run), "wall_s": round(time.monotonic() - started, 1)}
    finally:
        if run.disk:
            subprocess.run(["umount", "-l", str(run.storage)], capture_output=True, check=False)


def run_step(run: Run, step: Step) -> dict:
    """Wait for the step's moment (starting or resuming a driver if none runs), then kill."""
    record = {"launch": None}
    if step.target == "disk" and not run.disk:
        return {**record, "outcome": "skipped", "error": "no tmpfs could be mounted for --storage (needs root)"}
    if run.driver is None:
        record["launch"] = "start" if not run.folder.exists() else "--resume"
        run.launch(resume=record["launch"] == "--resume")
    watch = Watch(run.driver, run.folder, run.num_samples, first_line=len(run.driver.lines),
                  checkpoints=checkpoint_folders(run.folder))
    moment, deadline = MOMENTS[step.moment], time.monotonic() + STEP_TIMEOUT_S
    while (fired := moment.trigger(watch)) is None:
        if run.driver.poll() is not None:
            code = run.driver.wait(timeout=60)
            if (fired := moment.trigger(watch)) is not None:  # it printed the moment and ended at once
                run.driver = None
                return {**record, "outcome": "missed", "exit_code": code, "fired_by": fired[:120]}
            if advised := follow_advice(run, record["launch"]):
                record["launch"] = advised
                watch.driver, watch.first_line = run.driver, 0
                continue
            run.driver = None
            outcome = "missed" if code == 0 else "fatal"
            return {**record, "outcome": outcome, "exit_code": code, "error": _error_line(watch.driver.output),
                    "output_tail": watch.driver.output[-3000:] if outcome == "fatal" else None}
        if time.monotonic() > deadline:
            return {**record, "outcome": "fatal", "error": f"no {step.moment!r} within {STEP_TIMEOUT_S:.0f} s",
                    "output_tail": watch.driver.output[-3000:]}
        run.read_board_now()
        time.sleep(POLL_S)
    time.sleep(step.delay_s)
    record["fired_by"] = fired[:120]
    record["last_line"] = (watch.lines() or [""])[-1].strip()[:120]
    if step.target == "worker":
        return {**record, **kill_worker(run, watch)}
    if step.target == "sigterm":
        return {**record, **terminate_driver(run)}
    if step.target == "disk":
        return {**record, **fill_disk(run)}
    return {**record, **kill_driver(run)}


def mount_tmpfs(where: Path) -> bool:
    """A tmpfs of ``DISK_SIZE`` at ``where``, for a disk that can fill; False where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(where)], capture_output=True,
                          check=False)
    return done.returncode == 0


def _end_of(run: Run, timeout: float) -> int | None:
    """The driver's exit code within ``timeout`` s, or None (then it is SIGKILLed); its session is cleaned up."""
    driver = run.driver
    try:
        code = driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.proc.kill()
        driver.wait(timeout=60)
        code = None
    deadline = time.monotonic() + RAY_EXIT_S
    while session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_session(driver.pid)
    run.driver = None
    return code


def terminate_driver(run: Run) -> dict:
    """SIGTERM, as a batch scheduler stops a job: the driver must stop as Ctrl+C does, and say how to resume."""
    driver = run.driver
    driver.proc.send_signal(signal.SIGTERM)  # a no-op if it has already ended
    code = _end_of(run, SIGTERM_EXIT_S)
    output = driver.output
    if code == 0:
        return {"outcome": "missed", "signal": "SIGTERM", "exit_code": code}
    checks = {
        f"exit {EXIT_TERMINATED}": True if code == EXIT_TERMINATED else f"exit code {code}",
        "resume command printed": True if "Resume with:" in output else "no 'Resume with:'",
        "no native stack dump": True if not any(t in output for t in NATIVE_DUMP) else "Ray's abort printed",
    }
    return {"outcome": "killed" if code is not None else "fatal", "signal": "SIGTERM", "exit_code": code,
            "fault_checks": checks, "output_tail": None if all(v is True for v in checks.values()) else output[-3000:]}


def fill_disk(run: Run) -> dict:
    """Fill the results folder's disk with ``dd``; the driver must stop by name; then the space is freed."""
    driver = run.driver
    filler = run.storage / f"chaos-filler-{len(driver.lines)}"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, check=False)  # ends on ENOSPC
    code = _end_of(run, STEP_TIMEOUT_S)
    filler.unlink(missing_ok=True)  # freed before the next resume, as a user would
    output = driver.output
    if code == 0:
        return {"outcome": "missed", "signal": "ENOSPC", "exit_code": code}
    checks = {
        "exit 1": True if code == 1 else f"exit code {code}",
        "the full disk named": True if re.search(r"the study stopped: .*is (nearly )?full", output) else "no message",
        "resume command printed": True if "resume with:" in output else "no 'resume with:'",
        "no driver traceback": True if not driver_traceback(output) else "a Python traceback from the driver",
    }
    return {"outcome": "killed" if code is not None else "fatal", "signal": "ENOSPC", "exit_code": code,
            "fault_checks": checks, "output_tail": None if all(v is True for v in checks.values()) else output[-3000:]}


def follow_advice(run: Run, launch: str | None) -> str | None:
    """A ``--resume`` refused with "run without --resume" is followed as a user would: start as advised.

    Returns how the new driver was launched, or None if the driver that ended was not such a refusal.
    Should the advised command be refused too, the study is stuck, and the step fails with that error.
    """
    if launch != "--resume" or run.driver.proc.returncode != 2 or "run without --resume" not in run.driver.output:
        return None
    refusal = _error_line(run.driver.output)
    run.launch(resume=False)
    return f"--resume refused ({refusal}), then start"


def kill_driver(run: Run) -> dict:
    driver = run.driver
    saved = (run.folder / "tuner.pkl").exists()  # whether Ray Tune had saved the experiment it can restore
    driver.proc.kill()  # SIGKILL; a no-op if it has already ended, so a reused pid is never hit
    code = driver.wait(timeout=60)
    deadline = time.monotonic() + RAY_EXIT_S
    while session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(title.split(" ")[0][:40] for title in session_processes(driver.pid).values())
    kill_session(driver.pid)  # what outlived its driver by RAY_EXIT_S (trial workers notice a dead raylet late)
    run.driver = None
    killed = code == -signal.SIGKILL
    return {"outcome": "killed" if killed else "missed", "signal": "SIGKILL", "exit_code": code,
            "tuner_state_saved": saved, "ray_processes_left": left}


def kill_worker(run: Run, watch: Watch) -> dict:
    """SIGKILL one Ray worker inside a trial, then wait for the driver to say that Ray retries its trial."""
    deadline = time.monotonic() + 60
    while not (workers := trial_workers(run.driver.pid)):
        if run.driver.poll() is not None or time.monotonic() > deadline:
            return {"outcome": "fatal", "error": "no Ray worker was inside a trial to kill",
                    "output_tail": run.driver.output[-3000:]}
        time.sleep(POLL_S)
    killed_at = len(run.driver.lines)
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + RETRY_TIMEOUT_S
    while time.monotonic() < deadline and run.driver.poll() is None:
        retry = next((line for line in run.driver.lines[killed_at:] if "] retry " in line), None)
        if retry:
            run.retried.append(re.search(r"\] retry\s+(\S+)", retry).group(1))
            return {"outcome": "killed", "signal": "SIGKILL", "exit_code": None, "worker_pid": workers[0],
                    "retry": retry.strip()[:200]}
        run.read_board_now()
        time.sleep(POLL_S)
    return {"outcome": "fatal", "signal": "SIGKILL", "worker_pid": workers[0],
            "error": f"no 'retry' line within {RETRY_TIMEOUT_S:.0f} s of killing worker {workers[0]}",
            "output_tail": run.driver.output[-3000:]}


def finish(run: Run) -> dict:
    """Resume once more (unless the last driver still runs) and let the study end; then the end-state checks."""
    launch = None
    if run.driver is None:
        launch = "--resume"
        run.launch(resume=True)
    while True:
        while run.driver.poll() is None:
            run.read_board_now()
            time.sleep(BOARD_READ_EVERY_S)
        code = run.driver.wait(timeout=60)
        if not (advised := follow_advice(run, launch)):
            break
        launch = advised
    output = run.driver.output
    run.driver = None
    checks = check_step(run)
    checks.update(check_end(run, code))
    return {"launch": launch, "exit_code": code, "error": _error_line(output) or None, "checks": checks,
            "output_tail": output[-3000:] if not all(v is True for v in checks.values()) else None}


def check_step(run: Run) -> dict:
    """The invariants after any step: ``{check: True}`` or ``{check: what is wrong}``."""
    checks, board, epochs = {}, None, None
    try:
        board = _board(run.folder)
        checks["leaderboard readable"] = True
    except Exception as exc:  # noqa: BLE001
        checks["leaderboard readable"] = f"{type(exc).__name__}: {exc}"
    try:
        epochs = _epochs(run.folder)
        checks["epochs readable"] = True
    except Exception as exc:  # noqa: BLE001
        checks["epochs readable"] = f"{type(exc).__name__}: {exc}"
    try:
        if (run.folder / "study.json").exists():
            json.loads((run.folder / "study.json").read_text())
        checks["study.json readable"] = True
    except ValueError as exc:
        checks["study.json readable"] = f"{type(exc).__name__}: {exc}"
    if board is not None:
        twice = duplicate_trials(board)
        checks["every trial once"] = True if not twice else f"more than one row: {twice}"
        checks[f"at most {run.num_samples} trials"] = (
            True if len(board) <= run.num_samples else f"{len(board)} rows: {sorted(board['trial_number'])}")
        checks["ended trials kept"] = _kept(board, run.ended)
    if epochs is not None:
        twice = duplicate_epochs(epochs)
        checks["no (trial, epoch) twice"] = True if twice.empty else f"{len(twice)} rows: {twice.to_dict('records')[:5]}"
    return checks


def check_end(run: Run, exit_code: int) -> dict:
    board = _board(run.folder)
    numbers = sorted(int(n) for n in board["trial_number"])
    record = json.loads((run.folder / "study.json").read_text()) if (run.folder / "study.json").exists() else {}
    checks = {
        "driver exited 0": True if exit_code == 0 else f"exit code {exit_code}",
        f"{run.num_samples} trials": True if len(board) == run.num_samples else f"{len(board)} rows",
        "trial numbers 0..n-1": True if numbers == list(range(run.num_samples)) else f"numbers {numbers}",
        "all ended": True if board["status"].isin(ENDED).all() else f"statuses {board['status'].value_counts().to_dict()}",
        "outcome completed": True if record.get("outcome") == "completed" else f"outcome {record.get('outcome')!r}",
    }
    for name in run.retried:  # one row, ended, and the failed attempt counted
        rows = board[board["trial_name"] == name]
        ok = len(rows) == 1 and rows["status"].isin(ENDED).all() and (rows.get("failures", 0) >= 1).all()
        shown = rows[[c for c in ("trial_id", "status", "failures") if c in rows]].to_dict("records")
        checks[f"retried {name} once, ended"] = True if ok else f"rows: {shown}"
    return checks


def duplicate_trials(board) -> list:
    """Trial ids or Optuna trial numbers on more than one row."""
    return (board.loc[board["trial_id"].duplicated(keep=False), "trial_id"].tolist()
            + board.loc[board["trial_number"].duplicated(keep=False), "trial_number"].tolist())


def duplicate_epochs(epochs):
    """(trial, epoch) rows that appear more than once, by trial id and by trial number."""
    if epochs.empty:
        return epochs
    twice = epochs.duplicated(["trial_id", "epoch"], keep=False) | epochs.duplicated(["trial_number", "epoch"], keep=False)
    return epochs.loc[twice, ["trial_id", "trial_number", "epoch"]]


def _kept(board, ended: dict) -> bool | str:
    """Every trial seen ended is still ended, with at least as many epochs; then remember the ones ended now."""
    rows = board.drop_duplicates("trial_number").set_index("trial_number")
    lost = [n for n, epochs in ended.items()
            if n not in rows.index or rows.at[n, "status"] not in ENDED or rows.at[n, "epochs"] < epochs]
    for n, row in rows[rows["status"].isin(ENDED)].iterrows():
        ended[int(n)] = max(ended.get(int(n), 0), int(row["epochs"]))
    return True if not lost else f"lost or reset: trial numbers {lost}"


def _epochs(folder: Path):
    import pandas as pd

    path = folder / "epochs.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["trial_id", "trial_number", "epoch"])


def _board(folder: Path):
    """The leaderboard, with the columns the checks use even before a trial has started."""
    board = read_board(folder)
    return board.reindex(columns=[*board.columns, *(c for c in ("trial_number", "trial_name", "epochs") if c not in board)])


def _board_or_none(folder: Path):
    try:
        return _board(folder)
    except Exception:  # noqa: BLE001  a read error is counted by Run.read_board_now, not here
        return None


def _error_line(output: str) -> str:
    return next((line.strip() for line in reversed(output.splitlines()) if line.startswith("error:")), "")


def totals(steps: list[dict], final: dict, run: Run) -> dict:
    all_checks = [s.get("checks", {}) for s in steps] + [final["checks"]]
    completed = all(v is True for v in final["checks"].values())
    killed = [s for s in steps if s["outcome"] == "killed"]
    board = _board_or_none(run.folder)
    ended_now = set() if board is None else {int(n) for n in board.loc[board["status"].isin(ENDED), "trial_number"]}
    expected = set(range(run.num_samples)) | set(run.ended)
    epochs = _epochs(run.folder) if (run.folder / "epochs.parquet").exists() else None
    record = json.loads((run.folder / "study.json").read_text()) if (run.folder / "study.json").exists() else {}
    return {
        "driver_kills": sum(s["target"] == "driver" for s in killed),
        "worker_kills": sum(s["target"] == "worker" for s in killed),
        "sigterms": sum(s["target"] == "sigterm" for s in killed),
        "disk_fills": sum(s["target"] == "disk" for s in killed),
        "faults_skipped": sum(s["outcome"] == "skipped" for s in steps),
        "kills_survived": sum(completed and all(v is True for v in s.get("checks", {}).values()) for s in killed),
        "kills_missed": sum(s["outcome"] == "missed" for s in steps),
        "trials_lost": len(expected - ended_now),
        "duplicate_trials": 0 if board is None else len(set(map(str, duplicate_trials(board)))),
        "duplicate_trial_epoch_rows": 0 if epochs is None else len(duplicate_epochs(epochs)),
        "checks_failed": sum(v is not True for checks in all_checks for v in checks.values()),
        "board_reads_while_running": run.board_reads,
        "board_read_errors": len(run.board_read_errors),
        "trials": 0 if board is None else len(board),
        "num_samples": run.num_samples,
        "outcome": record.get("outcome"),
    }


def format_step(record: dict) -> str:
    checks = record.get("checks", {})
    failed = [f"{k}: {v}" for k, v in checks.items() if v is not True]
    passed = f"{len(checks) - len(failed)}/{len(checks)}" + (f" FAILED {'; '.join(failed)}" if failed else "")
    if record["outcome"] == "fatal":
        passed = f"FATAL {record.get('error')}"
    return (f"{record['step']:>4}  {record['target']:<6}  {record['moment']:<16}  {record['delay_s']:>5.2f}  "
            f"{record['outcome']:<7}  {record.get('signal') or '-':<7}  {str(record.get('exit_code', '-')):>5}  "
            f"{passed}  | launched: {record['launch'] or 'same driver'} | fired by: {record.get('fired_by', '-')} "
            f"| last line: {record.get('last_line', '-')}")


def to_markdown(report: dict, args: dict) -> str:
    t = report["totals"]
    rows = ["| step | target | moment | delay s | launched as | fired by | signal | exit | checks |",
            "|---:|---|---|---:|---|---|---|---:|---|"]
    for s in report["steps"]:
        checks = s.get("checks", {})
        failed = [k for k, v in checks.items() if v is not True]
        shown = f"{len(checks) - len(failed)}/{len(checks)}" + (f" (failed: {', '.join(failed)})" if failed else "")
        if s["outcome"] != "killed":
            shown = f"{s['outcome']}: {s.get('error') or 'the driver ended before the kill'}; {shown}"
        fired = (s.get("fired_by") or "-").replace("|", "/")[:60]
        rows.append(f"| {s['step']} | {s['target']} | {s['moment']} | {s['delay_s']:.2f} | {s['launch'] or 'same driver'} "
                    f"| `{fired}` | {s.get('signal') or '-'} | {s.get('exit_code') if s.get('exit_code') is not None else '-'} | {shown} |")
    f = report["final"]
    failed = [k for k, v in f["checks"].items() if v is not True]
    rows.append(f"| end | driver | run to the end | - | {f.get('launch') or 'same driver'} | - | - | {f.get('exit_code', '-')} "
                f"| {len(f['checks']) - len(failed)}/{len(f['checks'])}" + (f" (failed: {', '.join(failed)})" if failed else "") + " |")
    return "\n".join([
        f"# Chaos run: seed {args['seed']}, {args['kills']} driver kills, {t['num_samples']} trials x {args['epochs']} epochs",
        "", f"`python benchmarks/chaos.py --seed {args['seed']} --kills {args['kills']} --trials {args['trials']} "
        f"--epochs {args['epochs']}`, {report['wall_s']:.0f} s", "", *rows, "",
        f"- kills and faults survived: **{t['kills_survived']}** of "
        f"{t['driver_kills'] + t['worker_kills'] + t['sigterms'] + t['disk_fills']} "
        f"({t['driver_kills']} SIGKILLs of the driver, {t['worker_kills']} of a trial's Ray worker, "
        f"{t['sigterms']} SIGTERMs of the driver, {t['disk_fills']} full disks freed before the resume); "
        f"{t['kills_missed']} scheduled kills missed (the driver ended before the moment came), "
        f"{t['faults_skipped']} skipped (no tmpfs could be mounted)",
        f"- trials lost: **{t['trials_lost']}**; duplicate trials: **{t['duplicate_trials']}**; "
        f"duplicate (trial, epoch) rows: **{t['duplicate_trial_epoch_rows']}**",
        f"- final: {t['trials']} trials of num_samples {t['num_samples']}; outcome `{t['outcome']}`",
        f"- leaderboard read {t['board_reads_while_running']} times while drivers ran: {t['board_read_errors']} failed reads",
        f"- checks failed: {t['checks_failed']}", ""])


def driver_traceback(output: str) -> bool:
    """Whether ``output`` holds a traceback of the driver's own code. A trial that hits the full disk fails in its
    Ray worker, and Ray prints that trial's traceback (frames in trainables/ and ray/train) before retrying and
    recording it: that is the trial's error, reported, not the driver falling over.

    A chained traceback ("During handling of the above exception ...", "The above exception was the direct
    cause ...") is judged whole: its first part shows only the frames below the handler (Keras's zip writer, say,
    when a checkpoint write meets the full disk), which name no trial code although the trial raised it."""
    chains: list[list[str]] = []
    blocks = output.split("Traceback (most recent call last):")
    for before, block in zip(blocks, blocks[1:]):
        frames = re.findall(r'File "([^"]+)"', block.split("\n\n")[0])
        chained = any(link in before[-300:] for link in CHAIN_LINKS)
        if chained and chains:
            chains[-1] += frames
        else:
            chains.append(frames)
    return any(not any(marker in f for f in frames for marker in TRIAL_FRAMES) for frames in chains)


CHAIN_LINKS = ("During handling of the above exception, another exception occurred:",
               "The above exception was the direct cause of the following exception:")
TRIAL_FRAMES = ("/trainables/", "/ray/train/", "/ray/tune/trainable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=0, help="seeds the schedule of kills and the study")
    parser.add_argument("--kills", type=int, default=len(MOMENTS) - 1, help="driver kills (default: one per moment)")
    parser.add_argument("--no-worker-kill", dest="worker_kill", action="store_false", help="skip the Ray worker kill")
    parser.add_argument("--sigterms", type=int, default=2, help="SIGTERMs of the driver at seeded moments (default 2)")
    parser.add_argument("--disk-fills", type=int, default=1,
                        help="times the results folder's disk (a tmpfs; needs root) fills while trials run (default 1)")
    parser.add_argument("--trials", type=int, default=10, help="the study's num_samples")
    parser.add_argument("--epochs", type=int, default=4, help="the study's max_epochs")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where chaos.json and chaos.md go (default {OUT})")
    args = parser.parse_args(argv)
    if min(args.kills, args.sigterms, args.disk_fills) < 0 or args.trials < 1 or args.epochs < 1:
        parser.error(f"--kills, --sigterms and --disk-fills must be >= 0, --trials and --epochs >= 1; got {args.kills}, "
                     f"{args.sigterms}, {args.disk_fills}, {args.trials}, {args.epochs}")
    schedule = make_schedule(args.kills, args.seed, args.worker_kill, args.sigterms, args.disk_fills)
    print("schedule: " + ", ".join(f"{s.target} at {s.moment} +{s.delay_s:.2f} s" for s in schedule), flush=True)
    print("step  target  moment            delay  outcome  signal   exit  checks", flush=True)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        report = run_chaos(schedule, workdir=Path(tmp), trials=args.trials, epochs=args.epochs, seed=args.seed,
                           say=lambda line: print(line, flush=True))
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = to_markdown(report, report["args"])
    (args.out / "chaos.md").write_text(markdown)
    print(markdown)
    ok = report["totals"]["checks_failed"] == 0 and report["totals"]["trials_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
