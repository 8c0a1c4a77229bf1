"""analysis.report: report.md and a self-contained report.html with every section, on real and synthetic folders."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys

import pytest

from analysis import report as R
from analysis import report_evaluation
from fixtures.runs import DAMAGES, damage, files_under, make_run_dir, run_with_file_size_limit

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def real_copy(run_dir, tmp_path):
    """A copy of the real tiny study, so writing the report leaves the shared fixture untouched."""
    return shutil.copytree(run_dir, tmp_path / "tiny")


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_of_the_real_study_has_every_section_and_embedded_images(real_copy):
    assert R.main([str(real_copy)]) == 0
    html = (real_copy / "report.html").read_text()
    md = (real_copy / "report.md").read_text()
    for title in R.SECTIONS:
        assert re.search(rf"<h2 id=\"[a-z0-9-]+\">{re.escape(title)}</h2>", html), title
        assert f"\n## {title}\n" in md, title
    images = _embedded_pngs(html)
    assert len(images) >= 4 and all(img.startswith(PNG) for img in images)
    # Self-contained: no file or network reference from the HTML.
    assert not re.search(r'src="(?!data:)', html) and "<link" not in html
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (real_copy / rel).is_file(), rel
    assert "**Complete**" in md and "Partial results" not in md
    assert "Not run yet: `python -m analysis.evaluate" in md
    assert "| backbone | trial | status | validation balanced accuracy (best epoch) |" in md


def test_a_running_study_says_partial_results(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5, 0.6]), (1, "cnn_s3", "all", 2e-3, None, "running", [0.55])]
    folder = make_run_dir(tmp_path, trials, max_epochs=2, num_samples=6)
    md_path, html_path = R.write_report(folder)
    md, html = md_path.read_text(), html_path.read_text()
    header = md.split("## Study summary")[0]
    assert "**Partial results**: 1 trial(s) still running" in header and "2 of 6 trials" in header
    assert 'class="state partial"' in html and "<strong>Partial results</strong>" in html


def test_errored_trials_are_listed_with_their_error_line(tmp_path):
    md_path, html_path = R.write_report(make_run_dir(tmp_path))
    errored = md_path.read_text().split("## Errored trials")[1]
    assert "trial_005_mobilenet_v2" in errored and "ValueError: bad dropout 2" in errored
    assert "ValueError: bad dropout 2" in html_path.read_text().split('id="errored-trials"')[1]


def test_a_study_where_every_trial_errored_still_gets_a_report(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "errored", []), (1, "cnn_s2", "all", 2e-3, None, "errored", [])]
    md_path, html_path = R.write_report(make_run_dir(tmp_path, trials))
    md = md_path.read_text()
    assert "No trial has a validation score yet." in md and md.count("ValueError: bad dropout 2") == 2
    assert all("<h2 id" in html_path.read_text() for _ in R.SECTIONS)


def test_a_folder_that_is_not_a_results_folder(tmp_path, capsys):
    assert R.main([str(tmp_path)]) == R.EXIT_USAGE
    assert "no study.json" in capsys.readouterr().err



@pytest.mark.parametrize("what", DAMAGES)
def test_a_damaged_file_is_named_and_nothing_is_written(tmp_path, capsys, what):
    folder = make_run_dir(tmp_path)
    name = damage(folder, what)
    before = files_under(folder)
    assert R.main([str(folder)]) == R.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and repr(str(folder / name)) in err and "Traceback" not in err
    assert files_under(folder) == before


def test_a_damaged_test_log_is_named_not_reported_as_never_run(tmp_path, capsys):
    """test_evaluation.json cut short: the report must not say the test split was never read."""
    folder = make_run_dir(tmp_path)
    (folder / "test_evaluation.json").write_text('{"evaluations": [{"split": "test", ')
    before = files_under(folder)
    assert R.main([str(folder)]) == R.EXIT_USAGE
    err = capsys.readouterr().err
    assert repr(str(folder / "test_evaluation.json")) in err and "is unreadable" in err and "Traceback" not in err
    assert files_under(folder) == before


def test_a_full_disk_is_a_named_error_and_leaves_no_partial_png(tmp_path):
    """Files capped at 2 kB (RLIMIT_FSIZE) fail the first plot's write part way, as a full disk would."""
    folder = make_run_dir(tmp_path)
    before = files_under(folder)
    done = run_with_file_size_limit(["-m", "analysis.report", folder], 2048)
    assert done.returncode == R.EXIT_USAGE, done.stderr
    assert done.stderr.startswith("error: cannot write ") and "learning_curves.png" in done.stderr
    assert "Traceback" not in done.stderr
    assert files_under(folder) == before  # no 0-byte or half PNG, no temporary file


