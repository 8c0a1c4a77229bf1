"""Frozen-backbone activation cache: push each image through a frozen backbone once.

A pretrained backbone that stays frozen (``unfreeze=0``) is deterministic: its
BatchNorm layers are frozen and in inference mode (``model.apply_unfreeze``),
and with ``augment="none"`` every epoch feeds it the same pixels. So its output
is computed once per (backbone weights, input size, images) and stored as a
float16 ``.npy`` on the node's disk; every later trial memory-maps it and trains
only the head. Entries are named by a hash of everything that determines them,
so changed weights, images, size or preprocessing make a new entry, never a
stale hit. Building is under a file lock: concurrent trials wait for one builder.

Disk use is bounded by ``$MEDSEARCH_ACTIVATION_CACHE_GB`` (default 20): after
each build, the least recently used entries are deleted until the cache fits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from filelock import FileLock

CACHE_VERSION = 1  # bump when what an entry holds changes
DTYPE = np.float16  # halves disk and page cache; features are post-activation values, far below float16's max
_DEFAULT_LIMIT_GB = 20.0


def cache_dir() -> Path:
    base = os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch"
    return Path(base) / "activations"


def can_use_cache(hp: dict) -> bool:
    """Whether a trial's backbone is frozen, pretrained and fed clean images, so its features can be cached."""
    return hp["weights"] is not None and hp["augment"] == "none" and hp["unfreeze"] in (0, "0")


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


def entry_key(backbone, x: np.ndarray) -> str:
    """The cache entry for ``backbone`` applied to ``x``: its name, weights (preprocessing included), input shape
    and the images themselves."""
    parts = [f"v{CACHE_VERSION}", backbone.name, str(backbone.input.shape), weights_digest(backbone),
             data_digest(x), np.dtype(DTYPE).name]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def cached_features(backbone, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """``backbone(x)`` in inference mode, from the cache or computed once and stored; memory-mapped."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry_key(backbone, x)}.npy"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            features = backbone.predict(x, batch_size=batch_size, verbose=0).astype(DTYPE)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, features)
            os.replace(tmp, path)  # atomic: a reader never sees half an entry
            evict(keep=path)
        else:
            os.utime(path)  # last use, for eviction
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
