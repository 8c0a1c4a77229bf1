"""Out-of-distribution warnings: does an image look like the images a study's model was trained on?

Why: a classifier answers every image, and confidently. A model trained on 64-px
synthetic lesions called real 224-px dermoscopy photographs "malignant" at up to
0.85. Its probabilities say nothing about images unlike its training images, so
``search.predict`` and ``Results.predict`` say, per image, when an image is one of
those, and when it is one of the study's own images (whose prediction is no fair test).

The study's **reference** (``fit_reference``), written to ``RUN_DIR/ood_reference.parquet``
(``analysis.files.OOD_REFERENCE``), one row per image of the study's splits, holds:

- the native size of each train and validation image (width, height in px, read from
  the file's header): an image more than ``SIZE_SLACK`` times smaller or larger than
  the training images' 1st-99th percentile, or whose aspect ratio is outside theirs by
  more than ``ASPECT_SLACK``, is flagged;
- the pooled features of a fixed ImageNet backbone, exactly as the leakage audit
  computes them (``trainables.near_duplicates.image_embeddings``: the study's audit
  backbone, by default ``efficientnet_lite0`` at 128 px, weights shipped with pip), for
  each training image. An image's *feature distance* is its mean cosine distance to
  its ``K_NEAREST`` nearest training images; it is flagged above the ``PERCENTILE``-th
  percentile of the validation images' distances (calibrated on validation, so about
  1 - PERCENTILE / 100 of images like the validation images are flagged);
- each image's content, to recognise a copy wherever it lies: the SHA-256 of its bytes
  (train, validation and test; a test file's bytes are hashed, never decoded or scored:
  only the final evaluation reads the test split) and, for train and validation, the
  audit's perceptual hash (``trainables.near_duplicates.image_hash``), which also
  finds a re-encoded, resized or flipped copy.

When it is fitted: lazily, by the first prediction that needs it (``reference_for``,
one line says so and how long it took), then read back. The reference describes the
study's *images*, not a model's weights: every trial and every final model of a study
is trained on the same train split and calibrated on the same validation split, both
named by ``splits.parquet`` (written once, when the study starts). So it records what
it was fitted for (``fitted_for``: the SHA-256 of ``splits.parquet``, the backbone, its
input size and this module's ``VERSION``) and is refitted whenever one of them differs,
not when a new final model is fitted. Images edited in place under the same names are
not noticed: delete the file to refit.

Images are named relative to the dataset's root, as ``splits.parquet`` names them: the
file names no place on the machine that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError, EvaluateError, ResultsFolderError
from analysis.files import OOD_REFERENCE, SPLITS

__all__ = ["PERCENTILE", "K_NEAREST", "SIZE_SLACK", "ASPECT_SLACK", "COPY_HASH_DISTANCE", "VERSION", "CHECK_COLUMNS",
           "OODError", "Reference", "fit_reference", "load_reference", "reference_for", "check", "check_study",
           "summary_lines"]

PERCENTILE = 99.0  # the feature-distance threshold: this percentile of the validation images' distances
K_NEAREST = 5  # an image's feature distance: its mean cosine distance to this many nearest training images
SIZE_SLACK = 1.5  # flag a width or height below 1st percentile / SLACK or above 99th percentile * SLACK of training's
ASPECT_SLACK = 1.15  # the same for width / height: 1.15 lets a 4:3 photograph pass among 3:2 ones, not a 1:1
SIZE_PERCENTILES = (1.0, 99.0)  # the training images' size range, robust to a stray odd image
# pHash bits (of 256) within which an image is taken for a copy of a study image. Measured on the quickstart's
# 96-px embedded images: JPEG (quality 75) copies, resized to 224 px or flipped, differ from their original in
# 6-12 bits; a freshly generated image (another seed) from its nearest study image in 42 or more, a dermoscopy
# photograph in 72 or more. Stricter than the audit's near-duplicate threshold (26), which also pairs crops and
# look-alike dermoscopy images: here a match tells a user the prediction is no fair test.
COPY_HASH_DISTANCE = 20
VERSION = 1  # recorded in fitted_for: bump when the reference is computed otherwise, so old ones are refitted
META_KEY = "ood_reference"  # the parquet metadata key of the reference's settings, threshold and fitted_for
CHECK_COLUMNS = ["ood", "feature_distance", "study_image", "warning"]  # what ``check`` returns, per image
_SHOW_AT_MOST = 3  # flagged images named in the summary line; the CSV has them all
_BLOCK = 1024  # query images compared at a time: the products stay ~100 MB against 10,000 training images


class OODError(AnalysisError):
    """The reference cannot be fitted or read. The message names what is missing and the fix."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """A study's out-of-distribution reference: one row per image (``images``) and its settings (``meta``)."""

    images: pd.DataFrame  # image, split, width, height, sha256, phash (hex, 256 bits), embedding (train only)
    meta: dict  # fitted_for, threshold, percentile, k, embedding, embedding_size, size ranges, seconds
    weights_dir: str | None = None  # where the backbone's weights are on this machine; never written

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def train(self) -> pd.DataFrame:
        return self.images[self.images["split"] == "train"]

    def train_embeddings(self) -> np.ndarray:
        return np.stack(self.train()["embedding"].to_numpy()).astype(np.float32)

    def training_size_text(self) -> str:
        """The training images' native size in words: ``48x48`` or ``450-600 x 300-450``."""
        s = self.meta["sizes"]
        w = f"{s['width'][0]}" if s["width"][0] == s["width"][1] else f"{s['width'][0]}-{s['width'][1]}"
        h = f"{s['height'][0]}" if s["height"][0] == s["height"][1] else f"{s['height'][0]}-{s['height'][1]}"
        return f"{w}x{h}" if "-" not in w + h else f"{w} x {h}"