def test_a_report_that_cannot_replace_its_file_leaves_no_temporary_file(tmp_path, capsys):
    folder = make_run_dir(tmp_path)
    (folder / "report.md").mkdir()  # a real failure of the final rename: the target is a folder
    assert R.main([str(folder)]) == R.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and repr(str(folder / "report.md")) in err
    assert not [p.name for p in folder.rglob(".*")]  # no .report.md.tmp left behind


def _fake_evaluation(run_dir, *, k):
    """What analysis.evaluate.evaluate_top_k writes (its schema), without loading any model."""
    classes = ["benign", "malignant"]
    trials = []
    for rank, name in enumerate(["trial_004_mobilenet_v2", "trial_001_mobilenet_v2"][:k], start=1):
        metrics = {"loss": 0.4, "accuracy": 0.85, "balanced_accuracy": 0.84, "macro_f1": 0.83, "auc": 0.9,
                   "recall_benign": 0.9, "recall_malignant": 0.78, "precision_benign": 0.8, "f1_benign": 0.85,
                   "precision_malignant": 0.88, "f1_malignant": 0.82}
        trials.append({"rank": rank, "trial_name": name, "checkpoint": "x", "best_val_balanced_accuracy": 0.83,
                       "best_epoch": 3, "metrics": metrics, "ci": {m: [v - 0.05, v + 0.05] for m, v in metrics.items()},
                       "classification_report": {"benign": {"support": 10}, "malignant": {"support": 10}},
                       "confusion_matrix": [[9, 1], [2, 8]], "class_names": classes})
    record = {"test_split_log": [{"test_split_used_at": "2025-01-02T00:00:00+00:00", "by": "analysis.evaluate",
                                  "trials": [t["trial_name"] for t in trials], "n_test": 20}],
              "evaluations": [{"evaluated_at": "2025-01-02T00:00:01+00:00", "split": "test", "n": 20,
                               "metric": "val_balanced_accuracy", "mode": "max", "k": k, "n_boot": 1000, "seed": 0,
                               "level": 0.95, "positive_class": "malignant", "notes": [], "trials": trials}]}
    (run_dir / "test_evaluation.json").write_text(json.dumps(record))


def test_evaluate_flag_runs_the_test_evaluation_first(tmp_path, monkeypatch):
    calls = []

    def evaluate_top_k(run_dir, k=3, n_boot=1000, seed=0, **options):
        calls.append(k)
        _fake_evaluation(run_dir, k=k)

    monkeypatch.setattr(R, "evaluate_top_k", evaluate_top_k)
    monkeypatch.setattr(R, "summary", lambda *args: "")  # the fake record lacks what the summary prints
    folder = make_run_dir(tmp_path)
    assert R.main([str(folder), "--evaluate", "--top-k", "2"]) == 0
    assert calls == [2]
    md = (folder / "report.md").read_text()
    test = md.split("## Held-out test evaluation")[1].split("## Plots")[0]
    # 20 test images: one is 1/20 = 0.05, so two decimals
    assert "0.85 [0.80, 0.90]" in test and "trial_001_mobilenet_v2" in test
    assert "| malignant | 0.88 [0.83, 0.93] | 0.78 [0.73, 0.83] | 0.82 [0.77, 0.87] | 10 |" in test
    assert "read 1 time(s)" in test
    assert "report_files/confusion_test.png" in md and (folder / "report_files" / "confusion_test.png").is_file()
    assert len(_embedded_pngs((folder / "report.html").read_text())) == len(re.findall(r"!\[", md))


