"""Why a study stopped, and how much of its budget it used.

A study's budget is ``num_samples`` trials, ``time_limit_s`` seconds, or both;
``num_samples=None`` with a time limit runs trials until the time is spent. The
driver ends a run for one of ``STOP_REASONS``, or else the run was cut off
(Ctrl+C, SIGTERM, a failure) and ``--resume`` continues it. The reason and the
share of the budget used are recorded in study.json (``stopped_because``,
``search_s``, ``budget_used``) and printed when the run ends, so the report
tells a study that spent its budget from one that was interrupted.
"""

from __future__ import annotations

import math

__all__ = ["STOP_REASONS", "budget_record", "budget_text", "describe_budget", "stop_reason"]

# Each reason a study ends by its own budget, as the run's last lines and the report say it.
STOP_REASONS = {
    "num_samples": "every planned trial ran",
    "time_limit": "its time limit was spent",
    "space_exhausted": "every configuration of its space has run",
}


def stop_reason(study, trials: int, elapsed_s: float, *, space_exhausted: bool = False,
                cut_off: bool = False) -> str | None:
    """The key of ``STOP_REASONS`` that ended this run, or None when it was cut off before its end.

    ``trials``: trials in the leaderboard; ``elapsed_s``: the search's time (``Tuner.fit``);
    ``cut_off``: trials were still running when it returned (marked ``interrupted``).
    """
    if study.time_limit_s is not None and elapsed_s >= study.time_limit_s:
        return "time_limit"  # Ray's time budget stops the running trials: they count as the budget's end
    if cut_off:
        return None
    if space_exhausted:
        return "space_exhausted"
    if study.num_samples is not None and trials >= study.num_samples:
        return "num_samples"
    return None


def describe_budget(num_samples: int | None, max_epochs: int, time_limit_s: float | None) -> str:
    """The plan, in words: "16 trials x at most 10 epochs, time limit 30.0 min"."""
    if num_samples is None:
        return f"trials until the time limit ({_duration(time_limit_s)}) is spent, each at most {max_epochs} epochs"
    limit = f", time limit {_duration(time_limit_s)}" if time_limit_s else ""
    return f"{num_samples} trials x at most {max_epochs} epochs{limit}"


def budget_record(study, trials: int, elapsed_s: float, reason: str | None) -> dict:
    """study.json's fields for this run's end (see the module docstring)."""
    used = elapsed_s / study.time_limit_s if study.time_limit_s else None
    return {"stopped_because": reason, "search_s": round(elapsed_s, 1),
            "budget_used": None if used is None else round(min(used, 1.0), 4), "trials_run": trials}


def budget_text(record: dict, num_samples: int | None, time_limit_s: float | None) -> str:
    """One line from ``budget_record``'s fields: why the run stopped and the share of its budget it used."""
    reason = record.get("stopped_because")
    why = STOP_REASONS.get(reason, "it was cut off before its end (--resume continues it)")
    trials = record.get("trials_run")
    parts = [f"{trials} trial(s)" + (f" of {num_samples}" if num_samples is not None else "")]
    if record.get("search_s") is not None:
        parts.append(f"{_duration(record['search_s'])} of search")
    if time_limit_s:
        share = record.get("budget_used")
        parts.append(f"{share:.0%} of the time limit ({_duration(time_limit_s)})" if share is not None
                     else f"time limit {_duration(time_limit_s)}")
    return f"stopped because {why}: " + ", ".join(parts)


def _duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
