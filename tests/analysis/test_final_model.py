"""One final model, one truth (issue 25): everything that predicts serves the model ``analysis.evaluate`` chose.

After ``analysis.evaluate --ensemble 3 --tta flips`` on the session's real tiny study,
``search.predict``, ``Results.predict`` and every export format give, on the test
images, the probabilities and decisions ``test_predictions.parquet`` holds for the
final model; the report's headline confusion matrix is the one at the shipped
threshold; nothing written into the folder names a place on the machine.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLASSES = ["benign", "malignant"]
PROBS = [f"prob_{c}" for c in CLASSES]
TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-5, "tflite": 1e-3, "onnx": 1e-3}


@pytest.fixture(scope="module")
def shipped(run_dir, tmp_path_factory):
    """A copy of the tiny study, evaluated with a 3-trial ensemble and flips TTA; its final model's test rows."""
    from analysis.evaluate import main

    folder = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("final_model") / "tiny"))
    assert main([str(folder), "--ensemble", "3", "--tta", "flips", "--bootstrap", "200"]) == 0
    table = pd.read_parquet(folder / "test_predictions.parquet")
    final = table[table["final"]].reset_index(drop=True)
    assert final["trial"].iloc[0] == "ensemble of top 3 + TTA flips"  # the combination asked for
    return folder, final


def test_predictions_record_the_model_that_made_them(shipped):
    folder, final = shipped
    record = json.loads((folder / "final_model.json").read_text())
    assert final["members"].iloc[0].split(",") == record["trials"] and len(record["trials"]) == 3
    assert final["tta"].iloc[0] == "flips" == record["tta"]
    assert final["temperature"].iloc[0] == pytest.approx(record["temperature"])
    assert final["threshold"].iloc[0] == pytest.approx(record["threshold"])
    # the decision column is the shipped rule applied to the stored (calibrated) probabilities
    called = np.where(final["prob_malignant"] >= record["threshold"], "malignant", "benign")
    assert final["predicted"].tolist() == called.tolist()


def test_results_and_search_predict_serve_the_evaluated_final_model(shipped, tmp_path, capsys):
    from analysis.results import load_results
    from analysis.splits import read_split
    from search.predict import main as predict

    folder, final = shipped
    rows = read_split(folder, "test")
    results = load_results(folder)
    assert results.final_model.label == "ensemble of top 3 + TTA flips" and results.final_model.fitted
    got = results.predict(rows["path"].tolist())
    np.testing.assert_allclose(got.probabilities, final[PROBS].to_numpy(), atol=1e-5)
    assert got.labels == final["predicted"].tolist()

    images = tmp_path / "new"
    images.mkdir()
    for i, path in enumerate(rows["path"]):
        shutil.copy(path, images / f"{i:04d}{Path(path).suffix}")
    out = tmp_path / "predictions.csv"
    assert predict([str(folder), str(images), "--out", str(out)]) == 0
    assert "final model 'ensemble of top 3 + TTA flips'" in capsys.readouterr().out
    csv = pd.read_csv(out).sort_values("file").reset_index(drop=True)
    np.testing.assert_allclose(csv[PROBS].to_numpy(), final[PROBS].to_numpy(), atol=1e-5)
    assert csv["predicted"].tolist() == final["predicted"].tolist()
    assert set(csv["model"]) == {"ensemble of top 3 + TTA flips"} and set(csv["tta"]) == {"flips"}
    assert csv["threshold"].iloc[0] == pytest.approx(final["threshold"].iloc[0])


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "tflite", "onnx"])
def test_every_export_format_carries_the_ensemble_views_and_temperature(shipped, tmp_path, fmt, capsys):
    from analysis.export import main as export
    from analysis.export import predict_exported
    from analysis.final_model import load_final_model
    from analysis.splits import decode_split, read_split

    folder, final = shipped
    reads = len(json.loads((folder / "test_evaluation.json").read_text())["test_split_log"])
    out = tmp_path / {"keras": "m.keras", "savedmodel": "m_savedmodel", "tflite": "m.tflite", "onnx": "m.onnx"}[fmt]
    assert export([str(folder), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified on the val split" in printed and ": OK" in printed
    model = load_final_model(folder)
    probs = predict_exported(out, fmt, decode_split(read_split(folder, "test"), model.image_size))
    np.testing.assert_allclose(probs, final[PROBS].to_numpy(), atol=TOLERANCE[fmt])
    assert [CLASSES[i] for i in model.decide(probs)] == final["predicted"].tolist()
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["trials"] == model.trials and sidecar["tta"] == "flips" and sidecar["verification"]["split"] == "val"
    # a numeric check needs no labels: verifying on validation is no look at the test split
    assert len(json.loads((folder / "test_evaluation.json").read_text())["test_split_log"]) == reads


def test_the_reports_headline_confusion_matrix_is_the_one_at_the_shipped_threshold(shipped, monkeypatch):
    from analysis import report as R
    from analysis import report_evaluation

    folder, final = shipped
    # Grad-CAM needs no check here (tests/analysis/test_explain.py has it); it would only slow this test
    monkeypatch.setattr(report_evaluation, "explain_section", lambda run, evaluation: R.Section("stub"))
    _, html_path = R.write_report(folder)
    html = html_path.read_text()
    title = report_evaluation.CONFUSION_TITLE.format(model="ensemble of top 3 + TTA flips", split="test")
    part = html.split(f"<h3>{title}</h3>", 1)[1]
    table = part[part.index("<table"):part.index("</table>")]
    cells = [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
             for r in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1])]
    shown = {row[0]: [int(n) for n in row[1:]] for row in cells}
    expected = pd.crosstab(final["label"], final["predicted"]).reindex(index=CLASSES, columns=CLASSES, fill_value=0)
    assert shown == {c: expected.loc[c].tolist() for c in CLASSES}
    record = json.loads((folder / "test_evaluation.json").read_text())["evaluations"][-1]
    chosen = next(m for m in record["final"]["models"] if m["label"] == record["final"]["model"])
    assert chosen["confusion_matrix"] == [expected.loc[c].tolist() for c in CLASSES]  # what the plot draws


