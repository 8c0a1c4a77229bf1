"""Dataset health checks: unreadable images and exact duplicate files.

``find_corrupt`` finds files that would make ``trainables.data.decode_images``
fail, before a search starts. ``find_duplicates`` finds byte-identical images,
which inflate test scores when one copy lands in train and the other in test.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import pandas as pd
from PIL import Image

_JPEG_DRAFT = (64, 64)  # decode JPEGs at 1/8 scale: still reads every byte of the entropy-coded data


def check_image(path: str | Path) -> str | None:
    """``None`` if ``path`` is a readable image, else why not.

    ``Image.verify`` checks the container (PNG chunk CRCs up to IEND) but not
    JPEG data, so a truncated JPEG passes it; decoding in draft mode (DCT
    scaling, a fraction of a full decode) catches truncation and garbage.
    The decoder's own bit-depth step then refuses what it cannot scale to 8
    bits (a float image outside 0..1), so this check and the decoder agree.
    """
    from trainables.data import eight_bit, is_dicom, open_image, read_dicom

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        if is_dicom(path):  # PIL cannot open DICOM: decode it with the training decoder, which checks as it reads
            read_dicom(str(path))
            return None
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the image unusable: reopen to decode, as the decoder does (turned by its EXIF orientation)
        with open_image(path, draft=("RGB", _JPEG_DRAFT)) as image:
            image.load()
            eight_bit(image, str(path))
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def find_corrupt(paths: Iterable[str | Path], *, workers: int | None = None) -> list[tuple[str, str]]:
    """``[(path, reason), ...]`` for every file that is missing, empty or not a decodable image, sorted by path."""
    paths = [str(p) for p in paths]
    # PIL releases the GIL while decoding, so threads overlap the work; keep the pool small on shared machines.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(check_image, paths))
    return sorted((p, r) for p, r in zip(paths, reasons) if r is not None)


def find_corrupt_cached(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """``find_corrupt``, remembered on disk for an unchanged set of files (a re-run skips the scan)."""
    import json

    from trainables.data import cache_dir, cache_key

    paths = [str(p) for p in paths]
    record = cache_dir() / f"corrupt-{cache_key(paths, 0)}.json"
    if record.exists():
        return [tuple(pair) for pair in json.loads(record.read_text())]
    bad = find_corrupt(paths)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(bad))
    os.replace(tmp, record)
    return bad


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_duplicates(table: pd.DataFrame) -> pd.DataFrame:
    """Pairs of byte-identical files in an image table (exact duplicates by SHA-256).

    One row per pair (``n`` copies give ``n * (n - 1) / 2`` rows): ``sha256``,
    ``path_a``, ``path_b``, ``label_a``, ``label_b`` and ``same_label``; when
    the table has a ``split`` column, also ``split_a``, ``split_b`` and
    ``cross_split`` (the copies sit in different splits, so one leaks).
    """
    with_split = "split" in table.columns
    columns = ["sha256", "path_a", "path_b", "label_a", "label_b", "same_label"]
    columns += ["split_a", "split_b", "cross_split"] if with_split else []
    rows = table.reset_index(drop=True)
    # Only files of equal size can be equal: hash just those (on real data, a small fraction).
    sizes = rows["path"].map(os.path.getsize)
    candidates = rows[sizes.duplicated(keep=False)]
    hashes = candidates["path"].map(file_sha256)
    pairs = []
    for sha, idx in candidates.groupby(hashes).groups.items():
        for a, b in itertools.combinations(sorted(idx, key=lambda i: rows.at[i, "path"]), 2):
            ra, rb = rows.loc[a], rows.loc[b]
            pair = [sha, ra["path"], rb["path"], ra["label"], rb["label"], ra["label"] == rb["label"]]
            if with_split:
                pair += [ra["split"], rb["split"], ra["split"] != rb["split"]]
            pairs.append(pair)
    return pd.DataFrame(pairs, columns=columns).sort_values(["path_a", "path_b"], ignore_index=True)