# --------------------------------------------------------------------------
# fitting, caching
# --------------------------------------------------------------------------


def fit_reference(run_dir: str | Path, data_dir: str | None = None) -> Reference:
    """Compute the reference from the study's train and validation images and write it to
    ``RUN_DIR/ood_reference.parquet`` (atomically); test files are hashed (SHA-256 of their bytes) only."""
    from analysis.files import write_file
    from analysis.splits import located, read_splits
    from search.storage import parquet_bytes
    from trainables.near_duplicates import image_embeddings, image_hashes

    started = time.monotonic()
    run_dir = Path(run_dir).expanduser().resolve()
    backbone, size, weights_dir = _embedding_settings(run_dir)
    table = read_splits(run_dir / SPLITS)
    table = table[table["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    counts = table["split"].value_counts()
    if not counts.get("train") or not counts.get("val"):
        raise OODError(f"{SPLITS} of {str(run_dir)!r} holds {dict(counts)} images; the reference needs train images "
                       "and validation images to calibrate on")
    try:
        rows = located(run_dir, table, data_dir)
    except EvaluateError as exc:
        raise OODError(f"cannot fit the out-of-distribution reference: {exc}") from None
    paths = rows["path"].astype(str).tolist()
    used = rows["split"].isin(["train", "val"]).to_numpy()  # decoded; test files are only hashed, as bytes
    is_train = (rows["split"] == "train").to_numpy()
    used_paths = [p for p, u in zip(paths, used) if u]
    hashes = image_hashes(used_paths)[:, 0]  # the image as it is; a query brings its flips
    features = image_embeddings(used_paths, backbone, size=size, weights_dir=weights_dir)
    train_features, val_features = features[is_train[used]], features[~is_train[used]]
    val_distance = _feature_distance(val_features, train_features)

    sizes = [_native_size(p) if u else (None, None) for p, u in zip(paths, used)]
    phash, embedding = [None] * len(rows), [None] * len(rows)
    for i, h in zip(np.flatnonzero(used), hashes):
        phash[i] = np.packbits(h).tobytes().hex()  # text, so any reader of the folder can show it
    for i, f in zip(np.flatnonzero(is_train), train_features):
        embedding[i] = f.astype(np.float16)  # what image_embeddings' own cache keeps
    out = pd.DataFrame({"image": rows["image"].astype(str), "split": rows["split"].astype(str),
                        "width": pd.array([w for w, _ in sizes], dtype="Int64"),
                        "height": pd.array([h for _, h in sizes], dtype="Int64"),
                        "sha256": [_sha256(p) for p in paths], "phash": phash, "embedding": embedding})
    train = out[out["split"] == "train"]
    aspect = (train["width"] / train["height"]).astype(float)
    low, high = SIZE_PERCENTILES
    meta = {
        "fitted_for": _fitted_for(run_dir, backbone, size),
        "threshold": float(np.percentile(val_distance, PERCENTILE)),
        "percentile": PERCENTILE, "k": K_NEAREST, "embedding": backbone, "embedding_size": size,
        "validation_distance": {"median": float(np.median(val_distance)), "max": float(val_distance.max())},
        "sizes": {"width": [int(train["width"].min()), int(train["width"].max())],
                  "height": [int(train["height"].min()), int(train["height"].max())],
                  "width_percentiles": [float(np.percentile(train["width"].astype(float), q)) for q in (low, high)],
                  "height_percentiles": [float(np.percentile(train["height"].astype(float), q)) for q in (low, high)],
                  "aspect_percentiles": [float(np.percentile(aspect, q)) for q in (low, high)]},
        "images": {k: int(v) for k, v in out["split"].value_counts().items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    out.attrs[META_KEY] = meta
    write_file(run_dir / OOD_REFERENCE, parquet_bytes(out))
    return Reference(out, meta, weights_dir)


def load_reference(run_dir: str | Path) -> Reference | None:
    """The reference in ``RUN_DIR/ood_reference.parquet`` if it was fitted for the study as it is now (same
    splits, backbone, input size and VERSION); None when it is missing, stale or unreadable (then fit it again)."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / OOD_REFERENCE
    if not path.is_file():
        return None
    try:
        images = pd.read_parquet(path)
        meta = images.attrs.get(META_KEY) or {}
        backbone, size, weights_dir = _embedding_settings(run_dir)
        if meta.get("fitted_for") != _fitted_for(run_dir, backbone, size):
            return None
    except (OSError, ValueError, KeyError, TypeError):  # a damaged or foreign file: fit it again
        return None
    return Reference(images, meta, weights_dir)


def reference_for(run_dir: str | Path, data_dir: str | None = None, log=print) -> Reference:
    """The study's reference: read back when current, else fitted now and cached (``log`` says so and how long).
    Raises ``OODError`` when it cannot be fitted (no splits, the dataset not on this machine)."""
    run_dir = Path(run_dir).expanduser().resolve()
    found = load_reference(run_dir)
    if found is not None:
        return found
    stale = (run_dir / OOD_REFERENCE).is_file()
    started = time.monotonic()
    from trainables.datasets import DatasetError
    from trainables.weights import WeightsUnavailableError

    try:
        fitted = fit_reference(run_dir, data_dir)
    except OODError:
        raise
    # A damaged splits.parquet, an unreadable training image, the backbone's weights not on this machine, a full disk
    except (ResultsFolderError, EvaluateError, AnalysisError, DatasetError, WeightsUnavailableError) as exc:
        raise OODError(str(exc)) from None
    counts = fitted.meta["images"]
    log(f"{'refitted' if stale else 'fitted'} the out-of-distribution reference on {counts.get('train', 0)} train "
        f"and {counts.get('val', 0)} validation images in {time.monotonic() - started:.1f} s"
        + (" (the old one was fitted for other splits or settings)" if stale else "")
        + f"; cached in {OOD_REFERENCE}")
    return fitted


def _embedding_settings(run_dir: Path) -> tuple[str, int, str | None]:
    """``(backbone, size, weights_dir)``: the study's leakage-audit embedding (its defaults when the audit had the
    embedding off), and where the study found its weights."""
    from analysis.reader import read_record
    from trainables.near_duplicates import Settings, settings_from

    record = read_record(run_dir)
    study = record.get("study") or {}
    try:
        audit = settings_from((study.get("dataset") or {}).get("near_duplicates", True))
    except (TypeError, ValueError):  # a folder from another version: the defaults
        audit = Settings()
    default = Settings()
    backbone = audit.embedding or default.embedding
    size = audit.embedding_size if audit.embedding else default.embedding_size
    return backbone, size, study.get("weights_dir") or (record.get("flags") or {}).get("weights_dir")


def _fitted_for(run_dir: Path, backbone: str, size: int) -> dict:
    return {"splits_sha256": _sha256(run_dir / SPLITS), "embedding": backbone, "embedding_size": int(size),
            "version": VERSION}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _native_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as displayed, from its header: a 128 x 64 JPEG with EXIF orientation 6
    is 64 x 128, as the decoder reads it (DICOM: its pixel grid)."""
    from trainables.data import displayed_size

    return displayed_size(path)


def _feature_distance(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each query's mean cosine distance to its ``K_NEAREST`` nearest training images (unit vectors)."""
    k = min(K_NEAREST, len(train))
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), _BLOCK):
        distance = 1.0 - np.clip(queries[start:start + _BLOCK] @ train.T, -1.0, 1.0)
        out[start:start + _BLOCK] = np.partition(distance, k - 1, axis=1)[:, :k].mean(axis=1)
    return out


# --------------------------------------------------------------------------
# checking images
# --------------------------------------------------------------------------


def check(reference: Reference, paths) -> pd.DataFrame:
    """One row per image file (``CHECK_COLUMNS``): ``ood`` (it looks unlike the training images), its
    ``feature_distance``, ``study_image`` (``"<split>/<image>"`` when it is an image of the study, by content,
    wherever it lies; else "") and ``warning``: every reason in words, "" when there is none.

    Unreadable files raise ``DatasetError`` (``trainables.near_duplicates``); pass the readable ones.
    """
    from trainables.near_duplicates import HASH_BITS, image_embeddings, image_hashes

    paths = [str(p) for p in paths]
    if not paths:
        return pd.DataFrame({c: [] for c in CHECK_COLUMNS})
    meta = reference.meta
    distance = _feature_distance(image_embeddings(paths, meta["embedding"], size=meta["embedding_size"],
                                                  weights_dir=reference.weights_dir),
                                 reference.train_embeddings())
    copies = _copies(reference, paths, image_hashes(paths), HASH_BITS)
    rows = []
    for path, d, copy in zip(paths, distance, copies):
        reasons = _size_reasons(reference, _native_size(path))
        if d > reference.threshold:
            reasons.append(f"feature distance {d:.2f} > {reference.threshold:.2f} ({meta['percentile']:g}th "
                           "percentile of validation)")
        ood = bool(reasons)
        if copy:
            reasons.append(copy[1])
        rows.append({"ood": ood, "feature_distance": float(d), "study_image": copy[0] if copy else "",
                     "warning": "; ".join(reasons)})
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def _size_reasons(reference: Reference, size: tuple[int, int]) -> list[str]:
    s, (width, height) = reference.meta["sizes"], size
    reasons = []
    (w_low, w_high), (h_low, h_high) = s["width_percentiles"], s["height_percentiles"]
    if not (w_low / SIZE_SLACK <= width <= w_high * SIZE_SLACK and h_low / SIZE_SLACK <= height <= h_high * SIZE_SLACK):
        reasons.append(f"size {width}x{height} px, training images {reference.training_size_text()}")
    a_low, a_high = s["aspect_percentiles"]
    aspect = width / height
    if not a_low / ASPECT_SLACK <= aspect <= a_high * ASPECT_SLACK:
        shown = f"{a_low:.2f}" if round(a_low, 2) == round(a_high, 2) else f"{a_low:.2f}-{a_high:.2f}"
        reasons.append(f"aspect ratio {aspect:.2f}, training images {shown}")
    return reasons


def _copies(reference: Reference, paths: list[str], hashes: np.ndarray, bits: int) -> list[tuple[str, str] | None]:
    """Per path, ``("<split>/<image>", reason)`` for the study image it is a copy of, else None: the same bytes
    (any split), else a perceptual hash within ``COPY_HASH_DISTANCE`` bits of a train or validation image's,
    the image or any flip of it."""
    images = reference.images
    by_sha = {}
    for row in images.itertuples():  # the first of identical files, train before val before test
        by_sha.setdefault(row.sha256, row)
    hashed = images[images["phash"].notna()]
    known = np.unpackbits(np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in hashed["phash"]]),
                          axis=1)[:, :bits]
    known = np.where(known, 1.0, -1.0).astype(np.float32)
    queries = np.where(hashes, 1.0, -1.0).astype(np.float32)  # (N, views: flips, rotations, middle, bits)
    # Hamming distance = (bits - dot) / 2, the smallest over the query's flips (as the audit's hash_pairs).
    nearest, dot = np.empty(len(queries), np.int64), np.empty(len(queries), np.float32)
    for start in range(0, len(queries), _BLOCK):
        block = np.max([queries[start:start + _BLOCK, v] @ known.T for v in range(queries.shape[1])], axis=0)
        nearest[start:start + _BLOCK] = block.argmax(axis=1)
        dot[start:start + _BLOCK] = block.max(axis=1)
    out = []
    for i, path in enumerate(paths):
        same = by_sha.get(_sha256(path))
        if same is not None:
            out.append((f"{same.split}/{same.image}", f"same file as {same.image} (an image of the study's "
                        f"{_split_words(same.split)}{_no_fair_test(same.split)})"))
            continue
        differ = int(round((bits - dot[i]) / 2))
        if differ <= COPY_HASH_DISTANCE:
            row = hashed.iloc[nearest[i]]
            out.append((f"{row['split']}/{row['image']}", f"same image as {row['image']} (pHash {differ} of {bits} "
                        f"bits differ, an image of the study's {_split_words(row['split'])}"
                        f"{_no_fair_test(row['split'])})"))
        else:
            out.append(None)
    return out


