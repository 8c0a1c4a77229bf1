"""Where a study's results live: a local folder, a shared filesystem, or a bucket.

``--storage`` is a path or any URI pyarrow's filesystem layer knows
(``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://...``). Ray Tune writes
checkpoints there from the workers; the driver writes the leaderboards there
through the same layer. No Ray import here: ``analysis/`` uses it too.

Writes never leave half a file for a reader: on a local or shared filesystem
they go to a temporary file that is renamed into place; on an object store a
single PUT replaces the object whole.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs


class StorageError(ValueError):
    """``--storage`` cannot hold results: raised before Ray starts."""


def is_uri(storage: str) -> bool:
    return "://" in str(storage)


class StudyFolder:
    """``STORAGE/<study name>/`` on whichever filesystem ``STORAGE`` names."""

    def __init__(self, storage: str | os.PathLike, name: str):
        storage = str(storage)
        if is_uri(storage):
            try:
                self.fs, root = pafs.FileSystem.from_uri(storage)
            except ValueError as exc:  # pyarrow's ArrowInvalid
                raise StorageError(f"--storage {storage!r} is not a filesystem pyarrow knows ({exc}); use a path, "
                                   "or a URI such as s3://bucket/runs or gs://bucket/runs") from None
            if not root.strip("/"):
                raise StorageError(f"--storage {storage!r} names no bucket; use e.g. s3://bucket/runs")
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(storage).resolve())
        self.storage = storage.rstrip("/") if is_uri(storage) else root  # what Ray's storage_path gets
        self.name = name
        self.path = posixpath.join(root, name)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, *parts: str) -> str:
        """How a user names a file here: a plain path locally, else ``scheme://bucket/...``."""
        return self.uri_of(posixpath.join(self.path, *parts))

    def uri_of(self, path: str) -> str:
        """A path on this folder's filesystem (as Ray's checkpoints give it) as a user names it."""
        return path if self.is_local else f"{self.storage.split('://')[0]}://{path}"

    def __str__(self) -> str:
        return self.uri()

    def _full(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self._full(name) if name else self.path).type != pafs.FileType.NotFound

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._full(name)) as stream:
            return stream.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def write_bytes(self, name: str, data: bytes) -> str:
        target = self._full(name)
        if self.is_local:
            write_atomic(Path(target), data)
        else:
            with self.fs.open_output_stream(target) as stream:  # one PUT: an object is replaced whole
                stream.write(data)
        return self.uri(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode())

    def delete(self, name: str) -> None:
        self.fs.delete_file(self._full(name))

    def write_parquet(self, name: str, frame: pd.DataFrame) -> str:
        return self.write_bytes(name, parquet_bytes(frame))

    def read_parquet(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read_bytes(name)))

    def free_bytes(self) -> int | None:
        """Free space, where a filesystem can tell (buckets cannot)."""
        return shutil.disk_usage(self.path).free if self.is_local else None


def write_atomic(path: Path, data: bytes) -> None:
    """A local file written whole or not at all: a temporary file, then a rename (atomic on POSIX, NFS too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` to a local ``path`` atomically."""
    write_atomic(Path(path), parquet_bytes(frame))
    return Path(path)
