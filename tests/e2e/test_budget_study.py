"""A study that runs trials until its time limit is spent (num_samples=None), and says why it stopped."""

import json
from datetime import datetime

import pandas as pd
import pytest

from analysis import report as R
from fixtures.studies import TINY_STUDY
from search.run import main

pytestmark = pytest.mark.e2e

LIMIT_S = 30


def test_an_open_ended_study_runs_until_its_time_limit_and_records_why_it_stopped(tmp_path, capsys):
    study = tmp_path / "open.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", "None").replace("MAX_EPOCHS", "2")
                     .replace("max_concurrent=2,", f"max_concurrent=2, time_limit_s={LIMIT_S},"))
    assert main([str(study), "--storage", str(tmp_path / "runs"), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "tiny"
    record = json.loads((folder / "study.json").read_text())
    board = pd.read_parquet(folder / "leaderboard.parquet")

    assert record["outcome"] == "completed" and record["study"]["num_samples"] is None
    assert record["stopped_because"] == "time_limit" and record["budget_used"] == 1.0
    assert record["search_s"] >= LIMIT_S and record["trials_run"] == len(board)
    # Trials kept being launched: more than one round of two, the last one in the second half of the search.
    assert len(board) > 4, board
    last_start = pd.to_datetime(board["started_at"]).max().to_pydatetime()
    finished = datetime.fromisoformat(record["finished_at"])
    assert (finished - last_start).total_seconds() < record["search_s"] / 2, (last_start, finished)
    assert f"stopped because its time limit was spent: {len(board)} trial(s), " in out, out
    # Every trial is accounted for: those the limit cut are interrupted, the rest ended by themselves.
    assert set(board["status"]) <= {"finished", "stopped", "interrupted"}, board["status"].value_counts()

    # The report calls it complete (it spent its budget), with the plan and the end in words.
    assert R.main([str(folder)]) == 0
    md = (folder / "report.md").read_text()
    assert f"trials until the time limit ({LIMIT_S} s) is spent, each at most 2 epochs" in md
    assert "stopped because its time limit was spent" in md
    assert "**Partial results**" not in md, md[:3000]
