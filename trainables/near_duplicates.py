"""Near-duplicate images: the same picture re-encoded, resized, cropped, flipped or re-lit.

``integrity.find_duplicates`` sees byte-identical files only. A near-duplicate
in train with its twin in validation or test makes the score measure memory,
not diagnosis, so every study audits its images with ``find_near_duplicates``
before Ray starts, and ``split="grouped"`` can keep each cluster in one split.

Two signals, each with a threshold (``Settings``, set by
``search.Dataset(near_duplicates=...)``); a pair is near when either says so:

- **Perceptual hash**: ``imagehash.phash`` with 16 x 16 = 256 bits of each
  image's eight flips and right-angle rotations, so a mirrored or rotated copy
  matches too, and of its middle 90 %, so a copy cropped by ~5 % a side does.
  Near when at most ``hash_distance`` bits differ (default 26, 10 %; looser,
  dark-vignetted dermoscopy images pair with each other). It catches
  re-encoding, resizing and brightness shifts; a crop off the middle still
  shifts every low-frequency coefficient.
  (``benchmarks/audit_recall.py``, 140 melanoma10k images + 66 copies of 11
  kinds: all 66 found and no false pair, where one view and no middle found 38.)
- **Embedding similarity** (``embedding``, default ``efficientnet_lite0``,
  whose ImageNet weights ship with pip; ``None`` turns it off): the cosine
  similarity of the backbone's globally average-pooled features at
  ``embedding_size`` px, averaged over the image's eight flips and rotations
  (so the same for each of them), near at ``>= embedding_similarity`` (default
  0.945). Pooled features survive crops. It costs eight forward passes over
  every image (one took 61-66 s for HAM10000's 10,015 images at 128 px on 2 CPU
  cores; eight, about 3.4 times one's wall time on 206 images), once: the features are kept on disk, keyed by the
  weights and the files, so a re-run, a resume or another study of the same
  images reads them back.

The defaults come from ``benchmarks/near_duplicates.py`` on HAM10000: of 2,000
planted copies (re-encoded, resized, cropped, flipped, re-lit) the hash alone
finds 82 % and pairs 0.02 % of the images with another lesion's; with the
embedding, 96 % and 0.5 %. Hashing 10,015 images takes 9 s; pairs are found by
blocked matrix products (exact and vectorised, 5-9 s for those 10,015, growing
with the square of the count), where scikit-learn's hamming BallTree took 300 s.
Clusters are the connected components of the pair graph (union-find), so
A~B and B~C put A, B and C together even when A and C are far apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image

from trainables.backbones import create_backbone, get_backbone_spec, list_backbones
from trainables.checks import is_int, is_number, unknown_name_message
from trainables.data import cache_key, cache_root, decode_images, eight_bit, open_image
from trainables.datasets import DatasetError

HASH_SIDE = 16  # imagehash's hash_size: a 16 x 16 DCT block, 256 bits
HASH_BITS = HASH_SIDE * HASH_SIDE
_HASH_VERSION = 2  # names the on-disk hashes: bump when ``image_hash`` computes anything else
# The eight flips and right-angle rotations of an image (the dihedral group; None: as it is), hashed each and, in the
# embedding, averaged over: a flipped or rotated copy matches its original's view exactly. Kaggle-style sets hold
# augmented copies rotated by 90 degrees as often as mirrored ones, and a pHash sees neither.
_VIEWS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180,
          Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)
# One more hashed view: the middle of the image, this share of each side. A copy cropped by ~5 % a side shifts every
# low-frequency coefficient of the whole image's hash (pHash <= 26 found none of six), but hashes as its original's
# middle does.
CROP_KEEP = 0.9
CROP_VIEW = len(_VIEWS)  # its row in ``image_hash``
# On by default: its ImageNet weights ship with pip, so it needs no download; it is what finds crops.
DEFAULT_EMBEDDING = "efficientnet_lite0"
_BLOCK = 1024  # rows per block of the pairwise products: ~40 MB per block on 10,000 images

# The column of an image table that holds each image's near-duplicate cluster (read by the grouped split).
CLUSTER_COLUMN = "near_duplicate_cluster"

# near_duplicates.parquet's metadata key for the Settings that ran (the defaults change between versions).
SETTINGS_KEY = "near_duplicates_settings"

PAIR_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "same_label", "label_conflict",
                "hash_distance", "embedding_similarity", "found_by", "cluster"]
SPLIT_COLUMNS = ["split_a", "split_b", "cross_split"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What counts as a near-duplicate. ``Dataset(near_duplicates=...)`` takes ``True`` (these
    defaults), ``False`` (no audit) or a dict of the fields to change."""

    hash_distance: int = 26  # at most this many of the 256 pHash bits differ (10 %); unrelated images: ~128
    embedding: str | None = DEFAULT_EMBEDDING  # a backbone with ImageNet weights; None: the hash alone
    embedding_similarity: float = 0.945  # cosine similarity of pooled features at least this
    embedding_size: int = 128  # px the embedding sees; the threshold was measured at 128
    stop_on_label_conflict: bool = False  # refuse to start when a near-duplicate pair has two labels
    enabled: bool = True


