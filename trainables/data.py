"""Decode images once into uint8 arrays, cached on disk by content and size.

Trials never touch image files: the driver decodes the train and validation
images here and ships the arrays to every node through the Ray object store.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainables.datasets import DatasetError
from trainables.datasets._registry import DICOM_SUFFIXES

# Bump when decoding changes, so cached arrays (and the audits keyed by ``cache_key``) are rebuilt.
# 2: 16-bit and float images; 3: EXIF orientation applied (a cache of stored, unturned pixels must not be reused).
_DECODER_VERSION = 3
# The EXIF/TIFF Orientation tag (PIL.ExifTags.Base.Orientation): 1 is upright as stored; 2-8 say how a viewer
# turns or mirrors the stored pixels (phones store portrait photographs landscape, with 6 or 8).
EXIF_ORIENTATION = 0x0112
_UPRIGHT = 1
_TRANSPOSED = frozenset({5, 6, 7, 8})  # orientations that swap width and height

# PIL modes of 8-bit samples, which PIL converts to RGB faithfully (grey gets 3 channels, alpha is dropped).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# 16-bit greyscale (PNG X-rays); PIL's own convert("RGB") clips these at 255, turning mid-grey white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MAX = 65535
_WARNED_MULTI_FRAME: set[str] = set()  # DICOM files whose extra frames were reported, so each is reported once


class UnsupportedImageError(DatasetError):
    """An image whose samples cannot be mapped to 8 bits without guessing their range."""


class UnreadableImageError(DatasetError):
    """A file that cannot be decoded at all: not the format its suffix says, truncated, or needing a missing codec."""


def cache_root() -> Path:
    """Where every on-disk cache lives, each in its own subfolder: $MEDSEARCH_CACHE or ~/.cache/medsearch."""
    return Path(os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch")


def cache_dir() -> Path:
    return cache_root() / "decoded"


def decode_image(path: str, size: int) -> np.ndarray:
    """Any JPEG/PNG (grayscale 8 or 16 bits, RGB, RGBA, any size, upright by its EXIF orientation) or DICOM ->
    (size, size, 3) uint8 RGB."""
    with open_image(path) as image:
        image = eight_bit(image, path).convert("RGB")  # grayscale gets 3 channels, RGBA drops alpha
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is read as DICOM (by its suffix, as the listing takes it), not by PIL."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def open_image(path: str | Path, *, draft: tuple[str, tuple[int, int]] | None = None) -> Image.Image:
    """``path`` as a PIL image, as a viewer shows it, for ``eight_bit`` and PIL's resizing: every caller reads
    files through this.

    A DICOM file is decoded here by ``read_dicom`` (an 8-bit RGB image, as a
    viewer would show it). Anything else is ``Image.open``, lazily, turned
    upright by its EXIF orientation (``exif_orientation``): a phone photograph
    stored 128 x 64 with orientation 6 is the 64 x 128 image its owner saw,
    and is read so in training, prediction and every audit. ``draft``:
    ``(mode, (width, height))`` for ``Image.draft``, decoding a JPEG at reduced
    scale; it must be given here, since turning an image decodes it. Use it as
    a context manager.
    """
    if is_dicom(path):  # DICOM has no EXIF: its pixel grid is as the modality wrote it
        return Image.fromarray(read_dicom(str(path)), "RGB")
    image = Image.open(path)
    if draft is not None and image.format == "JPEG":
        image.draft(*draft)
    if exif_orientation(image) == _UPRIGHT:
        return image  # still lazy
    with image:
        return ImageOps.exif_transpose(image)  # decodes, turns, and drops the tag from the copy


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation (1-8) of an opened image, from its header; 1 (upright) when absent or invalid."""
    value = image.getexif().get(EXIF_ORIENTATION, _UPRIGHT)
    return value if isinstance(value, int) and 1 <= value <= 8 else _UPRIGHT


def _header_orientation(image: Image.Image) -> int:
    """``exif_orientation`` without decoding: Pillow's PNG reader decodes the whole image to look for an eXIf
    chunk after the pixel data, which the PNG specification places before them; a PNG without one there is
    taken as upright (``open_image``, which decodes anyway, still finds a late one)."""
    if image.format == "PNG" and "exif" not in image.info:
        return _UPRIGHT
    return exif_orientation(image)


def displayed_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as a viewer shows it (and ``open_image`` reads it), from its header alone:
    the stored size, swapped for an EXIF orientation that turns it by 90 degrees (DICOM: its pixel grid)."""
    if is_dicom(path):
        with open_image(path) as image:
            return image.size
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if _header_orientation(image) in _TRANSPOSED else (width, height)


def turned_by_exif(paths, *, workers: int | None = None) -> list[str]:
    """The ``paths`` whose EXIF orientation turns or mirrors them (not 1), from their headers: what a run says it
    rotated. Unreadable files are left to the decoder to name."""
    def turned(path: str) -> bool:
        if is_dicom(path):
            return False
        try:
            with Image.open(path) as image:
                return _header_orientation(image) != _UPRIGHT
        except Exception:  # PIL raises many types for bad files; decode_images lists them
            return False

    paths = [str(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return [p for p, t in zip(paths, pool.map(turned, paths)) if t]


def rotated_note(n: int) -> str:
    """The one line a run and a prediction print about ``turned_by_exif``'s images."""
    return f"{n} image(s) rotated by their EXIF orientation (read upright, as a viewer shows them)"


