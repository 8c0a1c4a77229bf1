"""What a clinician reads holds where the model is used (issue 26): PPV and NPV at a stated prevalence, the
intended use, the synthetic-data mark, the answer on the first screen, each test read said aloud, the checklist.

The closed forms are checked on constructed decisions; the rest on a copy of the session's real tiny study,
evaluated once with ``--prevalence 0.02 --target-sensitivity 0.9``, then reported, exported and carded.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.prevalence import TYPICAL_PREVALENCES, at_prevalences, ppv_npv, prevalences_for

STATED = 0.02


def closed_form(se, sp, p):
    """Bayes' rule, written out; undefined (NaN) where nothing is called positive (or negative)."""
    called_positive, called_negative = se * p + (1 - sp) * (1 - p), sp * (1 - p) + (1 - se) * p
    return (se * p / called_positive if called_positive else float("nan"),
            sp * (1 - p) / called_negative if called_negative else float("nan"))


def test_ppv_and_npv_at_a_prevalence_are_bayes_rule_on_sensitivity_and_specificity():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.5
    called = np.where(truth, rng.random(400) < 0.85, rng.random(400) < 0.1)  # sensitivity ~0.85, specificity ~0.9
    se, sp = (called & truth).sum() / truth.sum(), (~called & ~truth).sum() / (~truth).sum()
    rows = at_prevalences(truth, called, prevalences_for(STATED, truth.mean()), n_boot=300, seed=1)
    assert [r["source"] for r in rows] == ["test set", "stated"]
    at_test, at_stated = rows
    # at the test set's own prevalence it is the plain PPV of the confusion matrix
    assert at_test["ppv"] == pytest.approx((called & truth).sum() / called.sum())
    assert at_test["npv"] == pytest.approx((~called & ~truth).sum() / (~called).sum())
    assert (at_stated["ppv"], at_stated["npv"]) == pytest.approx(closed_form(se, sp, STATED))
    assert at_stated["ppv"] < 0.25 < 0.8 < at_test["ppv"]  # a 2% prevalence sinks the PPV a balanced set shows
    for row in rows:
        for name in ("ppv", "npv"):
            low, high = row["ci"][name]
            assert low <= row[name] <= high and high > low
    typical = prevalences_for(None, 0.5)
    assert [r["prevalence"] for r in typical[1:]] == list(TYPICAL_PREVALENCES) and typical[1]["source"] == "typical"
    assert np.isnan(ppv_npv(0.0, 1.0, 0.1)[0])  # nothing called positive: undefined, not 0


@pytest.mark.parametrize("field, value, match", [
    ("prevalence", 1.5, r"prevalence: bad value 1\.5; .*strictly between 0 and 1"),
    ("prevalence", True, "prevalence: bad value True"),
    ("intended_use", 3, "intended_use: bad value 3; use a sentence"),
])
def test_bad_intended_use_fields_are_named(field, value, match):
    from search.study import Dataset, Study, StudyError

    with pytest.raises(StudyError, match=match):
        Study(name="s", space=lambda t: {"backbone": "cnn_s3"},
              dataset=Dataset(positive_class="malignant"), **{field: value})


def test_a_prevalence_needs_a_positive_class():
    from search.study import Study, StudyError

    with pytest.raises(StudyError, match="a prevalence is of the positive class: set dataset.positive_class"):
        Study(name="s", space=lambda t: {"backbone": "cnn_s3"}, prevalence=0.02)


@pytest.fixture(scope="module")
def read_out(run_dir, tmp_path_factory):
    """A copy evaluated with a stated prevalence and a screening target, then reported and exported."""
    from analysis.evaluate import main as evaluate
    from analysis.export import main as export
    from analysis.report import write_report

    folder = shutil.copytree(run_dir, tmp_path_factory.mktemp("prevalence") / "tiny")
    assert evaluate([str(folder), "--top-k", "1", "--bootstrap", "200", "--prevalence", str(STATED),
                     "--target-sensitivity", "0.9"]) == 0
    assert export([str(folder), "--format", "keras", "--verify-split", "none"]) == 0
    write_report(folder)
    evaluation = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    chosen = next(m for m in evaluation["final"]["models"] if m["label"] == evaluation["final"]["model"])
    return folder, evaluation, chosen


def test_the_evaluation_records_ppv_and_npv_at_the_test_set_and_at_the_stated_prevalence(read_out):
    _, evaluation, chosen = read_out
    op = chosen["operating_point"]
    assert evaluation["prevalence"] == {"stated": STATED, "from": "--prevalence"}
    test, stated = op["at_prevalence"]
    at = op["at_threshold"]
    assert test["prevalence"] == pytest.approx((at["tp"] + at["fn"]) / evaluation["n"])
    plain = [float("nan") if v is None else v for v in (test["ppv"], at["ppv"])]
    assert plain[0] == pytest.approx(plain[1], nan_ok=True)  # the plain PPV holds at the test set's prevalence
    expected = closed_form(at["sensitivity"], at["specificity"], STATED)
    got = tuple(float("nan") if v is None else v for v in (stated["ppv"], stated["npv"]))  # JSON null: undefined
    assert stated["source"] == "stated" and got == pytest.approx(expected, nan_ok=True)