def settings_from(value) -> Settings:
    """``Settings`` from ``Dataset.near_duplicates``; a bad value is a ``ValueError`` naming the key,
    the value and the valid range (``search.study`` turns it into a ``StudyError`` before Ray starts)."""
    if value is True:
        return Settings()
    if value is False:
        return Settings(enabled=False)
    if not isinstance(value, dict):
        raise ValueError(f"bad value {value!r}; use True (audit with default thresholds), False (no audit) "
                         "or a dict of thresholds, e.g. {'hash_distance': 30}")
    fields = [f.name for f in dataclasses.fields(Settings)]
    for key in value:
        if key not in fields:
            raise ValueError(unknown_name_message("option", key, fields))
    settings = Settings(**value)
    _check_settings(settings)
    return settings


def recorded_settings(pairs: pd.DataFrame, study_value=True) -> Settings | None:
    """The settings an audit ran with: from ``near_duplicates.parquet``'s metadata, else (a folder written before it
    was recorded) from the study's ``Dataset.near_duplicates`` under today's defaults; None if neither reads."""
    try:
        recorded = pairs.attrs.get(SETTINGS_KEY)
        return Settings(**recorded) if recorded else settings_from(study_value)
    except (TypeError, ValueError):  # a folder from another version: say what was found, not how
        return None


def _check_settings(s: Settings) -> None:
    def bad(key, fix):
        raise ValueError(f"{key}: bad value {getattr(s, key)!r}; {fix}")

    if not is_int(s.hash_distance, low=0) or s.hash_distance >= HASH_BITS // 2:
        bad("hash_distance", f"use a whole number of bits from 0 to {HASH_BITS // 2 - 1} of {HASH_BITS} "
                             "(two unrelated images differ in about half)")
    if not is_number(s.embedding_similarity) or not 0 < s.embedding_similarity <= 1:
        bad("embedding_similarity", "use a cosine similarity in (0, 1], e.g. 0.945")
    if not is_int(s.embedding_size, low=32) or s.embedding_size > 1024:
        bad("embedding_size", "use a size in px from 32 to 1024")
    for key in ("stop_on_label_conflict", "enabled"):
        if not isinstance(getattr(s, key), bool):
            bad(key, "use True or False")
    if s.embedding is not None:
        if s.embedding not in list_backbones():
            raise ValueError("embedding: " + unknown_name_message("backbone", s.embedding, list_backbones()))
        spec = get_backbone_spec(s.embedding)
        if not spec.imagenet:
            pretrained = [b for b in list_backbones() if get_backbone_spec(b).imagenet]
            bad("embedding", f"backbone {s.embedding!r} has no pretrained weights; use one of {pretrained}")
        if s.embedding_size < spec.min_size:
            bad("embedding_size", f"backbone {s.embedding!r} needs at least {spec.min_size} px")


# --- Perceptual hashes ----------------------------------------------------------------------------------------------


