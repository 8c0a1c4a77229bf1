"""Does the near-duplicate finder find near-duplicates, and only them? Measured on real dermoscopy.

    python benchmarks/near_duplicates.py --shared ../shared/datasets [--parts ham planted melanoma]

Three measurements (issue 16), written to ``benchmarks/results/near_duplicates/``
as ``near_duplicates.json`` and ``near_duplicates.md``:

- **ham**: HAM10000's ``lesion_id`` as ground truth for "same lesion". Precision
  and recall of the finder's pairs against same-lesion pairs, for a sweep of
  pHash and embedding thresholds. Photographs of one lesion taken on different
  days are different images, so recall is bounded well below 1 by design.
- **planted**: 400 HAM10000 images (seeded), each copied five ways: re-encoded
  (JPEG quality 60-90), resized (0.5-1.5x), cropped (each side kept 90-100 %,
  at a random offset), flipped (left-right or top-bottom) and brightness-shifted
  (10-25 % up or down). Recall = copies paired with their original; false-pair
  rate = share of the 10,015 originals paired with any image of another lesion
  (an upper bound: HAM10000 has some lesions under two ids).
- **melanoma**: melanoma10k ``train/``: near-duplicate clusters, the default
  (stratified) split's contamination, and the same frozen-ImageNet
  ``efficientnet_lite0`` classifier (``benchmarks/transfer_gain.py``'s
  ``train_arm``) trained on that split and on one grouped by the clusters.

Copies are written to a temporary folder (``--work``), never into the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from trainables.datasets import load_table  # noqa: E402
from trainables.near_duplicates import (  # noqa: E402
    CLUSTER_COLUMN, Settings, embedding_pairs, find_near_duplicates, hash_pairs, image_embeddings, image_hashes,
)

SEED = 0
EMBEDDING = "efficientnet_lite0"
HASH_SWEEP = (8, 14, 20, 26, 32, 38, 44)  # bits of 256
EMBEDDING_SWEEP = (0.90, 0.92, 0.94, 0.945, 0.95, 0.96, 0.97)
TRANSFORMS = ("jpeg", "resize", "crop", "flip", "brightness")
PLANTED_ORIGINALS = 400
# melanoma: the classifier trained on both splits (transfer_gain's frozen arm, at its image size and epochs).
TRAIN_IMAGE_SIZE, TRAIN_EPOCHS, TRAIN_BATCH = 96, 5, 32


def sweep_pairs(hashes, embeddings) -> pd.DataFrame:
    """Every pair within the sweep's loosest thresholds: ``a``, ``b``, ``hash_distance``, ``embedding_similarity``."""
    close = hash_pairs(hashes, max(HASH_SWEEP))
    if embeddings is None:
        return close.assign(embedding_similarity=np.nan)
    return close.merge(embedding_pairs(embeddings, min(EMBEDDING_SWEEP)), on=["a", "b"], how="outer")


def found(pairs: pd.DataFrame, hash_bits: int | None, similarity: float | None) -> pd.Series:
    """Which pairs the finder reports at these thresholds (None: that signal off)."""
    by_hash = pairs["hash_distance"].le(hash_bits) if hash_bits is not None else False
    by_embedding = pairs["embedding_similarity"].ge(similarity) if similarity is not None else False
    return pd.Series(by_hash | by_embedding, index=pairs.index).fillna(False).astype(bool)


def settings_grid(with_embedding: bool) -> list[tuple[int | None, float | None]]:
    grid = [(h, None) for h in HASH_SWEEP]
    if with_embedding:
        default = Settings().hash_distance
        grid += [(None, e) for e in EMBEDDING_SWEEP] + [(default, e) for e in EMBEDDING_SWEEP]
    return grid


def label(hash_bits, similarity) -> str:
    parts = ([f"pHash <= {hash_bits}"] if hash_bits is not None else []) + (
        [f"embedding >= {similarity}"] if similarity is not None else [])
    return " or ".join(parts)


# --- HAM10000: pairs against lesion_id ---------------------------------------------------------------------------


