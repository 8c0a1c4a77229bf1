"""``python -m analysis.export RUN_DIR --format keras|tflite|savedmodel``: a deployable copy of a trial's model.

The model is the checkpoint of the study's best trial (``analysis.reader``'s
choice: the study's metric and mode on validation), or of ``--trial NAME``.
Every backbone preprocesses inside the model, so the exported artifact takes
raw RGB in [0, 255] (float32, NHWC, decoded like ``trainables.data.decode_image``)
and returns softmax probabilities in ``class_names`` order.

- ``keras``: the checkpoint re-saved without optimizer state. Loading it
  needs ``import trainables.preprocess`` (the custom ``Preprocess`` layer).
- ``savedmodel``: a TensorFlow SavedModel with a ``serve`` / ``serving_default``
  signature; needs only TensorFlow.
- ``tflite``: converted from that SavedModel with ``tf.lite.TFLiteConverter``.

The SavedModel and TFLite graphs are traced with ``training=False``: the
augmentation layers and dropout are inactive there, so their random ops never
reach the graph (a plain ``model.export`` keeps them and TFLite rejects them).

After writing, the artifact's predictions are compared with the checkpoint's
on the test split (``--verify-on val`` for the validation split; ``none`` to
skip): the labels must be identical and the probabilities within a tolerance.
A reading of the test split is logged in ``RUN_DIR/test_evaluation.json``.
A sidecar ``<out>.json`` records the trial, classes, input size and the check.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["FORMATS", "TOLERANCES", "ExportError", "Verification", "export_model", "predict_exported",
           "verify_export", "main"]

FORMATS = ("keras", "tflite", "savedmodel")
TOLERANCES = {"keras": 1e-4, "savedmodel": 1e-4, "tflite": 1e-3}  # max |probability difference| allowed
EXIT_MISMATCH = 1
EXIT_USAGE = 2
_BATCH = 64


class ExportError(ValueError):
    """Something about the request is wrong. The message names it and the fix."""


@dataclass(frozen=True)
class Verification:
    split: str
    n: int
    labels_agree: int  # images whose predicted label matches the checkpoint's
    max_diff: float  # largest |probability difference| over images and classes
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.labels_agree == self.n and self.max_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"verified on the {self.split} split ({self.n} images): labels identical {self.labels_agree}/{self.n}, "
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
    name = {"keras": f"{trial}.keras", "tflite": f"{trial}.tflite", "savedmodel": f"{trial}_savedmodel"}[fmt]
    return run_dir / "export" / name


def export_model(model, fmt: str, out: Path) -> Path:
    """Write ``model`` (a loaded checkpoint) to ``out`` in ``fmt``; atomically, replacing an earlier export."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "keras" and out.suffix != ".keras":
        raise ExportError(f"--out {str(out)!r}: a Keras file must end in .keras; e.g. {str(out.with_suffix('.keras'))!r}")
    if fmt == "savedmodel" and out.exists() and not (out / "saved_model.pb").is_file():
        raise ExportError(f"--out {str(out)!r} exists and is not a SavedModel; give a new folder name")
    if fmt != "savedmodel" and out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / ('model.' + fmt))!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp" + (".keras" if fmt == "keras" else ""))
    try:
        if fmt == "keras":
            model.save(tmp)
        elif fmt == "savedmodel":
            _write_savedmodel(model, tmp)
        else:
            tmp.write_bytes(_tflite_bytes(model))
        if fmt == "savedmodel" and out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
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