def image_hash(path: str | Path) -> np.ndarray:
    """(9, 256) bool: the pHash of the image's eight flips and right-angle rotations (``_VIEWS``, the image as it is
    first), then of its middle (``CROP_VIEW``)."""
    import imagehash

    side = 4 * HASH_SIDE  # the 64 x 64 grey image imagehash.phash takes its DCT of
    # The training decoder's pixels: a DICOM file rescaled and windowed, not PIL's; a photograph upright by its EXIF
    # orientation. A JPEG is decoded grey at reduced scale (DCT scaling): a fraction of a full decode.
    with open_image(path, draft=("L", (side, side))) as image:
        grey = eight_bit(image, str(path)).convert("L").resize((side, side), Image.Resampling.LANCZOS)
        margin = round(side * (1 - CROP_KEEP) / 2)
        middle = grey.resize((side, side), Image.Resampling.LANCZOS, box=(margin, margin, side - margin, side - margin))
    views = [grey if view is None else grey.transpose(view) for view in _VIEWS] + [middle]
    return np.stack([imagehash.phash(view, hash_size=HASH_SIDE).hash.ravel() for view in views])


def image_hashes(paths: Iterable[str | Path], *, workers: int | None = None) -> np.ndarray:
    """(N, 9, 256) bool hashes of ``paths`` (``image_hash``), remembered on disk for an unchanged set of files."""
    paths = [str(p) for p in paths]
    record = _cache_dir() / f"phash{HASH_SIDE}-v{_HASH_VERSION}-{cache_key(paths, 0)}.npy"
    if record.exists():
        return np.unpackbits(np.load(record), axis=-1, count=HASH_BITS).astype(bool)
    # PIL releases the GIL while decoding; keep the pool small on shared machines.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        hashes = np.stack(list(pool.map(_hash_or_say_which, paths))) if paths else np.zeros((0, CROP_VIEW + 1, HASH_BITS), bool)
    _save_atomic(record, np.packbits(hashes, axis=-1))
    return hashes


def _hash_or_say_which(path: str) -> np.ndarray:
    try:
        return image_hash(path)
    except Exception as exc:  # PIL raises many types for bad files
        raise DatasetError(f"near-duplicate audit: cannot read image {path!r} ({type(exc).__name__}: {exc}); "
                           "replace or delete it, or pass --skip-corrupt") from exc


