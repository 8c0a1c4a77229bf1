"""``python -m search.predict RUN_DIR IMAGES_DIR``: classify new images with a finished study's best model.

The model is the checkpoint of the study's best trial (by the study's own
metric and mode), or of ``--trial NAME``. Images are decoded and resized by
``trainables.data.decode_image``, the very function that decoded the training
images, so training and prediction see the same pixels. The model takes raw
[0, 255] RGB and outputs softmax probabilities, one per class, in the order
the trial was trained with (``trial.json`` in the checkpoint).

When the results folder holds ``final_model.json`` (written by
``python -m analysis.evaluate``, fitted on the validation split), the trial's
own temperature is applied, so the probabilities are calibrated, and its
decision threshold for the positive class decides ``predicted``
(``--threshold`` overrides it). Without it, the probabilities are the model's
own and ``predicted`` is their argmax; the summary says which.

Output: a CSV with ``file`` (path relative to IMAGES_DIR), ``predicted`` and
one ``prob_<class>`` column per class, and a short summary on stdout. With
``--explain DIR``, also one Grad-CAM overlay PNG per image in DIR, for its
predicted class (``analysis.explain``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The results folder, its best trial and its model: one reader serves predict, evaluate, export and the report.
from analysis.reader import (ChosenTrial, Decision, ResultsFolderError, choose_trial, load_trial_model,  # noqa: F401
                             read_decision, read_study)

EXIT_USAGE = 2
DEFAULT_OUT = "predictions.csv"
_CHUNK = 512  # images decoded at a time, so memory stays bounded on large folders
_SHOW_AT_MOST = 20  # bad files listed in a message


class PredictError(ResultsFolderError):
    """Something about the inputs is wrong. The message names it and the fix."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m search.predict",
        allow_abbrev=False,  # a misspelt flag is an error, not a guess
        description="Classify a folder of new images with the best trial of a finished study "
        "(best by the study's metric; --trial picks another). Subfolders are searched too "
        "(--no-recursive to stop that). Writes a CSV: file, predicted, prob_<class> per class.",
        epilog="Example: python -m search.predict runs/quickstart data/melanoma/prediction --out preds.csv",
    )
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart (written by python -m search.run)")
    parser.add_argument("images_dir", help="folder of .jpg/.jpeg/.png/.dcm images, any size, grayscale, RGB or RGBA")
    parser.add_argument("--trial", help="use this trial (its trial_name, e.g. trial_003_cnn_s3) instead of the best")
    parser.add_argument("--out", help=f"CSV to write (default: RUN_DIR/{DEFAULT_OUT})")
    parser.add_argument("--no-recursive", dest="recursive", action="store_false",
                        help="only images directly inside IMAGES_DIR (default: subfolders too)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="predict the readable images and keep unreadable ones as CSV rows with an 'error' "
                        "(default: stop and list them)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call (default: 64)")
    parser.add_argument("--threshold", type=_probability, default=None, metavar="P",
                        help="call the positive class when its (calibrated) probability is >= P, overriding the "
                        "threshold in RUN_DIR/final_model.json (default: that threshold, else the argmax)")
    parser.add_argument("--explain", metavar="DIR",
                        help="also write one Grad-CAM overlay PNG per image into DIR (created if missing), named after "
                        "the image's relative path, showing where the model looked for the predicted class")
    return parser.parse_args(argv)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from analysis.explain import ExplainError
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    started = time.monotonic()
    try:
        run_dir = Path(args.run_dir).expanduser().resolve()
        study = read_study(run_dir)
        images_dir = Path(args.images_dir).expanduser().resolve()
        files, ignored = find_images(images_dir, recursive=args.recursive)
        trial = choose_trial(run_dir, study, args.trial)
        out = Path(args.out).expanduser().resolve() if args.out else run_dir / DEFAULT_OUT
        if out.is_dir():
            raise PredictError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / DEFAULT_OUT)!r}")
        explain_dir = Path(args.explain).expanduser().resolve() if args.explain else None
        if explain_dir is not None and explain_dir.exists() and not explain_dir.is_dir():
            raise PredictError(f"--explain {str(explain_dir)!r} is a file; give a folder for the overlays (created "
                               "if missing)")
        model, class_names, size = load_trial_model(trial, run_dir, study)
        decision = read_decision(run_dir, study, trial.name, class_names, args.threshold)
        if ignored:
            print(f"note: in {str(images_dir)!r}, ignored {ignored.describe(images_dir)}", file=sys.stderr)
        probs, bad = predict_files(model, files, size, batch_size=args.batch_size, stop_on_bad=not args.skip_corrupt)
        if len(bad) == len(files):
            raise PredictError(f"none of the {len(files)} image(s) in {str(images_dir)!r} could be read:\n"
                               f"  {_listing(bad, files, images_dir)}")
        if bad and not args.skip_corrupt:
            raise PredictError(
                f"{len(bad)} of {len(files)} image(s) in {str(images_dir)!r} could not be read:\n"
                f"  {_listing(bad, files, images_dir)}\n"
                "Fix or remove them, or add --skip-corrupt to predict the rest (they are kept in the CSV with their error)."
            )
        table = prediction_table(files, images_dir, decision.calibrate(probs), class_names, bad, decision)
        write_csv(table, out)
        if explain_dir is not None:
            from analysis.explain import explain_predictions

            explained = explain_predictions(model, table, files, images_dir, size, class_names, explain_dir,
                                            batch_size=args.batch_size)
    except (ResultsFolderError, OutsideFolderError, DatasetError, ExplainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) (--skip-corrupt); they are in the CSV with an "
              f"empty 'predicted' and their 'error':\n  {_listing(bad, files, images_dir)}", file=sys.stderr)
    print(summary(table, trial, images_dir, out, class_names, time.monotonic() - started, _seen_in_study(run_dir, files),
                  decision))
    if explain_dir is not None:
        print(f"explanations: {len(explained)} Grad-CAM overlay(s) in {explain_dir}")
    return 0


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


