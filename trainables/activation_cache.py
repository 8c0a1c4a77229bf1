"""Frozen-backbone activation cache: push each image through a frozen backbone once.

The frozen part of a pretrained backbone is deterministic: its BatchNorm and
stochastic-depth layers act as at inference (``model.apply_unfreeze``), and
with ``augment="none"`` every epoch feeds it the same pixels. So its output is
computed once per (weights, cut, input size, images) and stored as an ``.npy``
on the node's disk (float16 when only the head trains on it, else float32); every later trial memory-maps it and trains only
the unfrozen top and the head. The cut is the whole backbone for
``unfreeze=0``, else the layer below the top ``unfreeze`` layers when no skip
connection crosses it (``cache_depths``); other depths run the full network. Entries are named by a hash of everything that determines them,
so changed weights, images, size or preprocessing make a new entry, never a
stale hit. Building is under a file lock: concurrent trials wait for one builder.

Disk use is bounded by ``$MEDSEARCH_ACTIVATION_CACHE_GB`` (default 20): after
each build, the least recently used entries are deleted until the cache fits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import keras
import numpy as np
from filelock import FileLock

CACHE_VERSION = 1  # bump when what an entry holds changes
# Features for a head alone are stored as float16 (half the disk; the head's predictions move by ~1e-3).
# Features that feed layers being fine-tuned stay float32: small rounding there grows over epochs.
HEAD_ONLY_DTYPE, FINE_TUNE_DTYPE = np.float16, np.float32
_DEFAULT_LIMIT_GB = 20.0


def cache_dir() -> Path:
    base = os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch"
    return Path(base) / "activations"


def can_use_cache(hp: dict, augment_views: int = 0) -> bool:
    """Whether a trial has a frozen pretrained part whose output can be cached.

    Augmented images differ every epoch, so an augmented trial qualifies only
    with a bank of ``augment_views`` precomputed views (see ``cached_views``).
    """
    clean = hp["augment"] == "none" or augment_views > 0
    return hp["weights"] is not None and clean and hp["unfreeze"] != "all"


def split_backbone(backbone, unfreeze) -> tuple[keras.Model, keras.Model | None, str] | None:
    """``(frozen prefix, trainable suffix, cut layer)`` for ``unfreeze`` top layers, or None if no clean cut.

    The cut is the layer below the top ``unfreeze`` layers (counted like the
    studies' ``base.layers[-k:]``). It serves the cache only if the suffix
    needs nothing but that layer's output, i.e. no residual connection crosses
    it; ``cache_depths`` lists the depths that qualify.
    """
    depth = int(unfreeze)
    if depth == 0:
        return backbone, None, backbone.layers[-1].name
    if depth >= len(backbone.layers) - 1:
        return None
    cut = backbone.layers[-depth - 1]
    try:
        suffix = keras.Model(cut.output, backbone.output, name=f"{backbone.name}_top{depth}")
    except ValueError:  # "not connected": a skip connection crosses the cut
        return None
    return keras.Model(backbone.input, cut.output, name=f"{backbone.name}_to_{cut.name}"), suffix, cut.name


def cache_depths(backbone) -> list[int]:
    """Unfreeze depths whose frozen part the cache can serve (0 = the whole backbone frozen)."""
    return [k for k in range(len(backbone.layers) - 1) if split_backbone(backbone, k) is not None]


def weights_digest(model) -> str:
    """A hash of every weight of ``model``, so other weights can never hit this entry."""
    digest = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        digest.update(w.path.encode())
        digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return digest.hexdigest()


def data_digest(x: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(x.shape).encode())
    digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()


def entry_key(model, x: np.ndarray, dtype=HEAD_ONLY_DTYPE) -> str:
    """The cache entry for ``model`` (a backbone, or a backbone's prefix) applied to ``x``: its name (the
    backbone and the cut), weights (preprocessing included), input shape and the images themselves."""
    parts = [f"v{CACHE_VERSION}", model.name, str(model.input.shape), weights_digest(model),
             data_digest(x), np.dtype(dtype).name, model.dtype_policy.name]  # mixed_float16 computes other values
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def cached_features(backbone, x: np.ndarray, *, dtype=HEAD_ONLY_DTYPE, batch_size: int = 64) -> np.ndarray:
    """``backbone(x)`` in inference mode, from the cache or computed once and stored; memory-mapped.

    ``backbone`` may be a prefix from ``split_backbone``.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry_key(backbone, x, dtype)}.npy"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            features = backbone.predict(x, batch_size=batch_size, verbose=0).astype(dtype)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, features)
            os.replace(tmp, path)  # atomic: a reader never sees half an entry
            evict(keep=path)
        else:
            os.utime(path)  # last use, for eviction
    return np.load(path, mmap_mode="r")


def cached_views(prefix, x: np.ndarray, augmentation, *, views: int, policy: str, seed: int,
                 dtype=HEAD_ONLY_DTYPE, batch_size: int = 64) -> np.ndarray:
    """``views`` augmented copies of ``x`` through the frozen ``prefix``: an array (views, N, ...).

    Epoch e trains on view ``e % views``. A trial then sees ``views`` fixed
    random variants of each image instead of a fresh one every epoch: less
    variety for the same disk, in exchange for never running the frozen part
    again. The bank depends on the policy and the seed, so trials share it.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{entry_key(prefix, x, dtype)}|{policy}|{views}|{seed}".encode()).hexdigest()[:32]
    path = folder / f"{key}.npy"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            bank = np.lib.format.open_memmap(
                path.with_name(f".{key}.{os.getpid()}.tmp.npy"), mode="w+", dtype=dtype,
                shape=(views, len(x), *prefix.output.shape[1:]))
            for view in range(views):
                for start in range(0, len(x), batch_size):
                    images = augmentation(x[start:start + batch_size].astype("float32"), training=True)
                    bank[view, start:start + batch_size] = prefix.predict_on_batch(images)
            bank.flush()
            os.replace(bank.filename, path)
            del bank
            evict(keep=path)
        else:
            os.utime(path)
    return np.load(path, mmap_mode="r")


def limit_bytes() -> int:
    return int(float(os.environ.get("MEDSEARCH_ACTIVATION_CACHE_GB", _DEFAULT_LIMIT_GB)) * 1e9)


def evict(*, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete least recently used entries until the cache fits; returns what was deleted.

    A trial that has an entry memory-mapped keeps reading it after deletion
    (POSIX keeps the file until it is unmapped), so eviction never breaks a running trial.
    """
    limit = limit_bytes() if limit is None else limit
    entries = sorted(cache_dir().glob("*.npy"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    deleted = []
    for path in entries:
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        total -= path.stat().st_size
        path.unlink(missing_ok=True)  # its empty .lock file stays: deleting a lock file can let two holders in
        deleted.append(path)
    return deleted