def measure_ham(table: pd.DataFrame, hashes, embeddings) -> dict:
    lesion = table["group"].to_numpy()
    sizes = table["group"].value_counts()
    same_lesion_pairs = int((sizes * (sizes - 1) // 2).sum())
    pairs = sweep_pairs(hashes, embeddings)
    same = lesion[pairs["a"]] == lesion[pairs["b"]]
    rows = []
    for hash_bits, similarity in settings_grid(embeddings is not None):
        hit = found(pairs, hash_bits, similarity).to_numpy()
        true = int((hit & same).sum())
        rows.append({"thresholds": label(hash_bits, similarity), "hash_distance": hash_bits,
                     "embedding_similarity": similarity, "pairs": int(hit.sum()), "same_lesion_pairs_found": true,
                     "precision": round(true / hit.sum(), 4) if hit.sum() else None,
                     "recall": round(true / same_lesion_pairs, 4)})
    return {"images": len(table), "lesions": int(len(sizes)), "same_lesion_pairs": same_lesion_pairs, "sweep": rows}


# --- Planted copies ----------------------------------------------------------------------------------------------


def plant_copies(table: pd.DataFrame, folder: Path, n: int, seed: int) -> pd.DataFrame:
    """Five transformed copies of ``n`` seeded originals, written as JPEG under ``folder``: a table of
    ``path``, ``label``, ``group`` (the original's lesion), ``original`` (its row) and ``transform``."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in rng.choice(len(table), size=n, replace=False):
        with Image.open(table.at[i, "path"]) as image:
            image = image.convert("RGB")
        for transform in TRANSFORMS:
            copy, quality = image, 95
            if transform == "jpeg":
                quality = int(rng.integers(60, 91))
            elif transform == "resize":
                scale = rng.uniform(0.5, 1.5)
                copy = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
            elif transform == "crop":  # each side keeps 90-100 %, anywhere in the image
                w, h = (round(side * rng.uniform(0.9, 1.0)) for side in image.size)
                x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
                copy = image.crop((x, y, x + w, y + h))
            elif transform == "flip":
                flip = Image.Transpose.FLIP_LEFT_RIGHT if rng.random() < 0.5 else Image.Transpose.FLIP_TOP_BOTTOM
                copy = image.transpose(flip)
            else:  # brightness
                copy = ImageEnhance.Brightness(image).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.25))
            path = folder / f"{Path(table.at[i, 'path']).stem}_{transform}.jpg"
            copy.save(path, quality=quality)
            rows.append({"path": str(path), "label": table.at[i, "label"], "group": table.at[i, "group"],
                         "original": int(i), "transform": transform})
    return pd.DataFrame(rows)


def measure_planted(table, copies, hashes, embeddings) -> dict:
    """Recall on (original, copy) pairs; false-pair rate over the originals, against other lesions."""
    n = len(table)
    lesion = np.concatenate([table["group"].to_numpy(), copies["group"].to_numpy()])
    pairs = sweep_pairs(hashes, embeddings)
    a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
    planted = {(int(o), n + k) for k, o in enumerate(copies["original"])}
    is_planted = np.array([(x, y) in planted for x, y in zip(a, b)], dtype=bool)
    other_lesion = lesion[a] != lesion[b]
    rows = []
    for hash_bits, similarity in settings_grid(embeddings is not None):
        hit = found(pairs, hash_bits, similarity).to_numpy()
        got = {(int(x), int(y)) for x, y in zip(a[hit & is_planted], b[hit & is_planted])}
        per = {t: float(np.mean([(int(o), n + k) in got for k, o in enumerate(copies["original"])
                                 if copies.at[k, "transform"] == t])) for t in TRANSFORMS}
        wrong = hit & other_lesion
        flagged = set(a[wrong & (a < n)]) | set(b[wrong & (b < n)])  # originals with a partner of another lesion
        rows.append({"thresholds": label(hash_bits, similarity), "hash_distance": hash_bits,
                     "embedding_similarity": similarity, "recall": round(len(got) / len(planted), 4),
                     "recall_by_transform": {t: round(v, 3) for t, v in per.items()},
                     "false_pair_rate": round(len(flagged) / n, 4), "false_pairs": int(wrong.sum())})
    return {"originals_copied": int(copies["original"].nunique()), "copies": len(copies), "pool": n + len(copies),
            "sweep": rows}


# --- melanoma10k: clusters and the split's effect on validation accuracy -----------------------------------------


def measure_melanoma(data_dir: str, settings: Settings, embeddings) -> dict:
    from trainables.splits import assign_splits

    table = load_table("melanoma", data_dir)
    started = time.perf_counter()
    near = find_near_duplicates(table, settings, embeddings=embeddings)
    seconds = time.perf_counter() - started
    table[CLUSTER_COLUMN] = near.clusters
    sizes = table[CLUSTER_COLUMN].value_counts()
    out = {"images": len(table), "settings": label(settings.hash_distance,
                                                   settings.embedding_similarity if embeddings is not None else None),
           "pairs": len(near.pairs), "clusters": int((sizes > 1).sum()),
           "images_in_clusters": int(sizes[sizes > 1].sum()),
           "largest_cluster": int(sizes.max()), "label_conflicts": int(near.pairs["label_conflict"].sum()),
           "audit_seconds": round(seconds, 1), "splits": {}}
    hash_only = find_near_duplicates(table, dataclasses.replace(settings, embedding=None))
    stratified = assign_splits(table, "stratified", seed=SEED)
    out["hash_only"] = {"settings": label(settings.hash_distance, None), "pairs": len(hash_only.pairs),
                        "clusters": int(hash_only.pairs["cluster"].nunique()),
                        "stratified": hash_only.contamination(table.assign(split=stratified))}
    for name, options in {"stratified": {}, "grouped_by_near_duplicates": {"by": "near_duplicates"}}.items():
        protocol = "stratified" if name == "stratified" else "grouped"
        split = assign_splits(table, protocol, seed=SEED, **options)
        figures = near.contamination(table.assign(split=split))
        out["splits"][name] = {"sizes": {k: int(v) for k, v in split.value_counts().items()}, **figures,
                               "training": train_on(table, split)}
    return out


def train_on(table: pd.DataFrame, split: pd.Series) -> dict:
    """transfer_gain's frozen-ImageNet arm on this split's train and val images."""
    from benchmarks.transfer_gain import ARMS, train_arm
    from trainables.data import decode_images

    classes = sorted(table["label"].unique())
    data = {}
    for name in ("train", "val"):
        rows = table[split == name]
        data[f"x_{name}"] = decode_images(rows["path"].tolist(), TRAIN_IMAGE_SIZE)
        data[f"y_{name}"] = rows["label"].map(classes.index).to_numpy()
    result = train_arm(ARMS["pretrained_frozen"], data, classes, TRAIN_EPOCHS, TRAIN_BATCH, SEED)
    return {"image_size": TRAIN_IMAGE_SIZE, "epochs": TRAIN_EPOCHS, "hyperparameters": result["hyperparameters"],
            "best_val_balanced_accuracy": round(result["best"]["balanced_accuracy"], 4),
            "best_val_auc": round(result["best"]["auc"], 4),
            "final_val_balanced_accuracy": round(result["final"]["balanced_accuracy"], 4),
            "train_seconds": result["train_seconds"]}


# --- Report -------------------------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - started, 1)


def markdown(results: dict) -> str:
    lines = ["# Near-duplicate finder on real data", "",
             f"Defaults: pHash (imagehash, 256 bits, 4 flips) <= {Settings().hash_distance} bits; "
             f"embedding (on by default) `{EMBEDDING}` at {Settings().embedding_size} px, cosine >= "
             f"{Settings().embedding_similarity}. Produced by `benchmarks/near_duplicates.py`.", ""]
    if "timing" in results:
        lines += ["## Cost (HAM10000, 10,015 images, this machine)", "",
                  *[f"- {k.replace('_', ' ')}: {v} s" for k, v in results["timing"].items()], ""]
    if "ham" in results:
        h = results["ham"]
        lines += ["## HAM10000: pairs against `lesion_id`", "",
                  f"{h['images']} images, {h['lesions']} lesions, {h['same_lesion_pairs']} same-lesion pairs.", "",
                  "| thresholds | pairs | same lesion | precision | recall |", "|---|---|---|---|---|"]
        lines += [f"| {r['thresholds']} | {r['pairs']} | {r['same_lesion_pairs_found']} | {r['precision']} | "
                  f"{r['recall']} |" for r in h["sweep"]]
        lines.append("")
    if "planted" in results:
        p = results["planted"]
        lines += ["## Planted near-duplicates", "",
                  f"{p['copies']} copies of {p['originals_copied']} HAM10000 images in a pool of {p['pool']}.", "",
                  "| thresholds | recall | " + " | ".join(TRANSFORMS) + " | false-pair rate | false pairs |",
                  "|---|---|" + "---|" * len(TRANSFORMS) + "---|---|"]
        lines += [f"| {r['thresholds']} | {r['recall']} | "
                  + " | ".join(str(r["recall_by_transform"][t]) for t in TRANSFORMS)
                  + f" | {r['false_pair_rate']} | {r['false_pairs']} |" for r in p["sweep"]]
        lines.append("")
    if "melanoma" in results:
        m = results["melanoma"]
        lines += ["## melanoma10k `train/`", "",
                  f"{m['images']} images; {m['settings']}: {m['pairs']} pairs in {m['clusters']} clusters "
                  f"({m['images_in_clusters']} images, largest {m['largest_cluster']}), {m['label_conflicts']} "
                  f"label conflicts; audit {m['audit_seconds']} s.", "",
                  f"Hash alone ({m['hash_only']['settings']}): {m['hash_only']['pairs']} pairs in "
                  f"{m['hash_only']['clusters']} clusters; in the stratified split "
                  f"{m['hash_only']['stratified']['val_share_with_train_near_duplicate']:.1%} of val and "
                  f"{m['hash_only']['stratified']['test_share_with_train_near_duplicate']:.1%} of test images "
                  "have a train near-duplicate.", "",
                  "| split | val with a train near-duplicate | test with one | cross-split pairs | "
                  "best val balanced accuracy | best val AUC |", "|---|---|---|---|---|---|"]
        for name, s in m["splits"].items():
            lines.append(f"| {name} | {s['val_with_train_near_duplicate']}/{s['val_images']} "
                         f"({s['val_share_with_train_near_duplicate']:.1%}) | {s['test_with_train_near_duplicate']}/"
                         f"{s['test_images']} ({s['test_share_with_train_near_duplicate']:.1%}) | "
                         f"{s['cross_split_pairs']} | {s['training']['best_val_balanced_accuracy']} | "
                         f"{s['training']['best_val_auc']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--shared", default="../shared/datasets", help="folder holding ham10000/ and melanoma10k/")
    parser.add_argument("--parts", nargs="+", default=["ham", "planted", "melanoma"],
                        choices=["ham", "planted", "melanoma"])
    parser.add_argument("--no-embedding", action="store_true", help="measure the hash alone")
    parser.add_argument("--work", default=None, help="folder for the planted copies (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/near_duplicates")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "near_duplicates.json"
    results = json.loads(record.read_text()) if record.exists() else {}  # parts not re-run keep their figures
    settings = Settings(embedding=None if args.no_embedding else EMBEDDING)

    ham = load_table("ham10000", shared / "ham10000") if {"ham", "planted"} & set(args.parts) else None
    if ham is not None:
        with tempfile.TemporaryDirectory() as cold:  # a cold cache, so the hashing is timed, not read back
            os.environ["MEDSEARCH_CACHE"], before = cold, os.environ.get("MEDSEARCH_CACHE")
            hashes, hash_s = timed(image_hashes, ham["path"])
            _, pairs_s = timed(hash_pairs, hashes, Settings().hash_distance)
            embeddings, embed_s = (None, None) if args.no_embedding else timed(
                image_embeddings, ham["path"], EMBEDDING, size=settings.embedding_size)
            os.environ.pop("MEDSEARCH_CACHE") if before is None else os.environ.update(MEDSEARCH_CACHE=before)
        results["timing"] = {"hashing_10015_images_cold_s": hash_s, "hash_pair_search_s": pairs_s,
                             "embedding_forward_pass_s": embed_s}
        print(f"HAM10000: hashes {hash_s} s, pair search {pairs_s} s, embeddings {embed_s} s", flush=True)
    if "ham" in args.parts:
        results["ham"] = measure_ham(ham, hashes, embeddings)
    if "planted" in args.parts:
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            copies = plant_copies(ham, Path(work) / "planted", PLANTED_ORIGINALS, SEED)
            copy_hashes = image_hashes(copies["path"])
            copy_embeddings = None if args.no_embedding else image_embeddings(copies["path"], EMBEDDING,
                                                                              size=settings.embedding_size)
            results["planted"] = measure_planted(
                ham, copies, np.concatenate([hashes, copy_hashes]),
                None if args.no_embedding else np.concatenate([embeddings, copy_embeddings]))
    if "melanoma" in args.parts:
        table = load_table("melanoma", shared / "melanoma10k")
        embeddings = None if args.no_embedding else image_embeddings(table["path"], EMBEDDING,
                                                                     size=settings.embedding_size)
        results["melanoma"] = measure_melanoma(str(shared / "melanoma10k"), settings, embeddings)
    record.write_text(json.dumps(results, indent=2, default=str))
    (out / "near_duplicates.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
