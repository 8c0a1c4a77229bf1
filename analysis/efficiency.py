"""What the search spent: trials in the order they ended, best-so-far against cumulative compute, and the budget
ASHA saved (pure pandas, from the run's leaderboard, epochs and Ray's result files)."""

from __future__ import annotations

import json
import math

import pandas as pd

from analysis.tables import Run

__all__ = ["completion_order", "order_note", "ray_end_times", "best_so_far", "asha_budget"]


def completion_order(run: Run) -> pd.DataFrame:
    """Trials in the order they completed, as well as the folder tells.

    The leaderboard records no end time today. In order of preference: an
    ``ended_at`` column (if a later results.py writes one); the ``timestamp``
    of each trial's last result in Ray's ``<trial_name>/result.json`` (present
    while the folder keeps the trial folders); else ``trial_number`` (the order
    Optuna proposed the trials). ``attrs["order"]`` names what was used.
    """
    board = run.board.copy()
    number = pd.to_numeric(board["trial_number"], errors="coerce") if "trial_number" in board.columns \
        else pd.Series(range(len(board)), index=board.index, dtype=float)
    ended = None
    if "ended_at" in board.columns and board["ended_at"].notna().any():
        ended, how = pd.to_datetime(board["ended_at"], errors="coerce", utc=True), "ended_at"
    else:
        stamps = ray_end_times(run)
        if stamps:
            ended = pd.to_datetime(board["trial_name"].map(stamps), unit="s", utc=True)
            how = "completion (Ray result.json timestamps)"
    if ended is None:
        how = "trial_number" if "trial_number" in board.columns else "leaderboard row"
        board["_end"], board["_number"] = 0, number
    else:
        board["_end"], board["_number"] = ended, number
    board = board.sort_values(["_end", "_number"], kind="mergesort", na_position="last").drop(columns=["_end", "_number"])
    board.attrs["order"] = how
    return board.reset_index(drop=True)


def order_note(how: str | None) -> str:
    """How ``completion_order`` ordered the trials, in words for a report."""
    if how == "ended_at":
        return "completion order (leaderboard ended_at)"
    if how and how.startswith("completion"):
        return "completion order (each trial's last result time in Ray's trial result.json; the leaderboard records no end time)"
    return (f"{how or 'trial_number'} order, standing in for completion order (no end times: the leaderboard records "
            "none and Ray's trial folders are not here)")


def ray_end_times(run: Run) -> dict[str, float]:
    """``trial_name -> unix time`` of each trial's last result, from Ray's ``result.json`` (empty if absent)."""
    out = {}
    for name in run.board["trial_name"].dropna().astype(str):
        path = run.path / name / "result.json"
        if not path.is_file():
            continue
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 65536))
                lines = [line for line in f.read().splitlines() if line.strip()]
            stamp = json.loads(lines[-1]).get("timestamp") if lines else None
        except (OSError, ValueError):
            continue
        if isinstance(stamp, (int, float)):
            out[name] = float(stamp)
    return out


def best_so_far(run: Run) -> pd.DataFrame:
    """Best-so-far score against cumulative compute (the sum of trial wall times, in completion order).

    Errored trials count for the compute they used and never improve the best.
    """
    board = completion_order(run)
    score = run.score_column
    cols = ["trial_number", "trial_name", "status"]
    out = board[[c for c in cols if c in board.columns]].copy()
    wall = pd.to_numeric(board.get("wall_time_s", pd.Series(index=board.index, dtype=float)), errors="coerce")
    out["wall_time_s"] = wall.astype(float)
    out["cumulative_s"] = wall.fillna(0.0).astype(float).cumsum()
    value = pd.to_numeric(board.get(score, pd.Series(index=board.index, dtype=float)), errors="coerce")
    value = value.where(board["status"] != "errored")
    out[score] = value
    running = (value.cummax() if run.mode == "max" else value.cummin()).ffill()
    out["best_so_far"] = running
    previous = running.shift(1)
    out["new_best"] = value.notna() & (previous.isna() | (running != previous))
    out.attrs["order"] = board.attrs.get("order")
    return out


def asha_budget(run: Run) -> dict:
    """Epochs run against ``trials x max_epochs``, and how much of the difference ASHA saved.

    ``full_epochs`` = trials x max_epochs; ``unused_epochs`` = full - run, split
    into ``saved_by_asha`` (stopped trials), ``lost_to_errors`` (errored trials)
    and ``still_running`` (running trials). Seconds saved are estimated from each
    stopped trial's own time per epoch.
    """
    board = run.board
    max_epochs = run.max_epochs
    epochs = pd.to_numeric(board.get("epochs", pd.Series(index=board.index, dtype=float)), errors="coerce")
    if not run.epochs.empty and {"trial_id", "epoch"} <= set(run.epochs.columns):
        seen = run.epochs.groupby("trial_id")["epoch"].max()
        epochs = epochs.fillna(board["trial_id"].map(seen))
    epochs = epochs.fillna(0).astype(int)
    wall = pd.to_numeric(board.get("wall_time_s", pd.Series(index=board.index, dtype=float)), errors="coerce")
    left = (max_epochs - epochs).clip(lower=0)
    status = board["status"].fillna("running")

    def part(name):
        return int(left[status == name].sum())

    stopped = status == "stopped"
    per_epoch = (wall / epochs.where(epochs > 0)).where(stopped)
    saved_s = float((per_epoch * left).where(stopped).sum())
    trials = len(board)
    full = trials * max_epochs
    run_epochs = int(epochs.sum())
    stopped_at = epochs[stopped].value_counts().sort_index()
    return {
        "trials": trials,
        "num_samples": run.num_samples,
        "max_epochs": max_epochs,
        "grace_period": run.study.get("grace_period"),
        "reduction_factor": run.study.get("reduction_factor"),
        "epochs_run": run_epochs,
        "full_epochs": full,
        "planned_epochs": None if run.num_samples is None else run.num_samples * max_epochs,  # None: until a time limit
        "unused_epochs": full - run_epochs,
        "saved_by_asha": part("stopped"),
        "lost_to_errors": part("errored"),
        "still_running": part("running"),
        "saved_fraction": part("stopped") / full if full else math.nan,
        "compute_s": float(wall.fillna(0).sum()),
        "saved_s_estimate": saved_s,
        "stopped_after_epochs": {int(k): int(v) for k, v in stopped_at.items()},
    }


