"""Quickstart: a real search on the embedded synthetic dermoscopy dataset.

    python -m search.run spaces/quickstart.py

No download: the dataset is generated on first use (benign vs malignant
"lesions" drawn by the ABCD rule). Sized to finish in about 10 minutes on a
2-core CPU.
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical("backbone", ["cnn_s2", "mobilenet_v2"])
    return {
        "backbone": backbone,
        "pooling": "flatten" if backbone == "cnn_s2" else "avg",
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "head_units": trial.suggest_categorical("head_units", [0, 64]),
        "augment": trial.suggest_categorical("augment", ["none", "light"]),
        "class_weight": trial.suggest_categorical("class_weight", [False, True]),
    }


STUDY = Study(
    name="quickstart",
    description="ABCD-rule synthetic lesions, benign vs malignant, searched from scratch",
    dataset=Dataset(loader="embedded", image_size=64, positive_class="malignant"),
    space=space,
    fixed={"batch_size": 32, "weights": None, "unfreeze": "all"},
    metric="val_balanced_accuracy",
    num_samples=10,
    max_epochs=8,
    grace_period=2,
    reduction_factor=2,
    max_concurrent=2,
    cpus_per_trial=1,
)