def hash_pairs(hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Pairs ``a < b`` whose hashes differ in at most ``max_distance`` bits, any view of ``a`` against ``b``
    as it is, or ``a`` as it is against ``b``'s middle: columns ``a``, ``b``, ``hash_distance`` (the smallest).

    One direction is enough for the flips and rotations: turning ``a`` to match ``b`` is turning ``b``
    back to match ``a``. Not for the middle: the copy cropped may be ``a`` or ``b``.
    """
    signs = np.where(hashes, 1.0, -1.0).astype(np.float32)  # Hamming distance = (bits - dot) / 2
    found = []
    for start in range(0, len(signs), _BLOCK):
        block, later = signs[start:start + _BLOCK], signs[start:]  # each block against itself and what follows
        dot = np.max([block[:, v] @ later[:, 0].T for v in range(block.shape[1])], axis=0)
        np.maximum(dot, block[:, 0] @ later[:, CROP_VIEW].T, out=dot)
        rows, cols = np.nonzero(HASH_BITS - dot <= 2 * max_distance)
        keep = cols > rows  # above the diagonal: each pair once, no image with itself
        rows, cols = rows[keep], cols[keep]
        distance = np.rint((HASH_BITS - dot[rows, cols]) / 2).astype(np.int64)
        found.append(pd.DataFrame({"a": rows + start, "b": cols + start, "hash_distance": distance}))
    return _sorted_pairs(found, "hash_distance", ascending=True)  # fewest differing bits first


# --- Embeddings -----------------------------------------------------------------------------------------------------


def image_embeddings(paths: Iterable[str | Path], backbone: str, *, size: int = 128, weights_dir=None,
                     batch: int = 256, dihedral: bool = False) -> np.ndarray:
    """(N, D) float32 unit vectors: ``backbone``'s ImageNet features, average-pooled, at ``size`` px.

    ``dihedral``: the mean of the features of the image's eight flips and right-angle rotations (``_VIEWS``),
    the same for every one of them, so a rotated copy embeds as its original (the audit's); eight forward
    passes per image instead of one. One forward pass per image and view, in batches (memory stays at
    ``batch`` images); remembered on disk, keyed by the weights (``activation_cache.model_identity``) and the files.
    """
    keep_gpus_for_trials()
    import keras

    from trainables.activation_cache import model_identity  # imports keras

    paths = [str(p) for p in paths]
    model = create_backbone(backbone, input_shape=(size, size, 3), weights="imagenet", weights_dir=weights_dir)
    key = hashlib.sha256(f"{model_identity(model)}|{cache_key(paths, size)}".encode()).hexdigest()[:24]
    record = _cache_dir() / f"embed-{backbone}-{size}-{key}.npy"  # the image as it is
    views_record = _cache_dir() / f"embed-{backbone}-{size}-d{len(_VIEWS)}-{key}.npy"
    if (views_record if dihedral else record).exists():
        return np.load(views_record if dihedral else record).astype(np.float32)
    pooled = keras.Model(model.input, keras.layers.GlobalAveragePooling2D()(model.output))
    parts, mean_parts = [], []
    for i in range(0, len(paths), batch):
        images = decode_images(paths[i:i + batch], size, use_cache=False)
        views = [_unit(pooled.predict(np.ascontiguousarray(_view(images, v)), verbose=0))
                 for v in (_VIEWS if dihedral else _VIEWS[:1])]
        parts.append(views[0])
        mean_parts.append(_unit(np.mean(views, axis=0)))
    width = pooled.output.shape[-1]
    features = np.concatenate(parts) if parts else np.zeros((0, width), np.float32)
    _save_atomic(record, features.astype(np.float16))  # the image as it is comes free with the views (ood.py reads it)
    if dihedral:
        features = np.concatenate(mean_parts) if mean_parts else np.zeros((0, width), np.float32)
        _save_atomic(views_record, features.astype(np.float16))
    return features.astype(np.float16).astype(np.float32)  # what a re-run reads back


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def _view(images: np.ndarray, view) -> np.ndarray:
    """(n, h, w, c) images seen through one of ``_VIEWS`` (as PIL's ``Image.transpose`` would turn each)."""
    T = Image.Transpose
    turned = {None: lambda a: a, T.FLIP_LEFT_RIGHT: lambda a: a[:, :, ::-1], T.FLIP_TOP_BOTTOM: lambda a: a[:, ::-1],
              T.ROTATE_180: lambda a: a[:, ::-1, ::-1], T.ROTATE_90: lambda a: np.rot90(a, 1, axes=(1, 2)),
              T.ROTATE_270: lambda a: np.rot90(a, -1, axes=(1, 2)), T.TRANSPOSE: lambda a: a.transpose(0, 2, 1, 3),
              T.TRANSVERSE: lambda a: np.rot90(a, 2, axes=(1, 2)).transpose(0, 2, 1, 3)}
    return turned[view](images)


def keep_gpus_for_trials() -> None:
    """Run this process's TensorFlow on the CPU. The audit runs in the study's driver, beside trials that may share
    the machine's GPUs, and TensorFlow would otherwise reserve nearly all of each card's memory for the driver's
    whole life. On the CPU the forward pass takes about a minute per 10,000 images (2 cores, 128 px), once."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow is already initialised in this process (e.g. a benchmark): leave it be
        pass


def embedding_pairs(embeddings: np.ndarray, min_similarity: float) -> pd.DataFrame:
    """Pairs ``a < b`` of unit vectors with cosine similarity ``>= min_similarity``."""
    found = []
    for start in range(0, len(embeddings), _BLOCK):
        sim = embeddings[start:start + _BLOCK] @ embeddings[start:].T
        rows, cols = np.nonzero(sim >= min_similarity)
        keep = cols > rows
        rows, cols = rows[keep], cols[keep]
        found.append(pd.DataFrame({"a": rows + start, "b": cols + start, "embedding_similarity": sim[rows, cols]}))
    return _sorted_pairs(found, "embedding_similarity", ascending=False)  # most similar first


def _sorted_pairs(found: list[pd.DataFrame], value: str, *, ascending: bool) -> pd.DataFrame:
    pairs = pd.concat(found, ignore_index=True) if found else pd.DataFrame({"a": [], "b": [], value: []})
    pairs = pairs.astype({"a": np.int64, "b": np.int64})
    return pairs.sort_values([value, "a", "b"], ascending=[ascending, True, True], ignore_index=True)


# --- The audit ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NearDuplicates:
    """What ``find_near_duplicates`` found in an image table."""

    pairs: pd.DataFrame  # PAIR_COLUMNS (+ SPLIT_COLUMNS once splits are known), closest first
    clusters: pd.Series  # the table's index -> cluster id (every image has one; most are alone in theirs)
    settings: Settings
    seconds: float = 0.0

    def recorded(self) -> pd.DataFrame:
        """The pairs as ``near_duplicates.parquet`` holds them: with the settings that found them in its metadata."""
        pairs = self.pairs.copy()
        pairs.attrs[SETTINGS_KEY] = dataclasses.asdict(self.settings)
        return pairs

    def with_splits(self, table: pd.DataFrame) -> "NearDuplicates":
        """The pairs with ``split_a``, ``split_b`` and ``cross_split``, from the table's ``split`` column."""
        split_of = dict(zip(table["path"], table["split"]))
        pairs = self.pairs.copy()
        pairs["split_a"] = pairs["path_a"].map(split_of)
        pairs["split_b"] = pairs["path_b"].map(split_of)
        pairs["cross_split"] = pairs["split_a"] != pairs["split_b"]
        return dataclasses.replace(self, pairs=pairs)

    def in_study(self, table: pd.DataFrame) -> pd.DataFrame:
        """The pairs whose two images are both in a split of ``table`` (``unused`` rows left out), with splits."""
        return pairs_in_study(self.with_splits(table).pairs, table)

    def contamination(self, table: pd.DataFrame) -> dict:
        """``contamination`` of these pairs over ``table``'s splits, with the audit's time."""
        return {**contamination(self.with_splits(table).pairs, table), "seconds": round(self.seconds, 1)}

    def summary(self, table: pd.DataFrame) -> str:
        """The one line printed at the start of a study."""
        f = self.contamination(table)
        shares = "; ".join(f"{f[f'{s}_share_with_train_near_duplicate']:.1%} of {s} images "
                           f"({f[f'{s}_with_train_near_duplicate']}/{f[f'{s}_images']})"
                           for s in ("val", "test") if f[f"{s}_images"])
        how = f"pHash <= {self.settings.hash_distance} bits" + (
            f" or {self.settings.embedding} similarity >= {self.settings.embedding_similarity}"
            if self.settings.embedding else "")
        return (f"near-duplicates ({how}; {f['seconds']:.1f} s): {f['pairs']} pair(s) in {f['clusters']} "
                f"cluster(s), {f['cross_split_pairs']} across splits, {f['label_conflicts']} label conflict(s); "
                f"{shares or 'no val or test images'} have a near-duplicate in train; "
                "listed in near_duplicates.parquet")


def pairs_in_study(pairs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The pairs (with split columns) whose two images are in a split of ``table``, not ``unused``."""
    used = set(table.loc[table["split"] != "unused", "path"])
    return pairs[pairs["path_a"].isin(used) & pairs["path_b"].isin(used)].reset_index(drop=True)


def contamination(pairs: pd.DataFrame, table: pd.DataFrame) -> dict:
    """The audit's figures over the images in a split of ``table`` (``path``, ``split``), from pairs with split
    columns (``near_duplicates.parquet``): pairs, clusters, label conflicts, pairs across splits, and how many
    val and test images have a near-duplicate in train (and what share)."""
    pairs = pairs_in_study(pairs, table)
    figures = {
        "pairs": len(pairs),
        "clusters": int(pairs["cluster"].nunique()),
        "images_in_clusters": len(set(pairs["path_a"]) | set(pairs["path_b"])),
        "cross_split_pairs": int(pairs["cross_split"].sum()),
        "label_conflicts": int(pairs["label_conflict"].sum()),
    }
    for split in ("val", "test"):
        images = int((table["split"] == split).sum())
        leaked = len(_with_partner_in(pairs, split, "train"))
        figures[f"{split}_images"] = images
        figures[f"{split}_with_train_near_duplicate"] = leaked
        figures[f"{split}_share_with_train_near_duplicate"] = leaked / images if images else None
    return figures


def _with_partner_in(pairs: pd.DataFrame, split: str, other: str) -> set[str]:
    """Paths in ``split`` paired with an image in ``other``."""
    ab = pairs.loc[(pairs["split_a"] == split) & (pairs["split_b"] == other), "path_a"]
    ba = pairs.loc[(pairs["split_b"] == split) & (pairs["split_a"] == other), "path_b"]
    return set(ab) | set(ba)


def find_near_duplicates(table: pd.DataFrame, settings: Settings = Settings(), *, weights_dir=None,
                         embeddings: np.ndarray | None = None) -> NearDuplicates:
    """Near-duplicate pairs and clusters among every image of ``table`` (any split, test included).

    Images are read at low resolution for the hash (and, with ``settings.embedding``, decoded at
    ``embedding_size`` for one forward pass); nothing is kept for training. ``embeddings`` (N, D unit
    vectors in table order) replaces the backbone, e.g. features computed elsewhere.
    With a ``split`` column, pairs also get ``split_a``, ``split_b`` and ``cross_split``.
    """
    started = time.monotonic()
    rows = table.reset_index(drop=True)
    if embeddings is None and settings.embedding is not None:  # first: missing weights fail before the hashing
        embeddings = image_embeddings(rows["path"], settings.embedding, size=settings.embedding_size,
                                      weights_dir=weights_dir, dihedral=True)
    pairs = hash_pairs(image_hashes(rows["path"]), settings.hash_distance)
    if embeddings is not None:
        close = embedding_pairs(np.asarray(embeddings, dtype=np.float32), settings.embedding_similarity)
        pairs = pairs.merge(close, on=["a", "b"], how="outer")
    else:
        pairs["embedding_similarity"] = np.nan
    cluster = _components(len(rows), pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64))
    result = _describe(pairs, rows, cluster)
    clusters = pd.Series(cluster, index=table.index, name=CLUSTER_COLUMN)
    found = NearDuplicates(result, clusters, settings, time.monotonic() - started)
    return found.with_splits(rows) if "split" in rows else found


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cluster id per image: connected components of the pair graph (what union-find over the pairs gives)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _describe(pairs: pd.DataFrame, rows: pd.DataFrame, cluster: np.ndarray) -> pd.DataFrame:
    a, b = pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64)
    label_a, label_b = rows["label"].to_numpy()[a], rows["label"].to_numpy()[b]
    by_hash, by_embedding = pairs["hash_distance"].notna(), pairs["embedding_similarity"].notna()
    out = pd.DataFrame({
        "path_a": rows["path"].to_numpy()[a], "path_b": rows["path"].to_numpy()[b],
        "label_a": label_a, "label_b": label_b,
        "same_label": label_a == label_b, "label_conflict": label_a != label_b,
        "hash_distance": pairs["hash_distance"].astype("Int64").to_numpy(),
        "embedding_similarity": pairs["embedding_similarity"].astype(float).to_numpy(),
        "found_by": np.where(by_hash & by_embedding, "both", np.where(by_hash, "hash", "embedding")),
        "cluster": cluster[a],
    }, columns=PAIR_COLUMNS)
    # Closest first: by the hash when it saw the pair, then by similarity.
    order = np.lexsort((-out["embedding_similarity"].fillna(-1).to_numpy(),
                        out["hash_distance"].fillna(HASH_BITS).to_numpy(np.int64)))
    return out.iloc[order].reset_index(drop=True)


def _cache_dir() -> Path:
    return cache_root() / "near_duplicates"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)  # a reader never sees half a file
