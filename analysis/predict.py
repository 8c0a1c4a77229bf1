"""``python -m analysis.predict RUN_DIR IMAGES_DIR`` (also ``search.predict``, ``medsearch predict``): classify new
images with the model a study ships.

The model is the study's final model (``analysis.final_model``): what
``python -m analysis.evaluate`` fitted on validation and wrote to
``final_model.json`` (its members, test-time views, temperature and decision
threshold), or, before any evaluation, the best trial, uncalibrated, deciding by
the argmax; the summary says which in ``FinalModel.provenance``'s words.
``--trial NAME`` predicts with one trial alone (with what was fitted for it),
``--threshold P`` replaces the decision threshold. Images are decoded and resized
by ``trainables.data.decode_image``, the very function that decoded the training
images, so training and prediction see the same pixels.

Output: a CSV with ``file`` (path relative to IMAGES_DIR), ``predicted`` (the
shipped decision), one ``prob_<class>`` column per class, the model that made
them (``model``, ``members``, ``tta``, ``temperature``, ``threshold``), and the
out-of-distribution check (``analysis.ood``): ``ood`` (the image looks unlike the
training images: native size, or features farther from them than 99 % of the
validation images'), ``feature_distance``, ``study_image`` (the study image it is a
copy of, by content, wherever it lies) and ``warning`` (every reason in words;
all four empty when the check could not run); and a short summary on stdout,
which counts the images that look unlike the training images. With
``--explain DIR``, also one Grad-CAM overlay PNG per image in DIR, for its
predicted class (``analysis.explain``; of the first member).
"""

from __future__ import annotations

import os

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from analysis.errors import EvaluateError, ResultsFolderError
from analysis.explain import ExplainError, explain_predictions
from analysis.final_model import FinalModel, load_final_model
from analysis.ood import CHECK_COLUMNS, OODError, check_study, summary_lines
from analysis.splits import DATA_DIR_HELP, image_paths
from search.argtypes import ArgumentParser, positive_int, probability

EXIT_USAGE = 2
DEFAULT_OUT = "predictions.csv"
_CHUNK = 512  # images decoded at a time, so memory stays bounded on large folders
_SHOW_AT_MOST = 20  # bad files listed in a message


