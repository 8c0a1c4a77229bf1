"""Does the selection-corrected estimate cover what a small-set model scores on new images? (issue 28.4)

    python benchmarks/honest_coverage.py --data-dir ../shared/datasets/melanoma10k

Many small studies drawn from one real dataset, each with the rest of the set held
out as a large external test. Each study draws ``size`` images (class-balanced),
splits them 70/15/15 (seeded, stratified), trains ``CONFIGS`` heads on frozen
ImageNet features (``efficientnet_lite0``, pip weights, ``IMAGE_SIZE`` px: what
the search's cheap head-only trials train) with a range of L2 strengths and
class weights, and chooses the one with the best validation balanced accuracy,
as the search does. For the chosen head it records:

- the raw validation score with its 95% percentile bootstrap interval (what a
  leaderboard shows, interval added);
- the selection-corrected estimate and interval (``analysis.honest``, the code
  ``analysis.evaluate`` runs);
- the truth: its balanced accuracy on every image of the set not drawn (thousands).

and reports, per size, how often each interval covers the truth and the mean
error of each point estimate. Heads are scikit-learn logistic regressions (one
fit is milliseconds; a Keras head is the same model, trained slower), so a
hundred studies take minutes once the features are computed (cached in
``--cache``). Writes ``benchmarks/results/honest_coverage.json`` and prints the
table that ``docs/honest-estimate.md`` holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = (300, 600, 1200)  # images per small study
STUDIES = 50  # small studies per size
CONFIGS = 16  # heads per study, chosen among on validation
IMAGE_SIZE = 128
N_BOOT = 500
LEVEL = 0.95
SEED = 0


def features(data_dir: str, loader: str, cache: Path) -> tuple:
    """(features, labels, classes) of every image: global-average-pooled efficientnet_lite0 activations."""
    import numpy as np

    file = cache / f"features_{loader}_{IMAGE_SIZE}.npz"
    if file.is_file():
        saved = np.load(file, allow_pickle=False)
        return saved["x"], saved["y"], [str(c) for c in saved["classes"]]
    import keras

    from trainables.backbones import create_backbone
    from trainables.data import decode_images
    from trainables.datasets import load_table

    table = load_table(loader, data_dir)
    if loader == "ham10000":  # the literature's binary reading
        table = table.assign(label=table["label"].map(lambda d: "malignant" if d in ("mel", "bcc", "akiec") else "benign"))
    classes = sorted(table["label"].unique())
    started = time.perf_counter()
    backbone = create_backbone("efficientnet_lite0", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), weights="imagenet")
    pooled = keras.Sequential([backbone, keras.layers.GlobalAveragePooling2D()])
    x = []
    paths = table["path"].tolist()
    for start in range(0, len(paths), 1000):
        images = decode_images(paths[start:start + 1000], IMAGE_SIZE)
        x.append(pooled.predict(images, batch_size=64, verbose=0))
        print(f"  features: {start + len(images)}/{len(paths)} images, {time.perf_counter() - started:.0f} s", flush=True)
    x = np.concatenate(x).astype(np.float32)
    y = table["label"].map(classes.index).to_numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, x=x, y=y, classes=np.array(classes))
    return x, y, classes


def one_study(x, y, classes, size: int, rng) -> dict:
    """Draw, split, train ``CONFIGS`` heads, choose on validation; raw and corrected estimates and the truth."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from analysis.bootstrap import bootstrap_ci
    from analysis.honest import selection_corrected
    from trainables.metrics import classification_metrics

    drawn = np.concatenate([rng.choice(np.flatnonzero(y == c), size // len(classes), replace=False)
                            for c in range(len(classes))])
    rest = np.setdiff1d(np.arange(len(y)), drawn)
    seed = int(rng.integers(2**31))
    train, held = train_test_split(drawn, test_size=0.30, stratify=y[drawn], random_state=seed)
    val, _test = train_test_split(held, test_size=0.50, stratify=y[held], random_state=seed)
    scaler = StandardScaler().fit(x[train])
    xt, xv, xe = scaler.transform(x[train]), scaler.transform(x[val]), scaler.transform(x[rest])
    strengths = np.logspace(-4, 1, CONFIGS // 2)
    probs, external = {}, {}
    for c in strengths:
        for weight in (None, "balanced"):
            head = LogisticRegression(C=c, class_weight=weight, max_iter=300).fit(xt, y[train])
            name = f"C={c:.2g},{weight}"
            probs[name] = head.predict_proba(xv)
            external[name] = head.predict_proba(xe)
    score = {n: classification_metrics(y[val], p, classes)["balanced_accuracy"] for n, p in probs.items()}
    chosen = max(score, key=score.get)  # first of the best, as the search's ranking takes it
    truth = classification_metrics(y[rest], external[chosen], classes)["balanced_accuracy"]
    raw_ci = bootstrap_ci(y[val], probs[chosen], classes, n_boot=N_BOOT, seed=seed, level=LEVEL)["balanced_accuracy"]
    bbc = selection_corrected(probs, y[val], "balanced_accuracy", "max", classes, n_boot=N_BOOT, seed=seed, level=LEVEL)
    return {"size": size, "val": int(len(val)), "external": int(len(rest)), "chosen": chosen, "truth": truth,
            "raw": score[chosen], "raw_ci": list(raw_ci), "corrected": bbc["estimate"], "corrected_ci": bbc["ci"],
            "oob_ci": bbc["oob_ci"]}


def summarise(rows: list[dict]) -> list[dict]:
    import numpy as np

    out = []
    for size in sorted({r["size"] for r in rows}):
        rs = [r for r in rows if r["size"] == size]
        truth = np.array([r["truth"] for r in rs])

        def covers(key):
            return float(np.mean([r[key][0] <= r["truth"] <= r[key][1] for r in rs]))

        out.append({"size": size, "studies": len(rs), "val_images": rs[0]["val"], "mean_truth": float(truth.mean()),
                    "raw_bias": float(np.mean([r["raw"] for r in rs]) - truth.mean()),
                    "corrected_bias": float(np.mean([r["corrected"] for r in rs]) - truth.mean()),
                    "raw_coverage": covers("raw_ci"), "corrected_coverage": covers("corrected_ci"),
                    "oob_coverage": covers("oob_ci"),
                    "raw_mae": float(np.mean([abs(r["raw"] - r["truth"]) for r in rs])),
                    "corrected_mae": float(np.mean([abs(r["corrected"] - r["truth"]) for r in rs])),
                    "raw_width": float(np.mean([r["raw_ci"][1] - r["raw_ci"][0] for r in rs])),
                    "corrected_width": float(np.mean([r["corrected_ci"][1] - r["corrected_ci"][0] for r in rs])),
                    "oob_width": float(np.mean([r["oob_ci"][1] - r["oob_ci"][0] for r in rs]))})
    return out


def table(summary: list[dict], dataset: str) -> str:
    lines = [f"| data | images per study (val) | studies | external truth (mean) | raw validation: bias · mean "
             f"abs. error · {LEVEL:.0%} CI covers | selection-corrected: bias · mean abs. error · {LEVEL:.0%} CI "
             "covers | BBC out-of-bag CI covers | CI width raw · corrected · out-of-bag |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {dataset} | {s['size']} ({s['val_images']}) | {s['studies']} | {s['mean_truth']:.3f} | "
                     f"{s['raw_bias']:+.3f} · {s['raw_mae']:.3f} · {s['raw_coverage']:.0%} | "
                     f"{s['corrected_bias']:+.3f} · {s['corrected_mae']:.3f} · {s['corrected_coverage']:.0%} | "
                     f"{s['oob_coverage']:.0%} | {s['raw_width']:.3f} · {s['corrected_width']:.3f} · "
                     f"{s['oob_width']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", required=True, help="melanoma10k (its train/) or ham10000 (binary reading)")
    parser.add_argument("--loader", default="melanoma", choices=["melanoma", "ham10000"])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--studies", type=int, default=STUDIES)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "medsearch" / "honest_coverage"))
    parser.add_argument("--out", default="benchmarks/results/honest_coverage.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    x, y, classes = features(args.data_dir, args.loader, Path(args.cache))
    print(f"{len(y)} images, classes {classes}, features {x.shape[1]}", flush=True)
    rng = np.random.default_rng(SEED)
    rows = []
    for size in args.sizes:
        for i in range(args.studies):
            rows.append(one_study(x, y, classes, size, rng))
        print(f"  size {size}: {args.studies} studies, {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarise(rows)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {}
    record[args.loader] = {"command": "python benchmarks/honest_coverage.py --data-dir DIR --loader " + args.loader,
                           "image_size": IMAGE_SIZE, "configs": CONFIGS, "n_boot": N_BOOT, "level": LEVEL,
                           "seed": SEED, "seconds": round(time.perf_counter() - started, 1),
                           "summary": summary, "studies": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(table(summary, args.loader))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
