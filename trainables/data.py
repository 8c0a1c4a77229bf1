"""Decode images once into uint8 arrays, cached on disk by content and size.

Trials never touch image files: the driver decodes the train and validation
images here and ships the arrays to every node through the Ray object store.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.datasets import DatasetError

_DECODER_VERSION = 1  # bump when decoding changes, so cached arrays are rebuilt


def cache_dir() -> Path:
    base = os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch"
    return Path(base) / "decoded"


def decode_image(path: str, size: int) -> np.ndarray:
    """Any JPEG/PNG (grayscale, RGB, RGBA, any size) -> (size, size, 3) uint8 RGB."""
    with Image.open(path) as image:
        image = image.convert("RGB")  # grayscale gets 3 channels, RGBA drops alpha
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def cache_key(paths: list[str], size: int) -> str:
    """Names a cache entry by the files (path, size, modification time) and the image size."""
    digest = hashlib.sha256(f"v{_DECODER_VERSION}|{size}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def decode_images(paths: list[str], size: int, *, use_cache: bool = True, workers: int | None = None) -> np.ndarray:
    """Decode ``paths`` to an (N, size, size, 3) uint8 array, reusing the on-disk cache.

    A corrupt or unreadable file raises ``DatasetError`` listing every bad file.
    """
    paths = [str(p) for p in paths]
    target = cache_dir() / f"{cache_key(paths, size)}.npy" if use_cache else None
    if target is not None and target.exists():
        return np.load(target)
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = decode_image(paths[i], size)
        except Exception as exc:  # PIL raises many types for bad files
            bad.append(f"{paths[i]} ({type(exc).__name__}: {exc})")

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        list(pool.map(work, range(len(paths))))
    if bad:
        shown = "\n  ".join(sorted(bad)[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DatasetError(f"{len(bad)} image(s) could not be decoded:\n  {shown}{more}")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, target)  # atomic: a reader never sees half an array
    return out
