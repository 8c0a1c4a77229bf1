"""Export: the artifact predicts what the (calibrated) checkpoint predicts; a mismatch exits 1."""

import json
import shutil

import numpy as np
import pytest

from analysis.export import (CONVERTERS, EXIT_MISMATCH, FORMATS, TOLERANCES, CalibrationNotCarriedError, MissingConverterError,
                             Verification, check_calibration, decision_text, main, predict_exported,
                             require_converter, verify_export)

TEMPERATURE = 0.25  # sharpens: the calibrated probabilities differ from the raw ones by far more than a tolerance
OUT = {"keras": "m.keras", "savedmodel": "m_savedmodel", "tflite": "m.tflite", "onnx": "m.onnx"}


@pytest.fixture(scope="module")
def run_copy(run_dir, tmp_path_factory):
    """A copy, so the exports and the test-split log stay out of the shared folder; without a calibration."""
    folder = shutil.copytree(run_dir, tmp_path_factory.mktemp("export") / "tiny")
    (folder / "final_model.json").unlink(missing_ok=True)  # another test module may have evaluated the run
    return folder


@pytest.fixture(scope="module")
def calibrated_copy(run_dir, tmp_path_factory):
    """A copy whose final_model.json holds TEMPERATURE and a threshold for the best trial, as analysis.evaluate
    writes them; returns ``(folder, threshold)``."""
    from analysis.calibration import apply_temperature

    folder = shutil.copytree(run_dir, tmp_path_factory.mktemp("export_calibrated") / "tiny")
    trial, _, _, raw = checkpoint_predictions(folder, "val")
    # mid-way across the widest gap among the middle half of the calibrated validation probabilities of
    # malignant: some images on each side, none within a converter's rounding of it
    middle = np.sort(apply_temperature(raw, TEMPERATURE)[:, 1])[len(raw) // 4: len(raw) - len(raw) // 4]
    widest = int(np.diff(middle).argmax())
    threshold = float((middle[widest] + middle[widest + 1]) / 2)
    (folder / "final_model.json").write_text(json.dumps({
        "by": "analysis.evaluate", "class_names": ["benign", "malignant"], "positive_class": "malignant",
        "model": trial.name, "trials": [trial.name], "checkpoints": [trial.checkpoint.relative_to(folder).as_posix()],
        "tta": None, "temperature": TEMPERATURE, "threshold": threshold, "threshold_rule": "target sensitivity 0.95 on validation",
        "per_trial": {trial.name: {"temperature": TEMPERATURE, "threshold": {
            "class": "malignant", "value": threshold, "rule": "target sensitivity 0.95 on validation"}}}}))
    return folder, threshold


def checkpoint_predictions(folder, split="test"):
    """The best trial's checkpoint on a split (raw probabilities), loaded and decoded the way search.predict does."""
    from analysis.splits import decode_split, read_split
    from analysis.reader import choose_trial, load_trial_model, read_study

    study = read_study(folder)
    trial = choose_trial(folder, study, None)
    model, class_names, size = load_trial_model(trial, folder, study)
    images = decode_split(read_split(folder, split), size)
    return trial, model, images, model.predict(images, verbose=0)


def test_tflite_export_agrees_with_the_keras_model(run_copy, tmp_path, capsys):
    out = tmp_path / "model.tflite"
    # an explicit test verification, logged as a read of the test split (the default, val, is not)
    assert main([str(run_copy), "--format", "tflite", "--out", str(out), "--verify-split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "labels identical" in printed and "max |prob diff|" in printed and printed.rstrip().endswith("OK")

    trial, _, images, reference = checkpoint_predictions(run_copy)
    exported = predict_exported(out, "tflite", images)
    assert np.array_equal(exported.argmax(axis=1), reference.argmax(axis=1))
    assert np.abs(exported - reference).max() < 1e-3

    sidecar = json.loads((tmp_path / "model.tflite.json").read_text())
    assert sidecar["trials"] == [trial.name] and sidecar["class_names"] == ["benign", "malignant"]
    assert sidecar["verification"]["ok"] and sidecar["verification"]["n"] == len(images)
    assert "run_dir" not in sidecar and str(run_copy) not in json.dumps(sidecar)  # the folder is sealed
    assert sidecar["checkpoints"] == [trial.checkpoint.relative_to(run_copy).as_posix()]
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
    flipped[2] = [0.4996, 0.5004]  # within 1e-3, but the label changes: the image sits on the decision boundary
    check = verify_export(reference, flipped, split="test", tolerance=1e-3)
    assert check == Verification("test", 3, 2, pytest.approx(8e-4), 1e-3, at_boundary=1) and check.ok
    assert "1 more on the decision boundary" in check.summary()
    check = verify_export(reference, flipped, split="test", tolerance=1e-4)  # beyond the tolerance: a mismatch
    assert check.at_boundary == 0 and not check.ok


def test_decision_text_names_the_threshold_class_and_the_other():
    threshold = {"value": 0.32314, "class": "malignant", "rule": "target sensitivity 0.95 on validation"}
    assert decision_text(["benign", "malignant"], threshold, 1.3, True) == \
        "predict 'malignant' when its calibrated probability >= 0.3231, else 'benign'"
    assert decision_text(["a", "malignant", "c"], threshold, None, False) == \
        "predict 'malignant' when its probability >= 0.3231, else the most probable other class"
    assert decision_text(["benign", "malignant"], None, 2.0, False) == \
        "calibrate the output first (softmax(log p / 2.0000)), then predict the class with the highest " \
        "calibrated probability (argmax)"


# --------------------------------------------------------------------------
# ONNX, and the calibration inside every format
# --------------------------------------------------------------------------


def test_onnx_export_of_the_best_trial_matches_the_checkpoint(run_copy, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main([str(run_copy), "--format", "onnx", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("OK") and "labels identical" in captured.out
    assert "no final_model.json in the results folder" in captured.err and "python -m analysis.evaluate" in captured.err
    assert "verified on the val split" in captured.out  # the default: a numeric check needs no test labels

    trial, _, images, reference = checkpoint_predictions(run_copy, "val")
    exported = predict_exported(out, "onnx", images)
    assert np.array_equal(exported.argmax(axis=1), reference.argmax(axis=1))
    assert np.abs(exported - reference).max() <= TOLERANCES["onnx"]

    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["calibration"] is None and sidecar["temperature"] is None and sidecar["threshold"] is None
    assert sidecar["trials"] == [trial.name] and sidecar["class_names"] == ["benign", "malignant"]
    assert sidecar["onnx"]["input"] == "image" and sidecar["onnx"]["output"] == "probabilities"
    assert sidecar["verification"]["ok"] and sidecar["verification"]["tolerance"] == TOLERANCES["onnx"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_exports_the_calibrated_probabilities(calibrated_copy, tmp_path, fmt, capsys):
    from analysis.calibration import apply_temperature

    folder, threshold = calibrated_copy
    out = tmp_path / OUT[fmt]
    assert main([str(folder), "--format", fmt, "--out", str(out), "--verify-on", "val"]) == 0
    captured = capsys.readouterr()
    assert f"calibrated (temperature {TEMPERATURE:.4f}" in captured.out and captured.out.rstrip().endswith("OK")
    assert "labels identical" in captured.out and "(threshold)" in captured.out

    trial, _, images, raw = checkpoint_predictions(folder, "val")
    calibrated = apply_temperature(raw, TEMPERATURE)
    tolerance = TOLERANCES[fmt]
    assert np.abs(calibrated - raw).max() > 10 * tolerance  # else this test could not tell the two apart
    exported = predict_exported(out, fmt, images)
    assert np.abs(exported - calibrated).max() <= tolerance
    assert np.array_equal(exported.argmax(axis=1), calibrated.argmax(axis=1))

    sidecar = json.loads((tmp_path / f"{OUT[fmt]}.json").read_text())
    assert sidecar["temperature"] == TEMPERATURE and sidecar["calibration"]["applied_in_model"] is True
    assert sidecar["calibration"]["source"] == "final_model.json"
    assert sidecar["threshold"] == {"value": threshold, "class": "malignant",
                                    "rule": "target sensitivity 0.95 on validation"}
    assert sidecar["class_names"] == ["benign", "malignant"] and sidecar["trials"] == [trial.name]
    assert sidecar["decision"] == f"predict 'malignant' when its calibrated probability >= {threshold:.4f}, else 'benign'"
    assert sidecar["verification"]["labels"] == "threshold" and sidecar["verification"]["ok"]
    assert str(folder) not in json.dumps(sidecar)


def test_uncalibrated_exports_the_raw_model_and_says_so(calibrated_copy, tmp_path, capsys):
    folder, threshold = calibrated_copy
    out = tmp_path / "raw.onnx"
    assert main([str(folder), "--format", "onnx", "--out", str(out), "--verify-on", "val", "--uncalibrated"]) == 0
    captured = capsys.readouterr()
    assert "--uncalibrated" in captured.err and captured.out.rstrip().endswith("OK")

    *_, images, raw = checkpoint_predictions(folder, "val")
    assert np.abs(predict_exported(out, "onnx", images) - raw).max() <= TOLERANCES["onnx"]
    sidecar = json.loads((tmp_path / "raw.onnx.json").read_text())
    assert sidecar["calibration"]["applied_in_model"] is False and sidecar["temperature"] == TEMPERATURE
    assert sidecar["decision"].startswith(f"calibrate the output first (softmax(log p / {TEMPERATURE:.4f}))")
    assert sidecar["threshold"]["value"] == threshold


def test_a_missing_converter_is_a_named_error_before_any_work(tmp_path, monkeypatch, capsys):
    def no_tf2onnx(name):
        if name == "tf2onnx":
            raise ModuleNotFoundError("No module named 'tf2onnx'")

    with pytest.raises(MissingConverterError, match=r"pip install 'medsearch\[onnx\]'"):
        require_converter("onnx", import_module=no_tf2onnx)
    require_converter("tflite", import_module=no_tf2onnx)  # needs TensorFlow only

    # through the command: refused before the (missing) results folder is even looked at
    monkeypatch.setitem(CONVERTERS, "onnx", ("medsearch_no_such_converter",))
    assert main([str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "medsearch_no_such_converter" in err and "pip install 'medsearch[onnx]'" in err
    assert "does not exist" not in err


def test_a_format_that_cannot_carry_the_calibration_is_refused_before_any_work(calibrated_copy, tmp_path,
                                                                               monkeypatch, capsys):
    with pytest.raises(CalibrationNotCarriedError, match="--uncalibrated"):
        check_calibration("tflite", 1.5, carries={"keras"})
    check_calibration("tflite", None, carries={"keras"})  # nothing to carry

    folder, _ = calibrated_copy
    monkeypatch.setattr("analysis.export.CARRIES_CALIBRATION", frozenset({"keras"}))
    out = tmp_path / "m.tflite"
    assert main([str(folder), "--format", "tflite", "--out", str(out), "--verify-on", "none"]) == 2
    assert "cannot carry the calibration" in capsys.readouterr().err and not out.exists()
    assert main([str(folder), "--format", "tflite", "--out", str(out), "--verify-on", "none", "--uncalibrated"]) == 0
    assert out.exists()


def test_a_full_disk_is_a_named_error_and_leaves_no_partial_file(run_copy, tmp_path):
    """A write cut short (EFBIG, as ENOSPC on a full disk): exit 2 naming the file, nothing partial left."""
    from fixtures.runs import run_with_file_size_limit

    out = tmp_path / "out"
    out.mkdir()
    done = run_with_file_size_limit(["-m", "analysis.export", run_copy, "--format", "keras", "--out",
                                     out / "model.keras", "--verify-on", "none"], 64 * 1024)
    assert done.returncode == 2, done.stderr
    assert "cannot write" in done.stderr and "model.keras" in done.stderr and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []
