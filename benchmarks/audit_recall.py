"""Does the leakage audit find planted copies of every kind, flipped and rotated ones included? (issue 27.10)

    python benchmarks/audit_recall.py [--shared ../shared/datasets] [--originals 140] [--per-kind 6]

Real melanoma10k images (``train/``, seeded): ``--originals`` of them as they are, and for each kind of copy
below ``--per-kind`` originals (different ones per kind) copied that way, each copy re-encoded as JPEG at a
quality drawn from 60-90. The audit (``trainables.near_duplicates.find_near_duplicates``, default ``Settings``)
runs over originals and copies together, with empty caches, so its time is a cold run's.

- **recall**, per kind and in all: copies paired with their own original;
- **false pairs**: pairs of images from two different originals (melanoma10k holds a few true duplicates of
  its own, so this is an upper bound), listed;
- **cost**: seconds of the hash stage and of the embedding stage, cold.

Writes ``benchmarks/results/audit_recall.json``; copies go to a temporary folder, never into the repository.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

SEED = 0
ORIGINALS, PER_KIND = 140, 6
QUALITY = (60, 90)  # every copy is re-encoded as JPEG at a quality drawn from this range
RESIZE, CROP, BRIGHTEN = 0.75, 0.05, 1.15  # 3/4 the size; 5 % off each side; 15 % brighter
T = Image.Transpose
# Each kind of copy: what it does to the original. The eight flips and right-angle rotations are all here.
KINDS = {
    "jpeg": lambda im: im,
    "resize": lambda im: im.resize((round(im.width * RESIZE), round(im.height * RESIZE)), Image.Resampling.BICUBIC),
    "crop": lambda im: im.crop((round(im.width * CROP), round(im.height * CROP),
                                round(im.width * (1 - CROP)), round(im.height * (1 - CROP)))),
    "mirror": lambda im: im.transpose(T.FLIP_LEFT_RIGHT),
    "flip_up_down": lambda im: im.transpose(T.FLIP_TOP_BOTTOM),
    "rotate_90": lambda im: im.transpose(T.ROTATE_90),
    "rotate_180": lambda im: im.transpose(T.ROTATE_180),
    "rotate_270": lambda im: im.transpose(T.ROTATE_270),
    "transpose": lambda im: im.transpose(T.TRANSPOSE),
    "transverse": lambda im: im.transpose(T.TRANSVERSE),
    "brighten": lambda im: ImageEnhance.Brightness(im).enhance(BRIGHTEN),
}


def planted_set(root: Path, work: Path, originals: int, per_kind: int, seed: int) -> pd.DataFrame:
    """``originals`` real images and their copies: ``path``, ``label``, ``family`` (the original's row), ``kind``."""
    rng = np.random.default_rng(seed)
    files = sorted((root / "train").glob("*/*.jpg"))
    chosen = [files[i] for i in rng.choice(len(files), size=originals, replace=False)]
    rows = [{"path": str(p), "label": p.parent.name, "family": i, "kind": "original"} for i, p in enumerate(chosen)]
    sources = rng.permutation(originals)[:len(KINDS) * per_kind].reshape(len(KINDS), per_kind)
    for kind, family in zip(KINDS, sources):
        for i in family:
            with Image.open(chosen[i]) as image:
                copy = KINDS[kind](image.convert("RGB"))
            path = work / f"{chosen[i].stem}_{kind}.jpg"
            copy.save(path, quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
            rows.append({"path": str(path), "label": chosen[i].parent.name, "family": int(i), "kind": kind})
    return pd.DataFrame(rows)


def measure(table: pd.DataFrame) -> dict:
    from trainables.near_duplicates import Settings, embedding_pairs, hash_pairs, image_embeddings, image_hashes

    settings = Settings()
    started = time.monotonic()
    hashes = image_hashes(table["path"])
    hash_s = time.monotonic() - started
    started = time.monotonic()
    # As find_near_duplicates embeds (dihedral where the audit has it; the code before had one view only).
    dihedral = "dihedral" in inspect.signature(image_embeddings).parameters
    embeddings = image_embeddings(table["path"], settings.embedding, size=settings.embedding_size,
                                  **({"dihedral": True} if dihedral else {}))
    embed_s = time.monotonic() - started
    started = time.monotonic()
    by_hash = hash_pairs(hashes, settings.hash_distance)
    by_embedding = embedding_pairs(embeddings, settings.embedding_similarity)
    match_s = time.monotonic() - started
    family, kind = table["family"].to_numpy(), table["kind"].to_numpy()

    def found(pairs) -> set[tuple[int, int]]:
        return {(int(a), int(b)) for a, b in zip(pairs["a"], pairs["b"])}

    hash_found, embed_found = found(by_hash), found(by_embedding)
    either = hash_found | embed_found
    original_of = {int(f): i for i, (f, k) in enumerate(zip(family, kind)) if k == "original"}
    per_kind = {}
    for k in KINDS:
        copies = [i for i in range(len(table)) if kind[i] == k]
        pair = [tuple(sorted((original_of[int(family[i])], i))) for i in copies]
        per_kind[k] = {"copies": len(copies), "found": sum(p in either for p in pair),
                       "by_hash": sum(p in hash_found for p in pair),
                       "by_embedding": sum(p in embed_found for p in pair)}
    false = sorted((a, b) for a, b in either if family[a] != family[b])
    copies = int((kind != "original").sum())
    return {
        "images": len(table), "copies": copies,
        "recall": round(sum(v["found"] for v in per_kind.values()) / copies, 4),
        "found": sum(v["found"] for v in per_kind.values()),
        "per_kind": per_kind,
        "false_pairs": len(false),
        "false_pair_list": [[Path(table.at[a, "path"]).name, Path(table.at[b, "path"]).name] for a, b in false],
        "seconds": {"hash": round(hash_s, 2), "embedding": round(embed_s, 2), "matching": round(match_s, 3)},
        "hash_views": int(hashes.shape[1]), "embedding_shape": list(np.shape(embeddings)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--originals", type=int, default=ORIGINALS)
    parser.add_argument("--per-kind", type=int, default=PER_KIND)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "audit_recall.json"))
    args = parser.parse_args(argv)
    root = Path(args.shared) / "melanoma10k"
    if not root.is_dir():
        print(f"no melanoma10k under {args.shared}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        os.environ["MEDSEARCH_CACHE"] = str(Path(work) / "cache")  # cold: nothing hashed or embedded before
        copies = Path(work) / "copies"
        copies.mkdir()
        table = planted_set(root, copies, args.originals, args.per_kind, SEED)
        result = {"originals": args.originals, "per_kind": args.per_kind, "seed": SEED, **measure(table)}
    print(json.dumps({k: v for k, v in result.items() if k != "false_pair_list"}, indent=1))
    print("false pairs:", result["false_pair_list"])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
