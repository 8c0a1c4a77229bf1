"""S1 on a CPU: the melanoma study sized to finish in under an hour on 2 CPU cores, with offline weights.

    python -m search.run spaces/melanoma_cpu.py --data-dir ../shared/datasets/melanoma10k

Data: the Kaggle "Melanoma Skin Cancer Dataset of 10000 Images" (or S1's own
"Melanoma Cancer Dataset"), split by protocol S1 exactly as spaces/melanoma.py:
pooled, shuffled with seed 42, cut 70/15/15. With melanoma10k's train/ folder
alone (9,605 images) that is 6,723 / 1,441 / 1,441.

What changes from spaces/melanoma.py, and why:
- backbones with ImageNet weights shipped by pip (efficientnet_lite0, lite1),
  so it runs on an air-gapped machine; MobileNetV2 needs its Keras file;
- 128 px instead of 224 px: a frozen backbone's features at 128 px cost about a
  third of the forward pass, and the activation cache computes them once;
- unfreeze depths the activation cache serves (0, 21, 41: see
  docs/activation-cache.md), so even fine-tuned trials train on cached features;
- no augmentation: an augmented trial cannot reuse clean features, and on this
  data set the frozen-feature models are not overfitting in 12 epochs.
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical("backbone", ["efficientnet_lite0", "efficientnet_lite1"])
    unfreeze = trial.suggest_categorical("unfreeze", [0, 21, 41])  # S1: 30 (MobileNetV2's layers)
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),  # S1: 1e-3
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),  # S1: 0.3
        "head_units": trial.suggest_categorical("head_units", [0, 128, 256]),  # S1: 128
        "batch_size": 32,
    }
    if unfreeze:
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [2, 4])  # S1: 10 of 20
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-5, 1e-3, log=True)  # S1: 1e-5
    return hp


STUDY = Study(
    name="melanoma_cpu",
    description="S1 on 2 CPU cores: melanoma dermoscopy, benign vs malignant; EfficientNet-Lite on cached features",
    dataset=Dataset(loader="melanoma", image_size=128, positive_class="malignant", split="S1"),
    space=space,
    fixed={"weights": "imagenet", "augment": "none"},
    metric="val_balanced_accuracy",
    num_samples=24,
    max_epochs=12,
    grace_period=3,
    reduction_factor=2,
    max_concurrent=2,
    cpus_per_trial=1,
    gpus_per_trial=0,
    time_limit_s=45 * 60,
    seed=0,
)