def _split_words(split: str) -> str:
    return {"val": "validation split", "train": "train split", "test": "test split"}.get(split, f"{split} split")


def _no_fair_test(split: str) -> str:
    return (": its prediction is no fair test" if split in ("train", "val")
            else ": score it with python -m analysis.evaluate, which logs every look at the test split")


# --------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------


def check_study(run_dir: str | Path, paths, data_dir: str | None = None, log=print) -> pd.DataFrame:
    """``check`` of ``paths`` against the study's reference (``reference_for``: fitted now if need be). Raises
    ``OODError`` when there is none (no splits, the dataset not on this machine, no backbone weights)."""
    from trainables.datasets import DatasetError
    from trainables.weights import WeightsUnavailableError

    reference = reference_for(run_dir, data_dir, log)
    try:
        return check(reference, paths)
    except (DatasetError, WeightsUnavailableError) as exc:  # a file turned unreadable; the weights are not here
        raise OODError(str(exc)) from None


def summary_lines(checks: pd.DataFrame, files: list[str], noted: int = 0) -> list[str]:
    """The summary's lines about ``checks`` (rows of ``check`` for ``files``, names as shown): how many images look
    unlike the training images, with the first few and why, and how many are copies of the study's images
    (unless no more than ``noted``, the study's own files found by their paths, which the caller noted already)."""
    lines = []
    flagged = checks.index[checks["ood"].astype(bool)]
    if len(flagged):
        shown = "; ".join(f"{files[i]} ({_ood_reasons(checks.loc[i, 'warning'])})" for i in flagged[:_SHOW_AT_MOST])
        more = f"; and {len(flagged) - _SHOW_AT_MOST} more" if len(flagged) > _SHOW_AT_MOST else ""
        lines.append(f"warning: {len(flagged)} of {len(checks)} images look unlike the training images: {shown}{more}; "
                     "their predictions are not reliable (the 'ood' and 'warning' columns)")
    else:
        lines.append(f"  ood     none of the {len(checks)} image(s) looks unlike the training images (native size, "
                     "and features as close as the validation images')")
    copies = checks.loc[checks["study_image"].astype(str) != "", "study_image"].astype(str)
    if len(copies) > noted:
        per_split = copies.str.split("/").str[0].value_counts()
        parts = ", ".join(f"{n} {split}" for split, n in sorted(per_split.items()))
        why = []
        if {"train", "val"} & set(per_split.index):
            why.append("predictions on train/val images are no fair test")
        if "test" in per_split.index:
            why.append("test images are python -m analysis.evaluate's to score, which logs every look at them")
        lines.append(f"  note: {len(copies)} of these images are copies of the study's images by content ({parts}); "
                     f"{'; '.join(why)} (the 'study_image' column names each)")
    return lines


def _ood_reasons(warning: str) -> str:
    """The out-of-distribution reasons of a warning, without the note that it is a study image."""
    return "; ".join(r for r in str(warning).split("; ") if not r.startswith(("same file as", "same image as")))
