"""``python -m analysis.export RUN_DIR --format keras|tflite|savedmodel|onnx``: a deployable copy of the final model.

The model is the study's final model (``analysis.final_model``): the members,
test-time views, temperature and decision threshold ``analysis.evaluate`` fitted
on validation (``final_model.json``), or, before any evaluation, the best trial,
uncalibrated; ``--trial NAME`` exports one trial alone. The ensemble, the views
and the temperature are inside the exported graph (``FinalModel.keras_model``),
so every format returns what ``search.predict`` returns. Every backbone
preprocesses inside the model, so the artifact takes raw RGB in [0, 255]
(float32, NHWC, decoded like ``trainables.data.decode_image``) and returns
probabilities in ``class_names`` order.

- ``keras``: the graph saved without optimizer state. Loading it needs
  ``import trainables.preprocess, trainables.calibrated`` (the custom
  ``Preprocess``, ``TemperatureScaling`` and ``DihedralView`` layers).
- ``savedmodel``: a TensorFlow SavedModel with a ``serve`` / ``serving_default``
  signature; needs only TensorFlow.
- ``tflite``: converted from that SavedModel with ``tf.lite.TFLiteConverter``.
- ``onnx``: the same inference function converted with ``tf2onnx`` (opset
  ``ONNX_OPSET``), checked with ONNX Runtime; input ``image``, output
  ``probabilities``. Needs the ``onnx`` extra: ``pip install 'medsearch[onnx]'``;
  without it, ``--format onnx`` is a ``MissingConverterError`` before any work.

``--uncalibrated`` leaves the temperature out of the file (the sidecar records
it). A format that could not carry the calibration would be refused before any
work (``CalibrationNotCarriedError``; every format here carries it).

The SavedModel, TFLite and ONNX graphs are traced with ``training=False``: the
augmentation layers and dropout are inactive there, so their random ops never
reach the graph (a plain ``model.export`` keeps them and TFLite rejects them).

After writing, the artifact's predictions are compared with
``FinalModel.predict`` on the validation split (``--verify-split``; ``test`` or
``none`` on request): the labels under the decision rule must be identical and
the probabilities within ``TOLERANCES``. A numeric check needs no labels, so the
default never reads the test split; an explicit ``--verify-split test`` is logged
as a test read in ``RUN_DIR/test_evaluation.json``. A sidecar ``<out>.json``
records the model, classes, input size, calibration, decision and the check; its
paths are relative to the results folder.
"""

from __future__ import annotations

import os

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from analysis.errors import EvaluateError, ResultsFolderError
from analysis.files import EXPORT_DIR, FINAL_MODEL
from analysis.final_model import FinalModel, load_final_model
from analysis.intended_use import intended_use
from analysis.prevalence import PREVALENCE_NOTE
from analysis.reader import read_study
from analysis.records import final_evaluated, latest_evaluation, read_evaluations
from analysis.splits import DATA_DIR_HELP, decode_split, log_test_use, read_split
from search.argtypes import ArgumentParser

__all__ = ["FORMATS", "TOLERANCES", "CARRIES_CALIBRATION", "ONNX_OPSET", "ExportError", "MissingConverterError",
           "CalibrationNotCarriedError", "Verification", "require_converter", "check_calibration", "decision_text",
           "export_model", "predict_exported", "verify_export", "main"]

FORMATS = ("keras", "tflite", "savedmodel", "onnx")
# Max |probability difference| allowed. Measured worst cases (calibrated where a temperature was fitted):
# keras and savedmodel <= 1.4e-7; tflite <= 1.3e-4 and onnx <= 3.5e-4, both on a MobileNetV2 at T = 0.1 (a
# temperature below 1 sharpens, so it magnifies a converter's float32 differences by up to 1/T; raw: 4.8e-5),
# and <= 2.4e-6 on the quickstart's efficientnet_lite0 and cnn_s3 checkpoints.
TOLERANCES = {"keras": 1e-4, "savedmodel": 1e-4, "tflite": 1e-3, "onnx": 1e-3}
CARRIES_CALIBRATION = frozenset(FORMATS)  # formats whose file can hold the TemperatureScaling layer
ONNX_OPSET = 17  # ONNX Runtime >= 1.13 runs it
CONVERTERS = {"onnx": ("tf2onnx", "onnx", "onnxruntime")}  # modules a format needs beyond TensorFlow
EXIT_MISMATCH = 1
EXIT_USAGE = 2
_BATCH = 64