def find_images(folder: Path, *, recursive: bool = True):
    """``(files, left_out)``: the image files under ``folder`` (sorted) and a ``LeftOut`` of what was skipped.

    The loaders' rule (``trainables.datasets._registry.scan_images``), so a
    folder predicted holds the files it would hold as a class folder in
    training: hidden entries (``._x.jpg`` forks, ``.ipynb_checkpoints``,
    ``__MACOSX``) skipped, symlinked folders followed once.
    """
    from trainables.datasets._registry import IMAGE_KINDS, scan_images

    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise PredictError(f"images folder {str(folder)!r} {what}; give a folder of {IMAGE_KINDS} images")
    listing = scan_images(folder, recursive=recursive)
    if not listing.images:
        where = "in it or its subfolders" if recursive else "directly in it (subfolders not searched: --no-recursive)"
        left = f" (left out: {listing.left_out.describe(folder)})" if listing.left_out else ""
        raise PredictError(f"images folder {str(folder)!r} holds no {IMAGE_KINDS} images {where}{left}")
    return listing.images, listing.left_out


def predict_files(model, files: list[Path], size: int, *, batch_size: int, stop_on_bad: bool):
    """``(probs, bad)``: an (N, classes) array (NaN rows for unreadable files) and {index: error}.

    Images are decoded in chunks, in threads, with the training decoder, then
    each chunk goes to the model in batches. Once a file fails and
    ``stop_on_bad`` is set, the rest are only decoded, to list every bad file.
    """
    import numpy as np

    from trainables.data import decode_image

    probs = np.full((len(files), model.output_shape[-1]), np.nan, dtype=np.float32)
    bad: dict[int, str] = {}

    def decode(i: int):
        try:
            return decode_image(str(files[i]), size)
        except Exception as exc:  # PIL raises many types for bad files
            bad[i] = f"{type(exc).__name__}: {exc}"
            return None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for start in range(0, len(files), _CHUNK):
            indices = range(start, min(start + _CHUNK, len(files)))
            decoded = list(pool.map(decode, indices))
            good = [i for i, image in zip(indices, decoded) if image is not None]
            if not good or (bad and stop_on_bad):
                continue
            batch = np.stack([decoded[i - start] for i in good])
            probs[good] = model.predict(batch, batch_size=batch_size, verbose=0)
    return probs, bad


def prediction_table(files: list[Path], images_dir: Path, probs, class_names: list[str], bad: dict[int, str],
                     decision: Decision | None = None):
    import pandas as pd

    table = pd.DataFrame({"file": [f.relative_to(images_dir).as_posix() for f in files]})
    # unreadable rows are NaN; their winner is dropped below
    winners = probs.argmax(axis=1) if decision is None else decision.classes(probs)
    table["predicted"] = [None if i in bad else class_names[k] for i, k in enumerate(winners)]
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probs[:, k].astype("float64")
    if bad:
        table["error"] = [bad.get(i, "") for i in range(len(files))]
    return table


def write_csv(table, out: Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        table.to_csv(tmp, index=False, float_format="%.6f")
        os.replace(tmp, out)
    except OSError as exc:
        raise PredictError(f"cannot write {str(out)!r} ({exc.strerror or exc}); choose another --out") from None


def _listing(bad: dict[int, str], files: list[Path], images_dir: Path) -> str:
    """Unreadable files, relative to ``images_dir``, with their errors; the first few only."""
    lines = [f"{files[i].relative_to(images_dir).as_posix()} ({error})" for i, error in sorted(bad.items())]
    shown = "\n  ".join(lines[:_SHOW_AT_MOST])
    more = f"\n  ... and {len(lines) - _SHOW_AT_MOST} more" if len(lines) > _SHOW_AT_MOST else ""
    return shown + more


# --------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------


def _seen_in_study(run_dir: Path, files: list[Path]) -> dict[str, int]:
    """How many of ``files`` the study's splits hold, per split: their predictions are no fair test."""
    splits = run_dir / "splits.parquet"
    if not splits.is_file():
        return {}
    import pandas as pd

    try:
        table = pd.read_parquet(splits, columns=["path", "split"])
    except Exception:  # an old or partial file is only a missed note
        return {}
    wanted = {str(f) for f in files}
    names = {f.name for f in files}
    paths = table["path"].astype(str)
    # Resolve only the few whose file name can match: splits may list tens of thousands.
    same = [os.path.basename(p) in names and str(Path(p).resolve()) in wanted for p in paths]
    seen = table[same]
    return {str(k): int(v) for k, v in seen["split"].value_counts().items()}


def summary(table, trial: ChosenTrial, images_dir: Path, out: Path, class_names: list[str], seconds: float,
            seen: dict[str, int], decision: Decision | None = None) -> str:
    predicted = table["predicted"].dropna()
    lines = [f"predicted {len(predicted)} image(s) from {images_dir} in {seconds:.1f} s"]
    value = "n/a" if math.isnan(trial.value) else f"{trial.value:.4f}"
    at = f" at epoch {trial.epoch}" if trial.epoch is not None else ""
    model = f" ({trial.backbone})" if trial.backbone else ""
    lines.append(f"  trial   {trial.name}{model}: {trial.metric} {value}{at}")
    if trial.relocated_from:
        lines.append(f"          checkpoint found in the moved run folder, not at {trial.relocated_from}")
    if decision is not None:
        if decision.temperature is not None:
            lines.append(f"  probabilities calibrated: temperature {decision.temperature:.4f}, fitted on validation "
                         "(final_model.json)")
        if decision.threshold is not None:
            lines.append(f"  predicted: {class_names[decision.positive]} when its probability is >= "
                         f"{decision.threshold:.4f}, else the most probable other class")
        lines += [f"  note: {note}" for note in decision.notes]
    counts = predicted.value_counts()
    width = max(len(c) for c in class_names)
    for name in class_names:
        n = int(counts.get(name, 0))
        share = f"{100 * n / len(predicted):5.1f} %" if len(predicted) else ""
        lines.append(f"  {name:<{width}}  {n:6d}  {share}")
    if seen:
        parts = ", ".join(f"{n} {split}" for split, n in sorted(seen.items()))
        lines.append(f"  note: {sum(seen.values())} of these images are in the study's splits ({parts}); "
                     "predictions on train/val images are no fair test")
    lines.append(f"predictions: {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