def test_evaluate_takes_the_final_model_options_of_analysis_evaluate(real_copy, capsys):
    """report --evaluate chooses the final model as analysis.evaluate would: TTA, ensemble, target sensitivity;
    and prints what analysis.evaluate prints, not only the report's paths."""
    assert R.main([str(real_copy), "--evaluate", "--top-k", "2", "--ensemble", "2", "--tta", "flips",
                   "--target-sensitivity", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "final model 'ensemble of top 2 + TTA flips' at its shipped decision:" in out
    assert "operating point for malignant: threshold" in out and out.rstrip().endswith("report.html")
    final = json.loads((real_copy / "final_model.json").read_text())
    assert final["tta"] == "flips" and len(final["trials"]) == 2
    assert final["threshold_rule"] == "target sensitivity 0.9 on validation"
    assert f"threshold {final['threshold']:.4f} (target sensitivity 0.9 on validation)" in \
        (real_copy / "model_card.md").read_text()


@pytest.mark.parametrize("flag", [["--tta", "flips"], ["--target-sensitivity", "0.9"], ["--ensemble", "auto"]])
def test_a_final_model_option_without_evaluate_is_refused(tmp_path, capsys, flag):
    folder = make_run_dir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        R.main([str(folder), *flag])
    assert stop.value.code == 2
    assert f"{flag[0]} chooses the final model, which only --evaluate fits" in capsys.readouterr().err
    assert not (folder / "report.md").exists()


def test_a_failed_evaluation_is_reported_and_the_report_still_written(tmp_path, monkeypatch, capsys):
    def evaluate_top_k(run_dir, k=3, n_boot=1000, seed=0, **options):
        raise ValueError("the study's split holds no test images")

    monkeypatch.setattr(R, "evaluate_top_k", evaluate_top_k)
    folder = make_run_dir(tmp_path)
    assert R.main([str(folder), "--evaluate"]) == R.EXIT_FAILED
    assert "test evaluation failed" in capsys.readouterr().err
    assert "failed: `ValueError: the study's split holds no test images`" in (folder / "report.md").read_text()


def test_published_rows_beside_ours_under_the_same_protocol(tmp_path):
    pytest.importorskip("analysis.published")
    dataset = {"loader": "melanoma", "path": "data/melanoma", "image_size": 224, "classes": None,
               "positive_class": "malignant", "split": "S1", "split_options": {}, "options": {}, "seed": 0}
    folder = make_run_dir(tmp_path, dataset=dataset)
    md = R.write_report(folder)[0].read_text()
    published = md.split("## Published results beside ours")[1].split("## Held-out test evaluation")[0]
    assert "study S1" in published and "MobileNetV2 (S1)" in published
    assert "| trial_004_mobilenet_v2 | val | accuracy | 0.8400 | 0.8805 | -0.0405 |" in published


def test_the_module_runs_from_the_command_line(tmp_path):
    import subprocess

    folder = make_run_dir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "report.md" in done.stdout and (folder / "report.html").is_file()


# --------------------------------------------------------------------------
# the report a person reads: a finished, evaluated run
# --------------------------------------------------------------------------


def _evaluate_without_models(folder, *, temperature=1.5, threshold=0.55, n_boot=200):
    """What analysis.evaluate writes for a finished run (its own scoring and record functions), with synthetic
    probabilities for the run's real test images instead of loading the checkpoints."""
    import numpy as np
    import pandas as pd

    from analysis import tables as T
    from analysis.evaluate import Shipped, score_model
    from analysis.selection import Candidate
    from analysis.operating_point import binary_at
    from analysis.splits import jsonable

    run = T.load_run(folder)
    splits = run.splits
    classes = splits.sort_values("label_index")["label"].drop_duplicates().astype(str).tolist()
    rows = splits[splits["split"] == "test"].reset_index(drop=True)
    y = rows["label_index"].to_numpy()
    positive = classes.index("malignant")
    ranked = T.scored(run).head(2)
    records, predictions, shipped_best = [], [], None
    for rank, (_, trial) in enumerate(ranked.iterrows(), start=1):
        rng = np.random.default_rng(rank)
        logits = rng.normal(size=(len(y), len(classes)))
        logits[np.arange(len(y)), y] += 0.8
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        scores = p[:, positive]
        fitted = {"temperature": {"temperature": temperature, "at_bound": False, "nll_before": 0.5, "nll_after": 0.4},
                  "threshold": {"value": threshold, "rule": "youden", "target": None,
                                "validation": binary_at(y == positive, scores, threshold)}}
        shipped = Shipped(Candidate(trial["trial_name"], (trial["trial_name"],), None), fitted, p, positive=positive)
        result = score_model(shipped, y, classes, n_boot=n_boot, seed=0, level=0.95, positive_for_auc=positive)
        records.append({"rank": rank, "trial_name": trial["trial_name"], "checkpoint": "x",
                        run.score_column: trial[run.score_column], "best_epoch": trial["best_epoch"], **result})
        frame = pd.DataFrame({"trial": trial["trial_name"], "final": rank == 1, "path": rows["path"].astype(str),
                              "label": rows["label"].astype(str), "label_index": y,
                              "predicted": [classes[i] for i in shipped.decisions]})
        for i, c in enumerate(classes):
            frame[f"prob_{c}"] = shipped.probs[:, i]
        predictions.append(frame)
        shipped_best = shipped_best or result
    evaluation = {"evaluated_at": "2025-01-02T00:00:01+00:00", "split": "test", "n": len(y), "metric": run.metric,
                  "mode": run.mode, "k": 2, "n_boot": n_boot, "seed": 0, "level": 0.95, "positive_class": "malignant",
                  "notes": [], "trials": records, "decision": "malignant if its calibrated probability >= threshold",
                  "final": {"model": shipped_best["label"], "final_model": "final_model.json", "ensemble": None,
                            "tta": None, "reliability_plot": None, "fitted_on_evaluated_split": False,
                            "models": [shipped_best]}}
    record = {"test_split_log": [{"test_split_used_at": "2025-01-02T00:00:00+00:00", "by": "analysis.evaluate",
                                  "trials": [r["trial_name"] for r in records], "n_test": len(y)}],
              "evaluations": [evaluation]}
    (folder / "test_evaluation.json").write_text(json.dumps(jsonable(record)))
    pd.concat(predictions, ignore_index=True).to_parquet(folder / "test_predictions.parquet", index=False)
    (folder / "model_card.md").write_text("# Model card: tiny\n")
    return evaluation


def _table_after(html: str, section_id: str) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (cell text, tags removed) of the first table after the section's heading."""
    part = html.split(f'<h2 id="{section_id}">', 1)[1]
    table = part[part.index("<table"):part.index("</table>")]
    headers = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    rows = [[re.sub(r"<[^>]+>", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1])]
    return headers, rows


def test_the_report_of_an_evaluated_run_fits_reads_in_words_and_states_its_resolution(real_copy, monkeypatch):
    from analysis import tables as T

    def explain_section(run, evaluation):  # analysis/explain.py's entry point, without loading a model
        s = R.Section("anything")
        s.text(f"Grad-CAM stub for {evaluation['trials'][0]['trial_name']}")
        return s

    monkeypatch.setattr(report_evaluation, "explain_section", explain_section)
    evaluation = _evaluate_without_models(real_copy)
    md_path, html_path = R.write_report(real_copy)
    html, md = html_path.read_text(), md_path.read_text()

    # the test table: at most 8 columns, headed by the label owner's words, intervals under their values
    headers, rows = _table_after(html, "held-out-test-evaluation")
    assert len(headers) <= 8 and len(rows) == 2
    assert headers == ["rank", "trial", T.label("best_val_balanced_accuracy"), T.label("test_accuracy"),
                       T.label("test_balanced_accuracy"), T.label("test_macro_f1"), T.label("test_auc"),
                       T.label("test_recall_malignant")]
    assert headers[2] == "validation balanced accuracy (best epoch)"
    assert re.fullmatch(r"\d\.\d+\s+\[\d\.\d+, \d\.\d+\]", rows[0][3]), rows[0]  # the interval under the value
    # no column name in any header of the HTML (nor in the Markdown tables' header lines)
    all_headers = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", html)]
    assert not [h for h in all_headers if re.search(r"best_|val_|_s\b|_params", h)], all_headers
    md_headers = [line for i, line in enumerate(md.splitlines()[:-1]) if md.splitlines()[i + 1].startswith("|---")]
    assert not [h for h in md_headers if "best_val_" in h or "val_balanced" in h]

    # resolution: one validation image is 1/n of the metric; whether the top trials can be told apart; test width
    val = real_copy / "splits.parquet"
    import pandas as pd

    counts = pd.read_parquet(val).query("split == 'val'")["label"].value_counts()
    k, smallest = len(counts), int(counts.min())
    step = 1 / (k * smallest)
    d = R.decimals_for(step)
    assert f"one image is 1/{k * smallest} = {step:.{d}f} of validation balanced accuracy" in md
    assert re.search(rf"The top \d+ trials are within 1/{k * smallest} = {step:.{d}f} of each other on validation "
                     r"balanced accuracy: one image; they cannot be told apart", md) \
        or re.search(rf"The best trial leads the next by 0\.\d+: .* image\(s\) at 1/{k * smallest} each", md)
    n_test = evaluation["n"]
    low, high = evaluation["trials"][0]["ci"]["balanced_accuracy"]
    td = R.decimals_for(1 / n_test)
    assert f"Resolution on test: {n_test} images; one image is 1/{n_test} = {1 / n_test:.{td}f} of accuracy" in md
    assert f"is {high - low:.{td}f} wide [{low:.{td}f}, {high:.{td}f}]" in md

    # the new sections sit with the test evaluation, in order; the model card is linked
    order = ["held-out-test-evaluation", "final-model-ensemble-calibration-operating-point",
             "roc-and-precision-recall-curves", "where-the-model-looks", "plots"]
    assert [html.index(f'<h2 id="{a}">') for a in order] == sorted(html.index(f'<h2 id="{a}">') for a in order)
    curves = html.split('<h2 id="roc-and-precision-recall-curves">')[1].split("<h2")[0]
    assert len(_embedded_pngs(curves)) == 2 and "threshold 0.5500 chosen on validation" in curves
    assert "Grad-CAM stub for " + evaluation["trials"][0]["trial_name"] in html
    assert (real_copy / "report_files" / "roc_test.png").is_file() and (real_copy / "report_files" / "pr_test.png").is_file()
    assert html.count('<a href="model_card.md">model_card.md</a>') == 2 and "[model_card.md](model_card.md)" in md


def test_a_failing_grad_cam_panel_is_a_note_and_the_report_is_still_written(tmp_path, monkeypatch):
    def explain_section(run, evaluation):
        raise RuntimeError("lost checkpoint")

    monkeypatch.setattr(report_evaluation, "explain_section", explain_section)
    md = R.write_report(make_run_dir(tmp_path))[0].read_text()
    section = md.split("\n## Where the model looks\n", 1)[1].split("\n## ", 1)[0]
    assert "Not drawn: RuntimeError: lost checkpoint" in section
