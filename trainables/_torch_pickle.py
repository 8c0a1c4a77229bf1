"""Read a legacy (pre-1.6, non-zip) ``torch.save`` state dict into numpy, without torch.

The legacy format is a concatenation of five parts::

    pickle(MAGIC_NUMBER)            # a 80-bit int, identifies the format
    pickle(PROTOCOL_VERSION)        # 1001
    pickle(sys_info)                # {"little_endian": ..., "type_sizes": ..., ...}
    pickle(state_dict)              # tensors point at storages via persistent ids
    pickle([storage keys])          # the order in which the storages follow
    for each key: int64 element count, then the raw storage bytes

A tensor in the state-dict pickle is ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)``, whose ``storage`` is a persistent id
``("storage", torch.FloatStorage, key, location, numel, view_metadata)``.
Storage bytes only come after the pickle, so unpickling yields placeholders
that are turned into arrays once the storages are read.

Unpickling can run arbitrary code, so ``find_class`` only hands out the few
names a state dict needs and refuses everything else.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage classes -> element dtype (little-endian, the only layout we accept).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchPickleError(ValueError):
    """The file is not a legacy torch state dict this reader understands."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str  # e.g. "FloatStorage"


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    view_offset: int = 0  # pre-1.0 storage views: an element offset into the root storage


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _PlainUnpickler(pickle.Unpickler):
    """For the header and storage-key pickles: plain ints, strings, lists and dicts only."""

    def find_class(self, module, name):
        raise TorchPickleError(f"refusing to load {module}.{name}: a torch file header holds no objects")

    def persistent_load(self, pid):
        raise TorchPickleError(f"unexpected persistent id {pid!r} outside the state dict")


def _load_plain(f):
    return _PlainUnpickler(f).load()


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles the state-dict part, refusing every global but a few torch names."""

    def __init__(self, f):
        super().__init__(f)
        self.storages: dict[str, _StorageRef] = {}  # every storage the pickle refers to, by key

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchPickleError(f"refusing to load {module}.{name}: not part of a plain torch state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchPickleError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"unsupported storage type {storage_type!r}")
        view_offset = 0
        if view_metadata is not None:  # (view_key, offset, view_size): a slice of storage `key`
            _view_key, view_offset, _view_size = view_metadata
        ref = _StorageRef(str(key), STORAGE_DTYPES[storage_type.name], int(numel), int(view_offset))
        self.storages.setdefault(ref.key, ref)
        return ref


def _check_header(f, path) -> None:
    head = f.read(4)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        raise TorchPickleError(
            f"{path} is a zip-format torch file (torch >= 1.6 default); only the legacy "
            "format is supported: re-save it with torch.save(..., _use_new_zipfile_serialization=False)"
        )
    try:
        magic = _load_plain(f)
    except Exception:  # garbage can make pickle raise almost anything
        magic = None
    if magic != MAGIC_NUMBER:
        raise TorchPickleError(f"{path} is not a legacy torch file (no torch magic number at its start)")
    version = _load_plain(f)
    if version != PROTOCOL_VERSION:
        raise TorchPickleError(f"{path}: unsupported torch protocol version {version!r}")
    sys_info = _load_plain(f)
    if not isinstance(sys_info, dict):
        raise TorchPickleError(f"{path}: the torch header holds {sys_info!r}, not the sys info dict")
    if not sys_info.get("little_endian", False):
        raise TorchPickleError(f"{path} was saved on a big-endian machine, which is not supported")


def _read_storages(f, keys, refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read the raw storages that follow the pickles, in the order of ``keys``."""
    storages = {}
    for key in keys:
        if key not in refs:
            raise TorchPickleError(f"storage {key!r} is listed but the pickle never refers to it")
        dtype = refs[key].dtype
        header = f.read(8)
        if len(header) != 8:
            raise TorchPickleError(f"file ends before storage {key!r}")
        (numel,) = struct.unpack("<q", header)  # each storage starts with its element count
        if numel < 0:
            raise TorchPickleError(f"storage {key!r} has a negative size")
        data = f.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise TorchPickleError(f"file ends inside storage {key!r}")
        storages[key] = np.frombuffer(data, dtype=dtype)
    missing = set(refs) - set(storages)
    if missing:
        raise TorchPickleError(f"storages {sorted(missing)} are referred to but not in the file")
    return storages


def _to_array(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Gather the tensor's elements from its storage, honouring offset and strides."""
    flat = storages[ref.storage.key][ref.storage.view_offset :]
    if not all(ref.shape):  # an empty tensor has no elements to gather
        return np.zeros(ref.shape, dtype=flat.dtype)
    start = ref.offset
    last = start + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))  # furthest element reached
    if len(ref.stride) != len(ref.shape) or start < 0 or last >= flat.size or min(ref.stride, default=0) < 0:
        raise TorchPickleError(f"tensor {ref.shape} with stride {ref.stride} at offset {start} overruns its storage")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[start:], shape=ref.shape, strides=strides)
    return view.copy(order="C")  # detaches from the file buffer; C-contiguous, keeps 0-d shapes


def load_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the state dict saved (legacy format) at ``path`` as ``{name: array}``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            _check_header(f, path)
            unpickler = _StateDictUnpickler(f)
            state = unpickler.load()
            keys = _load_plain(f)
        except TorchPickleError:
            raise
        except Exception as exc:
            raise TorchPickleError(f"{path}: corrupt legacy torch file ({exc!r})") from exc
        if not isinstance(state, dict):
            raise TorchPickleError(f"{path} holds a {type(state).__name__}, not a state dict")
        if not isinstance(keys, list):
            raise TorchPickleError(f"{path}: expected the list of storage keys after the state dict")
        storages = _read_storages(f, keys, unpickler.storages)
    # Non-tensor entries (nested dicts of a full checkpoint, ints) are left out.
    return {name: _to_array(t, storages) for name, t in state.items() if isinstance(t, _TensorRef)}