class ExportError(ValueError):
    """Something about the request is wrong. The message names it and the fix."""


class MissingConverterError(ExportError):
    """The format's converter is not installed (``--format onnx`` without the ``onnx`` extra)."""


class CalibrationNotCarriedError(ExportError):
    """The format cannot hold the fitted calibration; export another format, or ``--uncalibrated``."""


@dataclass(frozen=True)
class Verification:
    split: str
    n: int
    labels_agree: int  # images whose predicted label matches the checkpoint's
    max_diff: float  # largest |probability difference| over images and classes
    tolerance: float
    labels: str = "argmax"  # the rule that turned probabilities into labels
    # Images whose label differs although their probabilities agree within the tolerance: they sit on the
    # decision boundary (a Youden threshold is a validation image's own score), where float rounding decides.
    at_boundary: int = 0

    @property
    def ok(self) -> bool:
        return self.labels_agree + self.at_boundary == self.n and self.max_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        boundary = (f" ({self.at_boundary} more on the decision boundary, within the tolerance)"
                    if self.at_boundary else "")
        return (f"verified on the {self.split} split ({self.n} images): labels identical {self.labels_agree}/{self.n}"
                f"{'' if self.labels == 'argmax' else f' ({self.labels})'}{boundary}, "
                f"max |prob diff| {self.max_diff:.2e} (tolerance {self.tolerance:.0e}): {verdict}")


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def default_out(run_dir: Path, trial: str, fmt: str) -> Path:
    """``RUN_DIR/export/<trial>.<ext>``; a trial name that would put the file elsewhere is refused."""
    from search.storage import OutsideFolderError, file_name

    try:
        trial = file_name(trial, "trial_name")
    except OutsideFolderError as exc:
        raise ExportError(f"{exc}; it comes from leaderboard.parquet: name the file to write with --out") from None
    name = {"keras": f"{trial}.keras", "tflite": f"{trial}.tflite", "savedmodel": f"{trial}_savedmodel",
            "onnx": f"{trial}.onnx"}[fmt]
    return run_dir / EXPORT_DIR / name


def require_converter(fmt: str, import_module=importlib.import_module) -> None:
    """A ``MissingConverterError`` naming the install command when ``fmt`` needs a package that does not import.

    ``import_module`` is the seam the tests use to simulate a missing package.
    """
    missing = []
    for name in CONVERTERS.get(fmt, ()):
        try:
            import_module(name)
        except Exception as exc:  # ImportError when absent; a broken install raises others (AttributeError, ...)
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise MissingConverterError(f"--format {fmt} needs {', '.join(CONVERTERS[fmt])}, and "
                                    f"{'; '.join(missing)} cannot be imported; install them with "
                                    f"pip install 'medsearch[{fmt}]' (or pick another --format: "
                                    f"{', '.join(f for f in FORMATS if f != fmt)})")


def check_calibration(fmt: str, temperature: float | None, carries=None) -> None:
    """A ``CalibrationNotCarriedError`` when a calibration is to be exported in a format that cannot hold it.

    ``carries``: the formats that can (default ``CARRIES_CALIBRATION``, read at call time).
    """
    carries = CARRIES_CALIBRATION if carries is None else carries
    if temperature is not None and fmt not in carries:
        raise CalibrationNotCarriedError(
            f"--format {fmt} cannot carry the calibration fitted on validation (temperature {temperature:.4f}); "
            f"export as {' or '.join(f for f in FORMATS if f in carries)}, or pass --uncalibrated to export the raw "
            "model (the sidecar then records the temperature to apply: softmax(log p / T))")


