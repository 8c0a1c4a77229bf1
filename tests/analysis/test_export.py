"""Export: the artifact predicts what the checkpoint predicts; a mismatch exits 1."""

import json
import shutil

import numpy as np
import pytest

from analysis.export import EXIT_MISMATCH, Verification, main, predict_exported, verify_export


@pytest.fixture(scope="module")
def run_copy(run_dir, tmp_path_factory):
    """A copy, so the exports and the test-split log stay out of the shared folder."""
    return shutil.copytree(run_dir, tmp_path_factory.mktemp("export") / "tiny")


def checkpoint_predictions(folder, split="test"):
    """The best trial's checkpoint on a split, loaded and decoded the way search.predict does."""
    from analysis.evaluate import decode_split, read_split
    from search.predict import choose_trial, load_trial_model, read_study

    study = read_study(folder)
    trial = choose_trial(folder, study, None)
    model, class_names, size = load_trial_model(trial, folder, study)
    images = decode_split(read_split(folder, split), size)
    return trial, model, images, model.predict(images, verbose=0)


def test_tflite_export_agrees_with_the_keras_model(run_copy, tmp_path, capsys):
    out = tmp_path / "model.tflite"
    assert main([str(run_copy), "--format", "tflite", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labels identical" in printed and "max |prob diff|" in printed and printed.rstrip().endswith("OK")

    trial, _, images, reference = checkpoint_predictions(run_copy)
    exported = predict_exported(out, "tflite", images)
    assert np.array_equal(exported.argmax(axis=1), reference.argmax(axis=1))
    assert np.abs(exported - reference).max() < 1e-3

    sidecar = json.loads((tmp_path / "model.tflite.json").read_text())
    assert sidecar["trial"] == trial.name and sidecar["class_names"] == ["benign", "malignant"]
    assert sidecar["verification"]["ok"] and sidecar["verification"]["n"] == len(images)
    log = json.loads((run_copy / "test_evaluation.json").read_text())["test_split_log"]
    assert log[-1]["by"] == "analysis.export" and log[-1]["trials"] == [trial.name] and log[-1]["format"] == "tflite"


def test_keras_export_round_trips(run_copy, tmp_path):
    out = tmp_path / "model.keras"
    assert main([str(run_copy), "--format", "keras", "--out", str(out)]) == 0
    trial, model, images, reference = checkpoint_predictions(run_copy)
    import keras

    import trainables.preprocess  # noqa: F401  (the custom layer)

    again = keras.saving.load_model(out, compile=False)
    assert again.get_config() == model.get_config()
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
    assert np.array_equal(again.predict(images, verbose=0), reference)


def test_savedmodel_export_verified_on_val_does_not_touch_the_test_log(run_copy, tmp_path, capsys):
    before = json.loads((run_copy / "test_evaluation.json").read_text())["test_split_log"] \
        if (run_copy / "test_evaluation.json").exists() else []
    out = tmp_path / "saved"
    assert main([str(run_copy), "--format", "savedmodel", "--out", str(out), "--verify-on", "val"]) == 0
    assert "verified on the val split" in capsys.readouterr().out
    *_, images, reference = checkpoint_predictions(run_copy, "val")
    assert np.abs(predict_exported(out, "savedmodel", images) - reference).max() < 1e-4
    after = json.loads((run_copy / "test_evaluation.json").read_text())["test_split_log"] \
        if (run_copy / "test_evaluation.json").exists() else []
    assert after == before


def test_a_disagreeing_export_exits_1(run_copy, tmp_path, monkeypatch, capsys):
    def flipped(path, fmt, images):
        probs = predict_exported(path, fmt, images)
        return probs[:, ::-1]  # every label changes

    monkeypatch.setattr("analysis.export.predict_exported", flipped)
    assert main([str(run_copy), "--format", "keras", "--out", str(tmp_path / "m.keras"), "--verify-on", "val"]) \
        == EXIT_MISMATCH
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "do not deploy" in captured.err


def test_a_keras_file_must_end_in_keras(run_copy, tmp_path, capsys):
    assert main([str(run_copy), "--format", "keras", "--out", str(tmp_path / "m.h5"), "--verify-on", "none"]) == 2
    assert "must end in .keras" in capsys.readouterr().err


def test_verification_needs_identical_labels_and_close_probabilities():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.5004, 0.4996]])
    assert verify_export(reference, reference + 1e-5, split="test", tolerance=1e-4).ok
    assert not verify_export(reference, reference + 2e-4, split="test", tolerance=1e-4).ok
    flipped = reference.copy()
    flipped[2] = [0.4996, 0.5004]  # within 1e-3, but the label changes
    check = verify_export(reference, flipped, split="test", tolerance=1e-3)
    assert check == Verification("test", 3, 2, pytest.approx(8e-4), 1e-3) and not check.ok