def test_report_card_and_sidecar_say_which_prevalence_each_ppv_holds_at(read_out):
    folder, _, chosen = read_out
    report = (folder / "report.md").read_text()
    card = (folder / "model_card.md").read_text()
    for text in (report, card):
        assert "2.0% | the intended setting (stated)" in text and "| the test set's |" in text
        assert "PPV and NPV depend on how common the positive class is" in text
    sidecar = json.loads(next((folder / "export").glob("*.keras.json")).read_text())
    assert [r["source"] for r in sidecar["ppv_npv"]["at_prevalence"]] == ["test set", "stated"]
    assert sidecar["ppv_npv"]["at_prevalence"][1]["ppv"] == pytest.approx(
        chosen["operating_point"]["at_prevalence"][1]["ppv"], nan_ok=True)


def test_intended_use_and_the_synthetic_mark_reach_card_report_and_sidecar(read_out):
    from analysis.intended_use import SYNTHETIC
    from conftest import INTENDED_USE, NOT_FOR

    folder, _, _ = read_out
    card = (folder / "model_card.md").read_text()
    assert f"- intended use: {INTENDED_USE}" in card and f"- not for: {NOT_FOR}" in card
    assert "- intended users: not recorded (set `Study(intended_users=...)`)" in card
    assert "prevalence of malignant in the intended setting: 2.0%" in card
    first = (folder / "report.md").read_text().split("\n## ")[1]
    assert first.startswith("The answer in short") and SYNTHETIC.capitalize() in first and INTENDED_USE in first
    assert f"Intended use: {INTENDED_USE}. Not for: {NOT_FOR}." in first  # two sentences, each with its stop
    sidecar = json.loads(next((folder / "export").glob("*.keras.json")).read_text())
    assert sidecar["intended_use"]["warning"] == SYNTHETIC and sidecar["intended_use"]["not_for"] == NOT_FOR


def test_the_first_section_holds_the_headline_numbers_of_the_record(read_out):
    folder, evaluation, chosen = read_out
    op = chosen["operating_point"]
    first = (folder / "report.md").read_text().split("\n## ")[1]
    d = 2 if evaluation["n"] < 100 else 3
    for name in ("sensitivity", "specificity"):
        value, (low, high) = op["at_threshold"][name], op["ci"][name]
        assert f"{name} {value:.{d}f} (95% CI {low:.{d}f}–{high:.{d}f})" in first
    assert f"at least {op['value']:.4f} (target sensitivity 0.9 on validation)" in first
    assert f"On {evaluation['n']} held-out test images" in first
    html = (folder / "report.html").read_text()
    assert html.index("The answer in short") < html.index("<nav>") < html.index('id="study-summary"')
    assert (folder / "report.md").read_text().index("## Near-duplicate audit") > \
        (folder / "report.md").read_text().index("## Held-out test evaluation")  # the audit below the results


def test_the_card_opens_with_the_answer_and_closes_with_the_checklist(read_out):
    folder, _, _ = read_out
    card = (folder / "model_card.md").read_text()
    assert card.index("## In short") < card.index("## Intended use and users")
    checklist = card.split("## Reporting checklist (TRIPOD+AI, CLAIM)")[1]
    assert re.search(r"\| Intended use, users and setting \| present \|", checklist)
    assert re.search(r"\| Prevalence in the intended setting \| not recorded \| set Study\(prevalence=", checklist)
    assert re.search(r"\| External validation .* \| not recorded \|", checklist)


def test_a_second_evaluation_says_before_reading_how_often_the_test_split_was_read(read_out, capsys):
    from analysis.evaluate import main as evaluate

    folder, _, _ = read_out
    reads = len(json.loads((folder / "test_evaluation.json").read_text())["test_split_log"])
    capsys.readouterr()
    assert evaluate([str(folder), "--top-k", "1", "--bootstrap", "50"]) == 0
    err = capsys.readouterr().err
    assert f"note: the test split has been read {reads} time(s) before" in err


def test_a_prevalence_without_a_positive_class_is_refused_by_name(tmp_path):
    from analysis.evaluate import EvaluateError, evaluate_top_k
    from fixtures.runs import make_run_dir

    folder = make_run_dir(tmp_path, dataset={"loader": "embedded", "path": None, "image_size": 32, "classes": None,
                                             "positive_class": None, "split": "stratified", "split_options": {},
                                             "options": {}, "seed": 0})
    splits = pd.read_parquet(folder / "splits.parquet")  # three classes: no positive one by default
    splits["label_index"] = np.arange(len(splits)) % 3
    splits["label"] = splits["label_index"].map({0: "a", 1: "b", 2: "c"})
    splits.to_parquet(folder / "splits.parquet", index=False)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    board.loc[0, "checkpoint_path"] = "trial_x/checkpoint_000000"  # the plan is made before any model is loaded
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    with pytest.raises(EvaluateError, match=r"--prevalence: a prevalence is of a positive class, and this "
                                            r"evaluation has none \(classes \['a', 'b', 'c'\]\); name one with --positive-class NAME"):
        evaluate_top_k(folder, prevalence=0.02)