class PredictError(ResultsFolderError):
    """Something about the inputs is wrong. The message names it and the fix."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m search.predict",
        allow_abbrev=False,  # a misspelt flag is an error, not a guess
        description="Classify a folder of new images with the model a study ships: its final model "
        "(final_model.json, fitted on validation by analysis.evaluate), else its best trial, uncalibrated "
        "(--trial picks one trial). Subfolders are searched too (--no-recursive to stop that). Writes a CSV: "
        "file, predicted, prob_<class> per class, and the model that made them.",
        epilog="Example: python -m search.predict runs/quickstart data/melanoma/prediction --out preds.csv",
    )
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart (written by python -m search.run)")
    parser.add_argument("images_dir", help="folder of .jpg/.jpeg/.png/.dcm images, any size, grayscale, RGB or RGBA")
    parser.add_argument("--trial", help="use this trial alone (its trial_name, e.g. trial_003_cnn_s3) instead of the "
                        "final model")
    parser.add_argument("--out", help=f"CSV to write (default: RUN_DIR/{DEFAULT_OUT})")
    parser.add_argument("--no-recursive", dest="recursive", action="store_false",
                        help="only images directly inside IMAGES_DIR (default: subfolders too)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="predict the readable images and keep unreadable ones as CSV rows with an 'error' "
                        "(default: stop and list them)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (default: 64)")
    parser.add_argument("--threshold", type=probability, default=None, metavar="P",
                        help="call the positive class when its (calibrated) probability is >= P, overriding the "
                        "threshold in RUN_DIR/final_model.json (default: that threshold, else the argmax)")
    parser.add_argument("--data-dir", help="for the out-of-distribution check, fitted on the study's train and "
                        f"validation images on first use: {DATA_DIR_HELP}")
    parser.add_argument("--explain", metavar="DIR",
                        help="also write one Grad-CAM overlay PNG per image into DIR (created if missing), named after "
                        "the image's relative path, showing where the model looked for the predicted class")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.storage import OutsideFolderError
    from trainables.datasets import DatasetError

    started = time.monotonic()
    try:
        run_dir = Path(args.run_dir).expanduser().resolve()
        images_dir = Path(args.images_dir).expanduser().resolve()
        files, ignored = find_images(images_dir, recursive=args.recursive)
        final = load_final_model(run_dir, trial=args.trial, threshold=args.threshold)
        out = Path(args.out).expanduser().resolve() if args.out else run_dir / DEFAULT_OUT
        if out.is_dir():
            raise PredictError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / DEFAULT_OUT)!r}")
        explain_dir = Path(args.explain).expanduser().resolve() if args.explain else None
        if explain_dir is not None and explain_dir.exists() and not explain_dir.is_dir():
            raise PredictError(f"--explain {str(explain_dir)!r} is a file; give a folder for the overlays (created "
                               "if missing)")
        if ignored:
            print(f"note: in {str(images_dir)!r}, ignored {ignored.describe(images_dir)}", file=sys.stderr)
        raw, bad = predict_files(final, files, batch_size=args.batch_size, stop_on_bad=not args.skip_corrupt)
        if len(bad) == len(files):
            raise PredictError(f"none of the {len(files)} image(s) in {str(images_dir)!r} could be read:\n"
                               f"  {_listing(bad, files, images_dir)}")
        if bad and not args.skip_corrupt:
            raise PredictError(
                f"{len(bad)} of {len(files)} image(s) in {str(images_dir)!r} could not be read:\n"
                f"  {_listing(bad, files, images_dir)}\n"
                "Fix or remove them, or add --skip-corrupt to predict the rest (they are kept in the CSV with their error)."
            )
        seen = _seen_in_study(run_dir, files)
        checks, ood_lines = ood_checks(run_dir, files, images_dir, bad, args.data_dir, sum(seen.values()))
        table = prediction_table(files, images_dir, final.calibrate(raw), final, bad, checks)
        write_csv(table, out)
        if explain_dir is not None:
            explained = explain_predictions(final.models()[0], table, files, images_dir, final.image_size,
                                            list(final.class_names), explain_dir, batch_size=args.batch_size)
    except (ResultsFolderError, OutsideFolderError, DatasetError, ExplainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) (--skip-corrupt); they are in the CSV with an "
              f"empty 'predicted' and their 'error':\n  {_listing(bad, files, images_dir)}", file=sys.stderr)
    from trainables.data import turned_by_exif

    rotated = len(turned_by_exif([f for i, f in enumerate(files) if i not in bad]))
    print(summary(table, final, images_dir, out, time.monotonic() - started, seen, ood_lines, rotated))
    if explain_dir is not None:
        member = f" (of {final.trials[0]}, the first of its {len(final.members)} members)" if len(final.members) > 1 else ""
        print(f"explanations: {len(explained)} Grad-CAM overlay(s){member} in {explain_dir}")
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


def predict_files(final: FinalModel, files: list[Path], *, batch_size: int, stop_on_bad: bool):
    """``(raw, bad)``: the final model's uncalibrated probabilities, an (N, classes) array (NaN rows for
    unreadable files), and {index: error}.

    Images are decoded in chunks, in threads, with the training decoder, then
    each chunk goes to the model in batches. Once a file fails and
    ``stop_on_bad`` is set, the rest are only decoded, to list every bad file.
    """
    import numpy as np

    from trainables.data import decode_image

    size = final.image_size
    probs = np.full((len(files), len(final.class_names)), np.nan, dtype=np.float64)
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
            probs[good] = final.raw_probabilities(batch, batch_size)
    return probs, bad


def prediction_table(files: list[Path], images_dir: Path, probs, final: FinalModel, bad: dict[int, str],
                     checks=None):
    """One row per file: its shipped decision, calibrated probabilities, the model that made them, and its
    out-of-distribution check (``checks``: ``analysis.ood.check``'s rows, one per file; None: not checked)."""
    import pandas as pd

    names = list(final.class_names)
    table = pd.DataFrame({"file": [f.relative_to(images_dir).as_posix() for f in files]})
    winners = final.decide(probs)  # unreadable rows are NaN; their winner is dropped below
    table["predicted"] = [None if i in bad else names[k] for i, k in enumerate(winners)]
    for k, name in enumerate(names):
        table[f"prob_{name}"] = probs[:, k].astype("float64")
    table["model"] = final.label
    table["members"] = ",".join(final.trials)
    table["tta"] = final.tta or "none"
    table["temperature"] = final.temperature
    table["threshold"] = final.threshold
    for column in CHECK_COLUMNS:
        table[column] = None if checks is None else checks[column].to_numpy()
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
# the out-of-distribution check, and the summary
# --------------------------------------------------------------------------


def ood_checks(run_dir: Path, files: list[Path], images_dir: Path, bad: dict[int, str], data_dir: str | None,
               seen: int = 0):
    """``(checks, lines)``: ``analysis.ood.check``'s rows for ``files`` (unreadable ones empty) and the summary's
    lines about them (``seen``: how many are the study's own files by path, noted already); ``(None, [note])``
    when the study has no reference and none can be fitted here."""
    import pandas as pd

    good = [i for i in range(len(files)) if i not in bad]
    try:
        found = check_study(run_dir, [files[i] for i in good], data_dir)
    except OODError as exc:
        return None, [f"  note: no out-of-distribution check (the 'ood' column is empty): {exc}"]
    checks = pd.DataFrame({c: [None] * len(files) for c in CHECK_COLUMNS}, dtype=object)
    checks.iloc[good] = found.to_numpy(dtype=object)
    names = [files[i].relative_to(images_dir).as_posix() for i in good]
    return checks, summary_lines(found, names, noted=seen)


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
    # Locate only the few whose file name can match: splits may list tens of thousands.
    table = table[[os.path.basename(p) in names for p in table["path"].astype(str)]]
    if table.empty:
        return {}
    try:
        paths = image_paths(run_dir, table["path"])
    except EvaluateError:  # the dataset is not on this machine: none of these files can be its images
        return {}
    seen = table[[str(Path(p).resolve()) in wanted for p in paths]]
    return {str(k): int(v) for k, v in seen["split"].value_counts().items()}


def summary(table, final: FinalModel, images_dir: Path, out: Path, seconds: float, seen: dict[str, int],
            ood_lines=(), rotated: int = 0) -> str:
    """``rotated``: how many images the decoder turned upright by their EXIF orientation (``turned_by_exif``)."""
    predicted = table["predicted"].dropna()
    names = list(final.class_names)
    lines = [f"predicted {len(predicted)} image(s) from {images_dir} in {seconds:.1f} s",
             f"  model   {final.provenance()}"]
    lines += [f"  note: {note}" for note in final.notes]
    counts = predicted.value_counts()
    width = max(len(c) for c in names)
    for name in names:
        n = int(counts.get(name, 0))
        share = f"{100 * n / len(predicted):5.1f} %" if len(predicted) else ""
        lines.append(f"  {name:<{width}}  {n:6d}  {share}")
    if seen:
        parts = ", ".join(f"{n} {split}" for split, n in sorted(seen.items()))
        lines.append(f"  note: {sum(seen.values())} of these images are in the study's splits ({parts}); "
                     "predictions on train/val images are no fair test")
    if rotated:
        from trainables.data import rotated_note

        lines.append(f"  note: {rotated_note(rotated)}")
    lines += list(ood_lines)
    lines.append(f"predictions: {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
