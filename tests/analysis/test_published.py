"""Published rows: the numbers of shared/paper-tables.md, and deltas only under the same protocol."""

import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.published import (DIFFERENT, METRICS, SAME, compare, published_rows, reference_note, run_protocol,
                                study_key)


def paper_tables() -> str:
    """``shared/paper-tables.md`` beside the repository (or $MEDSEARCH_PAPER_TABLES), else skip."""
    env = os.environ.get("MEDSEARCH_PAPER_TABLES")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "paper-tables.md"
    if not path.is_file():
        pytest.skip(f"paper tables not found at {path} (set MEDSEARCH_PAPER_TABLES)")
    return path.read_text()


def section(text: str, key: str) -> str:
    return re.split(r"\n## ", text.split(f"## {key}:", 1)[1], maxsplit=1)[0]


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the first markdown table in ``text``, cells stripped of ** markers."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in lines[2:]]


def own(key: str) -> pd.DataFrame:
    rows = published_rows(key)
    return rows[rows["protocol"] == key].reset_index(drop=True)


# --------------------------------------------------------------------------
# the CSV carries the paper tables' numbers
# --------------------------------------------------------------------------


def test_key_numbers_are_there_even_without_the_markdown():
    s1, s2 = own("S1"), own("S2")
    assert s1["accuracy"].max() == 0.8891
    best = s2.loc[s2["accuracy"].idxmax()]
    assert (best["model"], best["accuracy"], best["recall_malignant"]) == ("VGG16", 0.87, 0.78)


def test_s1_rows_match_the_markdown_table():
    rows = table_rows(section(paper_tables(), "S1"))  # config | epochs | test acc | F1 | precision | recall
    s1 = own("S1")
    assert len(s1) == len(rows) == 3
    for (_, ours), cells in zip(s1.iterrows(), rows):
        assert [ours["epochs"], ours["accuracy"], ours["f1_malignant"], ours["precision_malignant"],
                ours["recall_malignant"]] == [int(cells[1])] + [float(c) for c in cells[2:6]]
        assert ours["split_reported"] == "test" and ours["n_eval"] == 2083


def test_s2_rows_match_the_markdown_table_including_per_class_numbers():
    rows = table_rows(section(paper_tables(), "S2"))  # model | test acc | benign P/R/F1 | malignant P/R/F1
    s2 = own("S2")
    assert len(s2) == len(rows) == 3
    for (_, ours), cells in zip(s2.iterrows(), rows):
        benign, malignant = ([float(v) for v in c.split("/")] for c in cells[2:4])
        assert ours["accuracy"] == float(cells[1])
        assert [ours[f"{m}_benign"] for m in ("precision", "recall", "f1")] == benign
        assert [ours[f"{m}_malignant"] for m in ("precision", "recall", "f1")] == malignant
    assert own("S2").set_index("model").loc["VGG16", "accuracy"] == 0.87


def test_s3_to_s5_rows_and_anchors_match_the_markdown():
    text = paper_tables()
    s3 = [float(cells[2]) for cells in table_rows(section(text, "S3"))]  # model | lr | test acc
    assert own("S3")["accuracy"].tolist() == s3
    assert own("S4")["accuracy"].tolist() == [float(re.search(r"validation accuracy (\d\.\d+)", text).group(1))]
    assert own("S5")["accuracy"].tolist() == [float(v) for v in re.findall(r"Validation accuracy \*\*(\d\.\d+)\*\*", text)]
    assert own("S5")["split_reported"].eq("val").all() and own("S4")["split_reported"].eq("val").all()

    anchors = pd.concat([published_rows(k) for k in ("S3", "S5")])
    anchors = anchors[~anchors["protocol"].isin(["S3", "S5"])].set_index("model")
    assert anchors.loc["the database authors' best model", "accuracy"] == pytest.approx(float(
        re.search(r"report (\d+\.\d+)% 3-class", text).group(1)) / 100)
    assert anchors.loc["top challenge entry", "balanced_accuracy"] == float(re.search(r"about (0\.\d+)", text).group(1))
    dermamnist = re.search(r"ResNet-18 (\S+), AutoKeras (\S+), Google AutoML Vision (\S+?)\.?$", text, re.M)
    assert [anchors.loc[m, "accuracy"] for m in ("ResNet-18", "AutoKeras", "Google AutoML Vision")] == \
        [float(v) for v in dermamnist.groups()]


def test_every_study_has_rows_and_own_rows_come_first():
    for key in ("S1", "S2", "S3", "S4", "S5"):
        rows = published_rows(key)
        assert not rows.empty and rows["protocol"].iloc[0] == key
        assert rows["citation"].notna().all()
    assert published_rows("s3")["protocol"].tolist()[-1] == "Chowdhury2020"


def test_unknown_study_key_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown study key 'S9'; valid: S1, S2, S3, S4, S5"):
        published_rows("S9")


# --------------------------------------------------------------------------
# compare: a delta only under the same protocol
# --------------------------------------------------------------------------


def test_delta_only_where_the_protocol_is_the_same():
    ours = pd.DataFrame([{"trial_name": "t1", "split": "test", "accuracy": 0.90, "accuracy_ci_low": 0.85,
                          "accuracy_ci_high": 0.94, "balanced_accuracy": 0.86}])
    table = compare(ours, "S3", "S3")
    same, other = table[table["published_protocol"] == "S3"], table[table["published_protocol"] != "S3"]
    assert (same["comparison"] == SAME).all() and len(same) == 7
    assert same["delta"].tolist() == pytest.approx([0.90 - v for v in own("S3")["accuracy"]])
    assert (other["comparison"] == DIFFERENT).all() and other["delta"].isna().all()
    assert same["ours_ci_low"].eq(0.85).all()

    grouped = compare(ours, "S3", "grouped")
    assert grouped["delta"].isna().all() and (grouped["comparison"] == DIFFERENT).all()


def test_split_mismatch_and_unmeasured_metrics_are_labelled():
    ours = pd.DataFrame([{"trial_name": "t1", "split": "test", "accuracy": 0.70}])
    table = compare(ours, "S5", "S5").set_index(["published_model", "metric"])
    assert table.loc[("EfficientNetB1", "accuracy"), "comparison"].tolist() == [
        f"{SAME}; ours on test, published on val"] * 2
    isic = table.loc[("top challenge entry", "balanced_accuracy")]
    assert isic["comparison"] == "not measured by us" and math.isnan(isic["delta"])


def test_leaderboard_rows_compare_with_a_prefix_and_no_reference_gives_an_empty_table():
    board = pd.DataFrame([{"trial_name": "a", "best_val_accuracy": 0.9}, {"trial_name": "b", "best_val_accuracy": 0.8}])
    table = compare(board, "S4", "S4", prefix="best_val_")
    assert table["delta"].tolist() == pytest.approx([0.1, 0.0])
    assert compare(board, None, "grouped").empty
    with pytest.raises(ValueError, match="prefix='best_val_'"):
        compare(board, "S4", "S4")
    assert set(METRICS) <= set(published_rows("S1").columns)


def write_run(folder: Path, split: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"study": {"dataset": {"split": split}}}))
    return folder


def test_study_key_comes_from_the_runs_split_protocol(tmp_path):
    grouped = write_run(tmp_path / "grouped", "grouped")
    assert run_protocol(grouped) == "grouped" and study_key(grouped) is None
    assert "no published reference applies" in reference_note(grouped)
    s2 = write_run(tmp_path / "s2", "S2")
    assert study_key(s2) == "S2" and "study S2" in reference_note(s2)
    with pytest.raises(ValueError, match="cannot read dataset.split"):
        study_key(tmp_path)