def test_the_ensemble_size_is_chosen_per_family():
    """Constructed validation predictions: without TTA the top 3 together score best, with TTA the single best."""
    from analysis.selection import ensemble_sizes, plan_final

    y = np.array([0, 1] * 30)

    def member(wrong):  # confident (0.8) on every image, wrong on those in ``wrong``
        p1 = np.where((y == 1) != wrong, 0.8, 0.2)
        return np.stack([1 - p1, p1], axis=1)

    third = np.arange(len(y)) % 3
    names = ["a", "b", "c"]
    # without TTA: each wrong on its own third (accuracy 2/3); the mean of the three is right everywhere
    val = {(n, "none"): member(third == i) for i, n in enumerate(names)}
    # with TTA: "a" right everywhere, "b" and "c" wrong everywhere: the single best wins
    val[("a", "dihedral")] = member(np.zeros(len(y), bool))
    val[("b", "dihedral")] = val[("c", "dihedral")] = member(np.ones(len(y), bool))
    plan = plan_final({"dataset": {}}, CLASSES, 3, Path("/r"), ensemble="auto", tta="auto")
    sizes = ensemble_sizes(plan, names, val, y, CLASSES, {"metric": "val_balanced_accuracy"}, 1, log=lambda _: None)
    assert sizes["none"]["k"] == 3 and sizes["dihedral"]["k"] == 1
    assert sizes["none"]["validation_scores"]["3"] > max(sizes["none"]["validation_scores"][k] for k in ("1", "2"))


def test_each_checkpoint_and_view_is_predicted_once(run_dir, tmp_path, monkeypatch):
    """--split val --ensemble auto --tta auto: the validation predictions that choose are the ones scored."""
    import analysis.evaluate as E

    folder = shutil.copytree(run_dir, tmp_path / "tiny")
    for cached in folder.glob("val_predictions_cache.parquet"):
        cached.unlink()
    calls = []
    real = E.member_probabilities

    def counted(model, images, mode, batch_size=64):
        calls.append((model.name, id(model), mode))
        return real(model, images, mode, batch_size)

    monkeypatch.setattr(E, "member_probabilities", counted)
    E.evaluate_top_k(folder, k=3, n_boot=50, split="val", ensemble="auto", tta="auto", log=lambda _: None)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    loaded = min(5, int(board["checkpoint_path"].notna().sum()))
    assert len(calls) == len(set(calls)) == 2 * loaded  # each (model, view) once: plain and dihedral


# Ray's own resume state: it records the storage path it was given and pickles the study file's place (the
# searcher loads its space from there); Ray rewrites the former when a copied folder is resumed (tests/e2e/test_resume.py).
# ray-state-backup/ holds the driver's last good copy of those files (search.disk_guard).
RAY_STATE = ("tuner.pkl", "experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
             "ray-state-backup/**/*")


def texts(path: Path) -> str:
    """Every string a file holds: a Parquet file's cells, a SQLite file's values, else its bytes."""
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        return "\n".join(str(v) for column in table.columns for v in table[column].tolist())
    if path.suffix == ".db":
        import sqlite3

        with sqlite3.connect(path) as db:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            return "\n".join(str(v) for t in tables for row in db.execute(f"SELECT * FROM {t}") for v in row)
    return path.read_bytes().decode("latin-1")


def test_nothing_written_into_the_folder_names_a_place_on_the_machine(shipped, tmp_path):
    from analysis.export import main as export
    from analysis.report import write_report
    from analysis.splits import image_paths, listed_root
    from search.predict import main as predict

    folder, _ = shipped
    write_report(folder)
    assert export([str(folder), "--format", "keras"]) == 0
    images = tmp_path / "new"
    images.mkdir()
    test_images = pd.read_parquet(folder / "splits.parquet").query("split == 'test'")["path"]
    shutil.copy(image_paths(folder, test_images[:1])[0], images / "one.png")
    assert predict([str(folder), str(images)]) == 0
    root = image_paths(folder, test_images[:1])[0].removesuffix(test_images.iloc[0])
    places = {str(folder), str(folder.parent.parent), root.rstrip("/"), sys.executable, sys.prefix, str(Path.home())}
    ray_state = {p for pattern in RAY_STATE for p in folder.glob(pattern)}
    written = [p for p in folder.rglob("*") if p.is_file() and p not in ray_state]
    names = {p.relative_to(folder).as_posix() for p in written}
    assert {"splits.parquet", "study.json", "leaderboard.parquet", "epochs.parquet", "optuna.db", "final_model.json",
            "test_predictions.parquet", "val_predictions_cache.parquet", "test_evaluation.json", "report.md",
            "report.html", "model_card.md", "predictions.csv"} <= names
    assert any(n.endswith("/trial.json") for n in names) and any(n.startswith("export/") for n in names)
    for path in written:
        text = texts(path)
        found = [p for p in places if p and p in text]
        assert not found, f"{path.relative_to(folder)} names {found}"