def verify_export(reference: np.ndarray, exported: np.ndarray, *, split: str, tolerance: float) -> Verification:
    """Compare the checkpoint's probabilities with the artifact's, image by image."""
    reference, exported = np.asarray(reference, np.float64), np.asarray(exported, np.float64)
    if reference.shape != exported.shape:
        raise ExportError(f"the export returns shape {exported.shape}, the checkpoint {reference.shape}")
    agree = int((reference.argmax(axis=1) == exported.argmax(axis=1)).sum())
    diff = float(np.abs(reference - exported).max()) if reference.size else 0.0
    return Verification(split, len(reference), agree, diff, tolerance)


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.export", allow_abbrev=False,
        description="Export the best trial of a study (or --trial NAME) as a Keras file, a TFLite file or a "
        "TensorFlow SavedModel, then check that it predicts what the checkpoint predicts on the test split. "
        "Exit status 1 if it does not.",
        epilog="Example: python -m analysis.export runs/melanoma --format tflite --out melanoma.tflite")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--trial", help="export this trial (its trial_name) instead of the best")
    parser.add_argument("--out", help="file (keras: *.keras, tflite) or folder (savedmodel) to write; default "
                        "RUN_DIR/export/<trial>.keras|.tflite|_savedmodel")
    parser.add_argument("--verify-on", choices=("test", "val", "none"), default=None,
                        help="split to compare predictions on: test (default; val when the study has no test "
                        "split), val, or none to skip the check")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed |probability difference| (default: 1e-4 keras/savedmodel, 1e-3 tflite)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from analysis.evaluate import EvaluateError, decode_split, log_test_use, read_split
    from analysis.reader import ResultsFolderError, choose_trial, load_trial_model, read_study
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    try:
        run_dir = Path(args.run_dir).expanduser().resolve()
        study = read_study(run_dir)
        trial = choose_trial(run_dir, study, args.trial)
        out = Path(args.out).expanduser().resolve() if args.out else default_out(run_dir, trial.name, args.format)
        model, class_names, size = load_trial_model(trial, run_dir, study)
        split = args.verify_on
        if split is None:
            split = "test" if _has_split(run_dir, "test") else "val"
            if split == "val":
                print("note: the study's split has no test images; verifying on the validation split", file=sys.stderr)
        rows = None if split == "none" else read_split(run_dir, split)
        export_model(model, args.format, out)
        print(f"exported {trial.name} ({trial.backbone}, {trial.metric} {trial.value:.4f}) as {args.format}: {out}")
        check = None
        if rows is not None:
            images = decode_split(rows, size)
            if split == "test":
                log_test_use(run_dir, trials=[trial.name], n_test=len(rows), by="analysis.export",
                             format=args.format, out=str(out))
            reference = model.predict(images, batch_size=_BATCH, verbose=0)
            tolerance = TOLERANCES[args.format] if args.tolerance is None else args.tolerance
            check = verify_export(reference, predict_exported(out, args.format, images), split=split,
                                  tolerance=tolerance)
        else:
            print("warning: not verified (--verify-on none)", file=sys.stderr)
        _write_sidecar(out, run_dir, trial, args.format, class_names, size, check)
    except (ResultsFolderError, EvaluateError, ExportError, OutsideFolderError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if check is None:
        return 0
    print(check.summary())
    if not check.ok:
        print(f"error: the {args.format} export does not reproduce the checkpoint's predictions; do not deploy "
              f"{str(out)!r} (try --format savedmodel or keras, or report the backbone)", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


def _has_split(run_dir: Path, split: str) -> bool:
    import pandas as pd

    try:
        return bool((pd.read_parquet(run_dir / "splits.parquet", columns=["split"])["split"] == split).any())
    except Exception:  # a missing file is reported by read_split
        return True


def _write_sidecar(out: Path, run_dir: Path, trial, fmt: str, class_names: list[str], size: int,
                   check: Verification | None) -> None:
    """What a deployment needs beside the file: class order and input size, and how it was checked."""
    record = {
        "format": fmt, "trial": trial.name, "backbone": trial.backbone, "run_dir": str(run_dir),
        "checkpoint": trial.checkpoint.relative_to(run_dir).as_posix(), "validation": {trial.metric: trial.value},
        "class_names": class_names, "image_size": size,
        "input": f"float32 (N, {size}, {size}, 3) raw RGB in [0, 255], decoded and resized like "
                 "trainables.data.decode_image (bilinear)",
        "output": "softmax probabilities, one per class, in class_names order",
        "verification": None if check is None else {**asdict(check), "ok": check.ok},
    }
    from search.storage import write_atomic

    write_atomic(out.parent / f"{out.name}.json", (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