def export_model(model, fmt: str, out: Path, *, temperature: float | None = None) -> Path:
    """Write ``model`` (a loaded checkpoint) to ``out`` in ``fmt``; atomically, replacing an earlier export.

    With ``temperature``, the written model ends in ``TemperatureScaling(temperature)``
    (``trainables.calibrated``): it outputs calibrated probabilities.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_calibration(fmt, temperature)
    out = Path(out)
    if fmt == "keras" and out.suffix != ".keras":
        raise ExportError(f"--out {str(out)!r}: a Keras file must end in .keras; e.g. {str(out.with_suffix('.keras'))!r}")
    if fmt == "savedmodel" and out.exists() and not (out / "saved_model.pb").is_file():
        raise ExportError(f"--out {str(out)!r} exists and is not a SavedModel; give a new folder name")
    if fmt != "savedmodel" and out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / ('model.' + fmt))!r}")
    if temperature is not None:
        from trainables.calibrated import with_temperature

        model = with_temperature(model, temperature)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp" + (".keras" if fmt == "keras" else ""))
    try:
        if fmt == "keras":
            model.save(tmp)
        elif fmt == "savedmodel":
            _write_savedmodel(model, tmp)
        elif fmt == "onnx":
            _write_onnx(model, tmp)
        else:
            tmp.write_bytes(_tflite_bytes(model))
        if fmt == "savedmodel" and out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk (ENOSPC), a size limit (EFBIG), a read-only folder
        raise ExportError(f"cannot write {str(out)!r} ({exc.strerror or exc}); free some space or choose a "
                          "writable --out, and run again (nothing partial was left)") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return out


def _write_savedmodel(model, folder: Path) -> None:
    """A SavedModel whose one endpoint is inference: ``model(x, training=False)``."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    with _quiet():
        archive.write_out(str(folder), verbose=False)


def _tflite_bytes(model) -> bytes:
    """Convert via an inference-only SavedModel; fall back to TF Select ops if a layer needs them."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="medsearch-export-") as folder:
        _write_savedmodel(model, Path(folder) / "savedmodel")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(folder) / "savedmodel"))
        try:
            with _quiet():
                return converter.convert()
        except Exception as exc:  # the converter raises ConverterError and others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"warning: plain TFLite conversion failed ({first}); retrying with TF Select ops, "
                  "so the .tflite file needs the Flex delegate at run time", file=sys.stderr)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
            with _quiet():
                return converter.convert()


def _write_onnx(model, path: Path) -> None:
    """The inference function ``model(x, training=False)``, converted by tf2onnx; refused unless ONNX Runtime loads it.

    tf2onnx leaves an op it cannot convert in the graph and carries on, so a
    file ONNX Runtime cannot open is an ``ExportError`` here, not a surprise later.
    """
    import logging

    import tensorflow as tf
    import tf2onnx

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    function = tf.function(lambda x: {"probabilities": model(x, training=False)}, input_signature=[spec])
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _quiet():
            tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET, output_path=str(path))
    finally:
        logger.setLevel(level)
    try:
        _onnx_session(path)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented types
        raise ExportError(f"tf2onnx wrote an ONNX model that ONNX Runtime cannot load ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); export as savedmodel "
                          "or tflite instead, or report the backbone") from None


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet():
    """Silence Python warnings (deprecations, tracing notes) during tracing and conversion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------


