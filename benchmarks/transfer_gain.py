"""Does ImageNet pre-training pay on real dermoscopy? Pretrained vs scratch, side by side.

    python benchmarks/transfer_gain.py --data-dir ../shared/datasets/melanoma10k

Trains the same ``efficientnet_lite0`` classifier twice on one seeded,
class-balanced subset of a benign/malignant dataset: (a) ImageNet weights,
frozen, only the head trained; (b) the same model from scratch, all layers
trained. Same images, epochs, batch size and seed. Reports validation balanced
accuracy and AUC for both and writes them to ``--out`` as JSON.
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

# A CPU-sized budget: small images, a few thousand of them, a few epochs.
IMAGE_SIZE = 96
TRAIN_PER_CLASS = 1000
VAL_PER_CLASS = 250
EPOCHS = 5
BATCH_SIZE = 32
SEED = 0

ARMS = {
    "pretrained_frozen": {"weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-3},
    "scratch": {"weights": None, "unfreeze": "all", "learning_rate": 1e-3},
}


def load_subset(data_dir: str, image_size: int, train_per_class: int, val_per_class: int, seed: int):
    import numpy as np

    from trainables.data import decode_images
    from trainables.datasets import load_table

    table = load_table("melanoma", data_dir)
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": []}
    for _, group in table.groupby("label", sort=True):
        picked = group.index.to_numpy()[rng.permutation(len(group))[: train_per_class + val_per_class]]
        rows["train"] += list(picked[:train_per_class])
        rows["val"] += list(picked[train_per_class:])
    classes = sorted(table["label"].unique())
    out = {}
    for split, index in rows.items():
        part = table.loc[index]
        out[f"x_{split}"] = decode_images(part["path"].tolist(), image_size)
        out[f"y_{split}"] = part["label"].map(classes.index).to_numpy()
    return out, classes


def train_arm(arm: dict, data: dict, classes: list[str], epochs: int, batch_size: int, seed: int) -> dict:
    import keras

    from trainables.hparams import DEFAULTS
    from trainables.metrics import classification_metrics
    from trainables.model import apply_unfreeze, build_model

    keras.utils.set_random_seed(seed)
    hp = {**DEFAULTS, "backbone": "efficientnet_lite0", "dropout": 0.2, **arm}
    model, backbone = build_model(hp, input_shape=data["x_train"].shape[1:], num_classes=len(classes), seed=seed)
    apply_unfreeze(backbone, hp["unfreeze"], pretrained=hp["weights"] is not None)
    model.compile(optimizer=keras.optimizers.Adam(hp["learning_rate"]), loss="sparse_categorical_crossentropy")
    started = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.fit(data["x_train"], data["y_train"], batch_size=batch_size, epochs=1, verbose=0)
        probs = model.predict(data["x_val"], batch_size=128, verbose=0)
        metrics = classification_metrics(data["y_val"], probs, classes, positive=classes.index("malignant"))
        history.append({"epoch": epoch + 1, **metrics})
        print(f"  {epoch + 1}/{epochs}  val balanced accuracy {metrics['balanced_accuracy']:.3f}  "
              f"AUC {metrics['auc']:.3f}", flush=True)
    best = max(history, key=lambda h: h["balanced_accuracy"])
    return {"hyperparameters": arm, "best": best, "final": history[-1], "history": history,
            "train_seconds": round(time.perf_counter() - started, 1),
            "trainable_params": int(sum(w.numpy().size for w in model.trainable_weights))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", required=True, help="a melanoma dataset folder (train/ and test/)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", default="benchmarks/results/transfer_gain.json")
    args = parser.parse_args(argv)

    data, classes = load_subset(args.data_dir, args.image_size, args.train_per_class, args.val_per_class, SEED)
    print(f"{len(data['y_train'])} train / {len(data['y_val'])} val images at {args.image_size} px, classes {classes}")
    results = {}
    for name, arm in ARMS.items():
        print(f"{name}:", flush=True)
        results[name] = train_arm(arm, data, classes, args.epochs, BATCH_SIZE, SEED)
    gain = results["pretrained_frozen"]["best"]["balanced_accuracy"] - results["scratch"]["best"]["balanced_accuracy"]
    summary = {
        "dataset": str(Path(args.data_dir).resolve().name),
        "image_size": args.image_size, "train_images": int(len(data["y_train"])), "val_images": int(len(data["y_val"])),
        "epochs": args.epochs, "batch_size": BATCH_SIZE, "seed": SEED, "chance_balanced_accuracy": 1 / len(classes),
        "arms": results, "balanced_accuracy_gain": round(gain, 4),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    for name, result in results.items():
        print(f"{name:>18}: best val balanced accuracy {result['best']['balanced_accuracy']:.3f} "
              f"(AUC {result['best']['auc']:.3f}), {result['train_seconds']} s")
    print(f"gain from ImageNet weights: {gain:+.3f} balanced accuracy; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
