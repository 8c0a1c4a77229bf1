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

Within a worker process, a trial whose whole backbone stays frozen also skips
building it: ``shared_backbone`` keeps the last few pretrained backbones built
(keyed by name, weights, input size, weights folder and dtype policy) with their
``model_identity``, so such a trial pays neither the build nor the weight hashing
again, and checkpoints serialise its frozen part only once
(``trainables.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import keras
import numpy as np
from filelock import FileLock

from trainables.data import data_digest

CACHE_VERSION = 1  # bump when what an entry holds changes
# Features for a head alone are stored as float16 (half the disk; the head's predictions move by ~1e-3).
# Features that feed layers being fine-tuned stay float32: small rounding there grows over epochs.
HEAD_ONLY_DTYPE, FINE_TUNE_DTYPE = np.float16, np.float32
_DEFAULT_LIMIT_GB = 20.0
SHARED_BACKBONES = 2  # kept per process, each with its weights in memory
POOLED_KEPT = 8  # pooled entries kept per process (HAM10000's 8,012 training images: 41 MB each)


def cache_dir() -> Path:
    from trainables.data import cache_root

    return cache_root() / "activations"


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


def model_identity(model) -> str:
    """A hash of what fixes ``model``'s output for a given input: its name (the backbone and the cut), input
    shape, every weight (preprocessing included) and dtype policy (mixed_float16 computes other values)."""
    parts = [f"v{CACHE_VERSION}", model.name, str(model.input.shape), weights_digest(model), model.dtype_policy.name]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def entry_key(model, x: np.ndarray, dtype=HEAD_ONLY_DTYPE, *, identity: str | None = None,
              digest: str | None = None) -> str:
    """The cache entry for ``model`` (a backbone, or a backbone's prefix) applied to ``x``: the model's
    ``identity`` (computed if not given), the images themselves (``digest``: their ``data_digest``, if the
    driver already computed it) and the stored dtype."""
    identity = identity or model_identity(model)
    digest = digest or data_digest(x)
    return hashlib.sha256(f"{identity}|{digest}|{np.dtype(dtype).name}".encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A trial's frozen part with its ``model_identity``; equal (and hashed) by identity alone, so a memo keyed
    by it serves every trial whose frozen part computes the same thing."""

    identity: str
    model: keras.Model = dataclasses.field(compare=False, repr=False)


def frozen_part(model) -> Frozen:
    return Frozen(model_identity(model), model)


def shared_backbone(name: str, *, weights, input_shape, weights_dir=None) -> Frozen:
    """Pretrained backbone ``name`` for a trial that never trains it, built once per process.

    A reused Ray worker runs trial after trial; for a frozen backbone, building
    it, loading its weights and hashing them cost more than the epochs on cached
    features. The last ``SHARED_BACKBONES`` are kept, keyed by name, weights (a
    weights file also by its size and modification time), input shape, weights
    folder and the dtype policy in force, so any of these changing builds anew.
    Only trials whose whole backbone stays frozen may use it: it is shared by
    them all, so nothing must train it.
    """
    stamp = None
    if weights not in (None, "imagenet"):
        stat = os.stat(weights)
        stamp = (stat.st_size, stat.st_mtime_ns)  # a replaced file is loaded again
    return _build_shared(name, weights, tuple(input_shape), None if weights_dir is None else str(weights_dir),
                         keras.mixed_precision.global_policy().name, stamp)


@functools.lru_cache(maxsize=SHARED_BACKBONES)
def _build_shared(name, weights, input_shape, weights_dir, policy, stamp) -> Frozen:
    """``shared_backbone``'s memo; ``policy`` and ``stamp`` only key it (the layers take the global policy)."""
    from trainables.backbones import create_backbone

    return frozen_part(create_backbone(name, input_shape=input_shape, weights=weights, weights_dir=weights_dir))


def cached_features(backbone, x: np.ndarray, *, dtype=HEAD_ONLY_DTYPE, batch_size: int = 64,
                    identity: str | None = None, pool: bool = False, digest: str | None = None) -> np.ndarray:
    """``backbone(x)`` in inference mode, from the cache or computed once and stored; memory-mapped.

    ``backbone`` may be a prefix from ``split_backbone``; ``identity``, its
    ``model_identity`` if already known; ``digest``, ``x``'s ``data_digest``. ``pool``: the feature maps averaged over
    height and width instead (``pooled``), kept in memory for this process's next trials.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry_key(backbone, x, dtype, identity=identity, digest=digest)}.npy"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            features = backbone.predict(x, batch_size=batch_size, verbose=0).astype(dtype)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, features)
            os.replace(tmp, path)  # atomic: a reader never sees half an entry
            evict(keep=path)
        else:
            os.utime(path)  # last use, for eviction
    if pool:
        return _pooled_entry(str(path))
    return np.load(path, mmap_mode="r")


def pooled(features: np.ndarray) -> np.ndarray:
    """Feature maps averaged over height and width, accumulated in float32 (what average pooling computes).

    A head that averages first only ever sees these vectors: training it on them is the same computation on
    1/(height x width) of the data, which Keras would otherwise copy into its input pipeline on every fit."""
    return features.mean(axis=(1, 2), dtype=np.float32) if features.ndim == 4 else np.asarray(features, np.float32)


@functools.lru_cache(maxsize=POOLED_KEPT)
def _pooled_entry(path: str) -> np.ndarray:
    # An entry's name is a hash of everything that determines it, so its pooled features never go stale.
    return pooled(np.load(path, mmap_mode="r"))


def cached_views(prefix, x: np.ndarray, augmentation, *, views: int, policy: str, seed: int,
                 dtype=HEAD_ONLY_DTYPE, batch_size: int = 64, identity: str | None = None,
                 digest: str | None = None) -> np.ndarray:
    """``views`` augmented copies of ``x`` through the frozen ``prefix``: an array (views, N, ...).

    Epoch e trains on view ``e % views``. A trial then sees ``views`` fixed
    random variants of each image instead of a fresh one every epoch: less
    variety for the same disk, in exchange for never running the frozen part
    again. The bank depends on the policy and the seed, so trials share it.
    ``identity`` and ``digest`` as for ``cached_features``.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = entry_key(prefix, x, dtype, identity=identity, digest=digest)
    key = hashlib.sha256(f"{key}|{policy}|{views}|{seed}".encode()).hexdigest()[:32]
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
