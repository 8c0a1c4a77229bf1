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

_DECODER_VERSION = 2  # bump when decoding changes, so cached arrays are rebuilt (2: 16-bit and float images)

# PIL modes of 8-bit samples, which PIL converts to RGB faithfully (grey gets 3 channels, alpha is dropped).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# 16-bit greyscale (PNG X-rays); PIL's own convert("RGB") clips these at 255, turning mid-grey white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MAX = 65535


class UnsupportedImageError(DatasetError):
    """An image whose samples cannot be mapped to 8 bits without guessing their range."""


def cache_root() -> Path:
    """Where every on-disk cache lives, each in its own subfolder: $MEDSEARCH_CACHE or ~/.cache/medsearch."""
    return Path(os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch")


def cache_dir() -> Path:
    return cache_root() / "decoded"


def decode_image(path: str, size: int) -> np.ndarray:
    """Any JPEG/PNG (grayscale 8 or 16 bits, RGB, RGBA, any size) -> (size, size, 3) uint8 RGB."""
    with Image.open(path) as image:
        image = eight_bit(image, path).convert("RGB")  # grayscale gets 3 channels, RGBA drops alpha
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def eight_bit(image: Image.Image, path: str) -> Image.Image:
    """``image`` with 8-bit samples; samples wider than 8 bits are scaled, or refused by name.

    The scale is the full range of the sample type, not the image's own
    min..max: 16-bit 0..65535 maps to 0..255 (v / 257, rounded). A fixed scale
    keeps intensities comparable across images, so a dense X-ray stays brighter
    than a faint one and two classes that differ only in exposure stay apart;
    a per-image stretch would erase exactly that. It is also how viewers, and
    Pillow for 16-bit colour PNGs (opened as 8-bit RGB, high byte), read them.
    (A file that stores 12-bit values in 16-bit samples without scaling them up,
    against the PNG spec, decodes dark, but the same for every image.)

    32-bit integers (mode "I") are taken as 16-bit samples when they fit
    0..65535, which is how 16-bit files reach PIL in that mode; floats (mode
    "F") as 0..1. Other ranges, and other modes, have no scale to read them by
    and raise ``UnsupportedImageError`` rather than decode wrongly.
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _scaled(np.asarray(image), _SIXTEEN_BIT_MAX)
    if mode in ("I", "F"):
        samples = np.asarray(image)
        low, high = (float(samples.min()), float(samples.max())) if samples.size else (0.0, 0.0)
        top = _SIXTEEN_BIT_MAX if mode == "I" else 1.0
        if np.isfinite([low, high]).all() and 0 <= low and high <= top:
            return _scaled(samples, top)
        expected = "0 .. 65535 (16-bit samples)" if mode == "I" else "0 .. 1"
        raise UnsupportedImageError(
            f"{path}: PIL mode {mode!r} with values {low:g} .. {high:g}, outside {expected}: no known scale maps "
            "them to 0..255 without guessing. Save it as an 8- or 16-bit PNG (windowed as it should be seen)."
        )
    raise UnsupportedImageError(
        f"{path}: PIL mode {mode!r} is not a greyscale or colour format this decoder can map to 8-bit RGB; "
        "save it as an 8- or 16-bit PNG or a JPEG"
    )


def _scaled(samples: np.ndarray, top: float) -> Image.Image:
    """Greyscale samples in 0..``top`` -> an 8-bit "L" image, 0..``top`` linearly onto 0..255, rounded."""
    if top == _SIXTEEN_BIT_MAX:  # exact integer rounding: round(v / 257) == (v + 128) // 257
        eight = (samples.astype(np.uint32) + 128) // 257
    else:
        eight = np.rint(samples.astype(np.float32) * np.float32(255 / top))
    return Image.fromarray(eight.astype(np.uint8), "L")


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
