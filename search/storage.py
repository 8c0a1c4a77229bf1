"""Where a study's results live: a local folder, a shared filesystem, or a bucket.

``--storage`` is a path or any URI pyarrow's filesystem layer knows
(``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://...``). Ray Tune writes
checkpoints there from the workers; the driver writes the leaderboards there
through the same layer. No Ray import here: ``analysis/`` uses it too.

Writes never leave half a file for a reader: on a local or shared filesystem
they go to a temporary file that is renamed into place; on an object store a
single PUT replaces the object whole.

A results folder is sealed: the paths recorded in it (a trial's checkpoint)
are relative to it, and ``StudyFolder.resolve`` is the one place that turns
such a path into a file to read, never one outside the folder.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs


class StorageError(ValueError):
    """``--storage`` cannot hold results: raised before Ray starts."""


# The errors a write gets when the disk (or the user's quota) has no room left.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the disk holding the results folder is full: the message says where, and the fix.

    An ``OSError`` still (with the original errno), so whatever handles a failed write handles this one.
    """


def disk_full_error(exc: OSError, path: str | os.PathLike) -> DiskFullError:
    """``exc`` (ENOSPC or EDQUOT) writing ``path`` as a ``DiskFullError`` naming the file, the free space and the fix."""
    where = Path(path).parent
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    reason = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    return DiskFullError(exc.errno, f"the disk holding {str(where)!r} is full ({reason}, {free}) while writing "
                         f"{Path(path).name}; free space there or move the folder to a larger disk")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class OutsideFolderError(ValueError):
    """A path recorded in a results folder, or a file name made from one of its values, leads out of the folder."""


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

    def relative(self, path: str) -> str:
        """A path on this folder's filesystem (as Ray's checkpoints give it) relative to the folder, as recorded."""
        path = posixpath.normpath(path)
        if not path.startswith(self.path + "/"):
            raise OutsideFolderError(f"{self.uri_of(path)!r} is not inside the results folder {self.uri()!r}; "
                                     "Ray writes every checkpoint under STORAGE/<study name>/, so this is a bug")
        return path[len(self.path) + 1:]

    def resolve(self, recorded: str, *, study_name: str | None = None, what: str = "path") -> str:
        """The file or folder that ``recorded``, a path written into this folder, names: always inside the folder.

        ``recorded`` is relative to the folder. Folders written by earlier
        versions record absolute paths or URIs instead; only their part after
        ``<study name>/`` is kept, re-rooted here, so a moved or copied folder
        reads its own files, never those where it was made (which a later
        study under the same name may have replaced). Anything that leads out
        (``..``, a path with no ``<study name>/`` in it, a link to outside)
        raises ``OutsideFolderError`` naming ``what``, the path and the folder.
        """
        relative = recorded
        if is_uri(recorded) or posixpath.isabs(recorded):
            relative = self._rerooted(recorded, study_name or self.name, what)
        relative = posixpath.normpath(relative)
        if relative == ".." or relative.startswith(("../", "/")):
            raise OutsideFolderError(f"{what} {recorded!r} leads out of the results folder {self.uri()!r}; paths "
                                     "recorded in a results folder are relative to it and stay inside it")
        full = posixpath.join(self.path, relative)
        if self.is_local:
            self._refuse_links_out(full, recorded, what)
        return full

    def _rerooted(self, recorded: str, study_name: str, what: str) -> str:
        """The part of an absolute path or URI after its last ``<study name>/``: where Ray put it in the folder."""
        parts = posixpath.normpath(recorded.split("://", 1)[-1]).split("/")
        if study_name not in parts[:-1]:
            raise OutsideFolderError(
                f"{what} {recorded!r} is outside the results folder {self.uri()!r} (no {study_name}/ folder in it "
                "to find it again here); a results folder is read only inside itself: restore its own file, or "
                "copy what the path names into the folder")
        last = len(parts) - 1 - parts[::-1].index(study_name)
        return "/".join(parts[last + 1:])

    def _refuse_links_out(self, full: str, recorded: str, what: str) -> None:
        """A link anywhere on the way to ``full``, or inside it, must not lead out of the folder."""
        root = Path(self.path).resolve()
        entries = [full]
        if os.path.isdir(full):
            for folder, dirs, files in os.walk(full):  # a checkpoint holds a few files
                entries += [os.path.join(folder, n) for n in dirs + files]
        for entry in entries:
            target = Path(entry).resolve()
            if not target.is_relative_to(root):
                raise OutsideFolderError(
                    f"{what} {recorded!r} leads out of the results folder {self.uri()!r} through a link: {entry!r} "
                    f"points to {str(target)!r}; copy the files themselves into the folder")

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
    """A local file written whole or not at all: a temporary file, then a rename (atomic on POSIX, NFS too).

    A failed write (a full disk) removes its temporary file, so nothing partial is left and the file keeps
    its previous content; a full disk raises ``DiskFullError``, naming the file and the free space.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(exc, path) from exc
        raise


def file_name(name: str, what: str) -> str:
    """``name`` (a value from a results folder, such as a trial name) as one file name, or ``OutsideFolderError``.

    A name with a path separator, ``.``/``..`` or a NUL would put the file somewhere else than the folder meant.
    """
    if name in ("", ".", "..") or any(ch in name for ch in "/\\\0"):
        raise OutsideFolderError(f"{what} {name!r} cannot be a file name: it would leave the folder it is written "
                                 "to (or is empty); a name without '/', '\\' or '..' is needed")
    return name


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` to a local ``path`` atomically."""
    write_atomic(Path(path), parquet_bytes(frame))
    return Path(path)
