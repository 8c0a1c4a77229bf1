"""analysis.leaderboard: one row per study x backbone across results folders."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import leaderboard as L
from analysis import tables as T
from fixtures.runs import DAMAGES, damage, files_under, make_run_dir, run_with_file_size_limit


def test_one_row_per_study_and_backbone(run_dir, tmp_path):
    other = make_run_dir(tmp_path, name="synth")
    board = L.merge([run_dir, other])
    assert not board.duplicated(["study", "backbone"]).any()
    expected = {("tiny", b) for b in T.best_per_backbone(T.load_run(run_dir))["backbone"]}
    expected |= {("synth", "mobilenet_v2"), ("synth", "cnn_s3")}
    assert set(zip(board["study"], board["backbone"])) == expected
    assert list(board.columns[:6]) == ["study", "dataset", "split", "metric", "mode", "backbone"]
    for study, folder in (("tiny", run_dir), ("synth", other)):
        mine = board[board["study"] == study].set_index("backbone")
        best = T.best_per_backbone(T.load_run(folder)).set_index("backbone")
        for col in ("trial_name", "best_val_balanced_accuracy", "best_val_auc", "epochs", "wall_time_s", "total_params"):
            assert (mine.loc[best.index, col] == best[col]).all(), (study, col)
        assert (mine["score"] == best.loc[mine.index, "best_val_balanced_accuracy"]).all()
        assert (mine["recall_positive"] == best.loc[mine.index, "best_val_recall_malignant"]).all()
    synth = board[board["study"] == "synth"].iloc[0]
    assert (synth["dataset"], synth["split"], synth["metric"]) == ("embedded @32px", "stratified", "val_balanced_accuracy")


def test_the_command_line_writes_parquet_and_markdown(tmp_path, capsys):
    a = make_run_dir(tmp_path, name="a")
    b = make_run_dir(tmp_path, [(0, "cnn_s2", "all", 1e-3, None, "finished", [0.7])], name="b", max_epochs=1,
                     metric="val_auc")
    out = tmp_path / "out" / "all.parquet"
    assert L.main([str(a), str(b), "--out", str(out)]) == 0
    board = pd.read_parquet(out)
    assert len(board) == 3 and board["study"].tolist() == ["a", "a", "b"]
    assert board.loc[board["study"] == "b", "score"].iloc[0] == pytest.approx(0.75)  # b's own metric: val_auc
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| study | dataset | split | metric | backbone | score (study metric) |")
    assert len(md) == 2 + 3
    assert "3 rows from 2 studies" in capsys.readouterr().out


def test_the_same_study_name_from_two_storages(tmp_path):
    one = make_run_dir(tmp_path / "runs1", name="s")
    two = make_run_dir(tmp_path / "runs2", name="s")
    board = L.merge([one, two])
    assert sorted(board["study"].unique()) == ["s (runs1)", "s (runs2)"]
    assert len(board) == 4 and not board.duplicated(["study", "backbone"]).any()


def test_partial_and_unscored_studies(tmp_path):
    running = make_run_dir(tmp_path, [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.6])], name="running",
                           max_epochs=1, num_samples=3)
    failed = make_run_dir(tmp_path, [(0, "cnn_s3", "all", 1e-3, None, "errored", [])], name="failed")
    board = L.merge([running, failed])
    assert board["study"].tolist() == ["running"] and bool(board["partial"].iloc[0])


def test_a_folder_that_is_not_a_results_folder(tmp_path, capsys):
    assert L.main([str(tmp_path), "--out", str(tmp_path / "x.parquet")]) == L.EXIT_USAGE
    assert "no study.json" in capsys.readouterr().err


@pytest.mark.parametrize("what", DAMAGES)
def test_a_damaged_file_is_named_and_nothing_is_written(tmp_path, capsys, what):
    good, bad = make_run_dir(tmp_path, name="good"), make_run_dir(tmp_path, name="bad")
    name = damage(bad, what)
    out = tmp_path / "out" / "all.parquet"
    assert L.main([str(good), str(bad), "--out", str(out)]) == L.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and repr(str(bad / name)) in err and "Traceback" not in err
    assert not out.parent.exists()


def test_a_full_disk_is_a_named_error_and_leaves_no_partial_file(tmp_path):
    """Files capped at 1 kB (RLIMIT_FSIZE): the Parquet write fails part way, as on a full disk."""
    folder = make_run_dir(tmp_path, name="a")
    out = tmp_path / "out"
    out.mkdir()
    done = run_with_file_size_limit(["-m", "analysis.leaderboard", folder, "--out", out / "all.parquet"], 1024)
    assert done.returncode == L.EXIT_USAGE, done.stderr
    assert done.stderr.startswith("error: cannot write ") and "all.parquet" in done.stderr
    assert "Traceback" not in done.stderr
    assert files_under(out) == {}  # neither a half file nor a temporary one