def read_dicom(path: str) -> np.ndarray:
    """A DICOM file's pixels as (rows, columns, 3) uint8 RGB: the image as a viewer would show it.

    Greyscale (MONOCHROME1/2), in DICOM's order: the modality LUT or
    rescale slope/intercept (``apply_modality_lut``), then the VOI LUT, else
    the first window centre/width (``apply_voi_lut``), whose output range maps
    linearly onto 0..255; MONOCHROME1 (white is 0) is inverted, and grey
    gets three equal channels. Colour (RGB, or YBR that pydicom converts to
    RGB) must be 8-bit and is taken as is. Of a multi-frame file only the
    first frame is read, with a warning naming the file. A file that is not
    DICOM, is truncated, or is compressed with a codec that no installed
    plugin decodes raises ``UnreadableImageError`` naming it (and what to
    install); samples this cannot map raise ``UnsupportedImageError``.
    pydicom is imported here only, so importing the package stays light.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise UnreadableImageError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise UnreadableImageError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise UnreadableImageError(f"{path}: pixel data compressed as {syntax.name!r}, which pydicom cannot "
                                       "decode; convert the file to an uncompressed transfer syntax") from exc
        if not decoder.is_available:
            raise UnreadableImageError(
                f"{path}: pixel data compressed as {syntax.name!r} needs a decoder that is not installed; "
                f"install one of: {'; '.join(decoder.missing_dependencies)} "
                "(e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
            )
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        samples = pixel_array(ds, index=0)  # the first frame only; YBR colour comes back as RGB
    except Exception as exc:  # truncated pixel data, inconsistent group 0028, a failing codec
        raise UnreadableImageError(f"{path}: DICOM pixel data could not be decoded "
                                   f"({type(exc).__name__}: {exc})") from exc
    if frames > 1 and path not in _WARNED_MULTI_FRAME:  # once per file: the start-up checks read it too
        _WARNED_MULTI_FRAME.add(path)
        print(f"warning: {path}: DICOM file holds {frames} frames; only the first is used", file=sys.stderr,
              flush=True)

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples.ndim == 3 and samples.shape[-1] == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        if samples.dtype != np.uint8:
            raise UnsupportedImageError(
                f"{path}: DICOM {photometric} with {ds.get('BitsAllocated')}-bit samples; only 8-bit colour is "
                "read (save it as 8-bit RGB)"
            )
        return np.ascontiguousarray(samples)
    if samples.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"{path}: DICOM photometric interpretation {photometric or 'missing'!r} with samples shaped "
            f"{samples.shape} is not a greyscale or colour format this decoder can map to 8-bit RGB; "
            "save it as MONOCHROME2, MONOCHROME1 or 8-bit RGB"
        )
    try:
        grey = _dicom_grey(samples, ds, apply_modality_lut, apply_voi_lut)
    except Exception as exc:  # a zero window width, a LUT of unsupported depth: a damaged file, not a format
        raise UnreadableImageError(f"{path}: DICOM pixel values could not be mapped to grey levels "
                                   f"({type(exc).__name__}: {exc})") from exc
    if photometric == "MONOCHROME1":  # its 0 is white
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def _dicom_grey(samples: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    """Stored greyscale values -> 8 bits: modality LUT/rescale, then VOI LUT or window, onto 0..255, rounded."""
    values = apply_modality_lut(samples, ds)
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        # pydicom's choice when both are present: the VOI LUT, over the window. Its input is integral; its
        # output runs 0 .. 2**n - 1, n the bits per entry: the LUT Descriptor's third value, unless the entries
        # need fewer (at least 8). Some CRs declare 16 bits for 12-bit entries, which would decode nearly black;
        # viewers (dcm4che, Cornerstone, Horos) correct for them too.
        shown = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
        entries, first, declared = (int(v) for v in lut[0].LUTDescriptor)
        table = apply_voi_lut(np.arange(first, first + (entries or 2**16), dtype=np.int64), ds, index=0)  # as decoded
        needed = max(8, int(np.max(table)).bit_length())
        low, high = 0.0, float(2 ** min(declared, needed) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # apply_windowing maps the first window onto the stored values' range after rescale, y_min .. y_max, and
        # everything outside the window onto those ends; two values far outside it give the ends exactly.
        shown = apply_voi_lut(values, ds, index=0)
        with np.errstate(over="ignore"):  # a SIGMOID window's exp() overflows to inf out there, as intended
            low, high = (float(v) for v in apply_voi_lut(np.array([-1e30, 1e30]), ds, index=0))
    else:
        # No VOI LUT and no window: the file says nothing about which values matter, so scale the image's own
        # modality values min..max onto 0..255, as viewers do. A per-image stretch, unlike the fixed scale of a
        # 16-bit PNG (see ``eight_bit``): window the files before training where brightness itself tells classes apart.
        shown = values
        low, high = float(np.min(values)), float(np.max(values))
    if not high > low:  # one value everywhere: no contrast to keep
        return np.zeros(samples.shape, dtype=np.uint8)
    scaled = (np.asarray(shown, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


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


def data_digest(x: np.ndarray) -> str:
    """A hash of an image array's shape and bytes: names the activation-cache entries computed from it. The
    driver computes it once per split (``DIGEST_PREFIX`` keys beside the arrays), so trials need not hash
    gigabytes again."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(x.shape).encode())
    digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()


DIGEST_PREFIX = "digest_"  # data["digest_x_train"]: data_digest(data["x_train"]), shipped with the arrays


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