def predict_exported(path: Path, fmt: str, images: np.ndarray) -> np.ndarray:
    """Probabilities of an exported artifact for ``images`` ((N, H, W, 3) raw RGB), as deployment would run it."""
    x = np.asarray(images, dtype=np.float32)
    if fmt == "keras":
        import keras

        import trainables.calibrated  # noqa: F401  (registers TemperatureScaling)
        import trainables.preprocess  # noqa: F401  (registers the custom layer)

        model = keras.saving.load_model(path, compile=False)
        return np.asarray(model.predict(x, batch_size=_BATCH, verbose=0))
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        chunks = [next(iter(serve(image=tf.constant(x[i:i + _BATCH])).values())).numpy()
                  for i in range(0, len(x), _BATCH)]
        return np.concatenate(chunks)
    if fmt == "tflite":
        interpreter = _interpreter(path)
        inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        chunks = []
        for i in range(0, len(x), _BATCH):
            batch = x[i:i + _BATCH]
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"]))
            interpreter.invoke()
            chunks.append(interpreter.get_tensor(outp["index"]).copy())
        return np.concatenate(chunks)
    if fmt == "onnx":
        session = _onnx_session(path)
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i:i + _BATCH]})[0] for i in range(0, len(x), _BATCH)])
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _interpreter(path: Path):
    """LiteRT's interpreter when installed, else TensorFlow's (deprecated there, still present)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with _quiet():
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def verify_export(reference: np.ndarray, exported: np.ndarray, *, split: str, tolerance: float,
                  decide=None, labels: str = "argmax") -> Verification:
    """Compare the checkpoint's probabilities with the artifact's, image by image.

    ``decide`` turns probabilities into class indices (default: the argmax);
    ``labels`` names that rule in the summary.
    """
    reference, exported = np.asarray(reference, np.float64), np.asarray(exported, np.float64)
    if reference.shape != exported.shape:
        raise ExportError(f"the export returns shape {exported.shape}, the checkpoint {reference.shape}")
    decide = decide or (lambda probs: probs.argmax(axis=1))
    same = np.asarray(decide(reference)) == np.asarray(decide(exported))
    rows = np.abs(reference - exported).max(axis=1) if reference.size else np.zeros(len(reference))
    boundary = int((~same & (rows <= tolerance)).sum())
    diff = float(rows.max()) if reference.size else 0.0
    return Verification(split, len(reference), int(same.sum()), diff, tolerance, labels, boundary)


def decision_text(class_names: list[str], threshold: dict | None, temperature: float | None,
                  applied: bool) -> str:
    """The decision rule in words, for the exported file's output (``applied``: whether it is calibrated)."""
    prefix = "" if temperature is None or applied else \
        f"calibrate the output first (softmax(log p / {temperature:.4f})), then "
    which = "calibrated probability" if temperature is not None else "probability"
    if threshold is None:
        return prefix + f"predict the class with the highest {which} (argmax)"
    others = [c for c in class_names if c != threshold["class"]]
    otherwise = repr(others[0]) if len(others) == 1 else "the most probable other class"
    return (prefix + f"predict {threshold['class']!r} when its {which} >= {threshold['value']:.4f}, "
                     f"else {otherwise}")


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m analysis.export", allow_abbrev=False,
        description="Export the final model of a study (final_model.json: its ensemble, test-time views and "
        "temperature, fitted on validation by analysis.evaluate; else its best trial, uncalibrated; or --trial "
        "NAME) as a Keras file, a TFLite file, a TensorFlow SavedModel or an ONNX file, then check that it "
        "predicts what search.predict predicts on the validation split. Exit status 1 if it does not.",
        epilog="Example: python -m analysis.export runs/melanoma --format tflite --out melanoma.tflite")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--trial", help="export this trial alone (its trial_name) instead of the final model")
    parser.add_argument("--out", help="file (keras: *.keras, tflite, onnx) or folder (savedmodel) to write; default "
                        "RUN_DIR/export/final_model.keras|.tflite|.onnx|_savedmodel (or <trial>.* with --trial)")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="leave the temperature of final_model.json out of the file (the sidecar records it, "
                        "and that the file does not apply it)")
    parser.add_argument("--verify-split", "--verify-on", dest="verify_split", choices=("val", "test", "none"),
                        default="val", help="split whose images the export is checked on: val (default: a numeric "
                        "check needs no labels), test (logged as a read of the test split), or none to skip")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed |probability difference| (default: 1e-4 keras/savedmodel, 1e-3 tflite/onnx)")
    parser.add_argument("--data-dir", metavar="DIR", default=None, help=DATA_DIR_HELP + " (for the verification)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    try:
        require_converter(args.format)
        run_dir = Path(args.run_dir).expanduser().resolve()
        final = load_final_model(run_dir, trial=args.trial)
        name = final.label if args.trial or not final.fitted else "final_model"
        out = Path(args.out).expanduser().resolve() if args.out else default_out(run_dir, name, args.format)
        applied = final.temperature is not None and not args.uncalibrated
        check_calibration(args.format, final.temperature if applied else None)
        _print_notes(final, args.uncalibrated)
        rows = None if args.verify_split == "none" else read_split(run_dir, args.verify_split, args.data_dir)
        export_model(final.keras_model(calibrated=applied), args.format, out)
        how = (f"calibrated (temperature {final.temperature:.4f}, fitted on validation)" if applied else
               "uncalibrated (--uncalibrated)" if final.temperature is not None else "uncalibrated")
        print(f"exported {final.label} ({', '.join(final.trials)}{'; TTA ' + final.tta if final.tta else ''}) as "
              f"{args.format}, {how}: {out}")
        rule = decision_text(list(final.class_names), _threshold(final), final.temperature, applied)
        print(f"decision: {rule}")
        check = None
        if rows is not None:
            images = decode_split(rows, final.image_size)
            if args.verify_split == "test":
                log_test_use(run_dir, trials=final.trials, n_test=len(rows), by="analysis.export",
                             format=args.format, out=_shown(out, run_dir), calibrated=applied)
            raw = final.raw_probabilities(images)
            reference = final.calibrate(raw) if applied else raw
            tolerance = TOLERANCES[args.format] if args.tolerance is None else args.tolerance
            decide, labels = _labels(final, applied)
            check = verify_export(reference, predict_exported(out, args.format, images), split=args.verify_split,
                                  tolerance=tolerance, decide=decide, labels=labels)
        else:
            print("warning: not verified (--verify-split none)", file=sys.stderr)
        _write_sidecar(out, run_dir, final, args.format, check, applied=applied, rule=rule)
    except (ResultsFolderError, EvaluateError, ExportError, OutsideFolderError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if check is None:
        return 0
    print(check.summary())
    if not check.ok:
        print(f"error: the {args.format} export does not reproduce the model's predictions; do not deploy "
              f"{str(out)!r} (try --format savedmodel or keras, or report the backbone)", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


def _threshold(final: FinalModel) -> dict | None:
    """``{value, class, rule}`` of the model's decision threshold, or None for the argmax."""
    if final.threshold is None:
        return None
    return {"value": float(final.threshold), "class": final.class_names[final.positive], "rule": final.rule}


def _print_notes(final: FinalModel, uncalibrated: bool) -> None:
    print(f"note: {final.provenance()}", file=sys.stderr)
    for note in final.notes:
        print(f"note: {note}", file=sys.stderr)
    if uncalibrated and final.temperature is not None:
        print(f"note: --uncalibrated: the file outputs the raw probabilities; the temperature "
              f"{final.temperature:.4f} fitted on validation is in the sidecar, not in the model", file=sys.stderr)


def _labels(final: FinalModel, applied: bool):
    """How the deployment turns the file's output into classes: ``(decide, name)`` for ``verify_export``."""
    if final.threshold is None:
        return None, "argmax"
    if applied or final.temperature is None:
        return final.decide, "threshold"
    return (lambda probs: final.decide(final.calibrate(probs))), "calibrated, then threshold"


def _shown(path: Path, run_dir: Path) -> str:
    """``path`` relative to the results folder; only its name when it lies outside (the folder stays sealed)."""
    try:
        return Path(path).relative_to(run_dir).as_posix()
    except ValueError:
        return Path(path).name


def _write_sidecar(out: Path, run_dir: Path, final: FinalModel, fmt: str, check: Verification | None, *,
                   applied: bool, rule: str) -> None:
    """What a deployment needs beside the file: class order, input size, calibration, decision, and the check.

    Paths in it are relative to the results folder (``checkpoints``); the folder's own location is not recorded.
    """
    from trainables.calibrated import LOG_FLOOR

    temperature, size = final.temperature, final.image_size
    calibration = None if temperature is None else {
        "temperature": temperature, "applied_in_model": applied, "fitted_on": "val", "source": FINAL_MODEL,
        "formula": f"softmax(log(max(p, {LOG_FLOOR:g})) / temperature) of the members' mean probabilities p",
    }
    if temperature is None:
        output = "softmax probabilities, one per class, in class_names order (uncalibrated: no temperature fitted)"
    elif applied:
        output = (f"calibrated probabilities softmax(log p / {temperature:.4f}), one per class, in class_names "
                  "order (the file applies the temperature)")
    else:
        output = (f"uncalibrated softmax probabilities p, one per class, in class_names order (--uncalibrated): "
                  f"apply softmax(log p / {temperature:.4f}) before the threshold")
    record = {
        "format": fmt, "model": final.label, "trials": final.trials, "study": _study_name(run_dir),
        "checkpoints": [m.checkpoint for m in final.members], "tta": final.tta, "source": final.source,
        "provenance": final.provenance().replace(str(run_dir), "RUN_DIR"),
        "class_names": list(final.class_names), "image_size": size,
        "input": f"float32 (N, {size}, {size}, 3) raw RGB in [0, 255], decoded and resized like "
                 "trainables.data.decode_image (bilinear)",
        "output": output,
        "calibration": calibration,
        "temperature": temperature,
        "threshold": _threshold(final),
        "decision": rule,
        "notes": [n.replace(str(run_dir), "RUN_DIR") for n in final.notes],
        "verification": None if check is None else {**asdict(check), "ok": check.ok},
        "intended_use": intended_use(read_study(run_dir)),  # with "synthetic data: not for clinical use" where so
        "ppv_npv": _ppv_npv(run_dir, final),
    }
    if fmt == "onnx":
        record["onnx"] = {"opset": ONNX_OPSET, "input": "image", "output": "probabilities",
                          "runtime": "onnxruntime (CPUExecutionProvider) in the verification"}
    if fmt == "keras":
        record["load"] = ("import trainables.preprocess, trainables.calibrated; "
                          "keras.saving.load_model(path, compile=False)")
    from search.storage import write_atomic

    sidecar = out.parent / f"{out.name}.json"
    try:
        write_atomic(sidecar, (json.dumps(record, indent=1) + "\n").encode())
    except OSError as exc:
        raise ExportError(f"cannot write {str(sidecar)!r} ({exc.strerror or exc}); free some space and run again: "
                          f"without it {str(out)!r} has no class names or threshold beside it") from None


def _ppv_npv(run_dir: Path, final: FinalModel) -> dict | None:
    """PPV and NPV of this model at the prevalences its latest test evaluation reported (each names its own);
    None when that evaluation scored another model, or none has been run."""
    evaluation = latest_evaluation(read_evaluations(run_dir), final=True)
    scored = final_evaluated(evaluation)
    op = (scored or {}).get("operating_point") or {}
    if not op.get("at_prevalence") or list(scored.get("trials") or []) != list(final.trials):
        return None
    return {"class": op["class"], "threshold": op["value"], "split": evaluation.get("split"), "n": evaluation.get("n"),
            "note": PREVALENCE_NOTE, "at_prevalence": op["at_prevalence"]}


def _study_name(run_dir: Path) -> str | None:
    return read_study(run_dir).get("name")


if __name__ == "__main__":
    sys.exit(main())
