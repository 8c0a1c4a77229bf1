"""S2, the other reading, on a CPU: S2's protocol on a 1,200-image subsample of melanoma10k `train/`.

    python -m search.run spaces/melanoma_s2_cpu.py --data-dir ../shared/datasets/melanoma10k

The S2 paper is ambiguous about its data: its abstract names the Kaggle "Melanoma
Skin Cancer Dataset of 10000 images", reduced to 1,200; its data section
describes HAM10000. spaces/ham10000_binary_cpu.py runs the HAM10000 reading;
this file runs the abstract's: melanoma10k `train/` (5,000 benign / 4,605
malignant; its official test/ is not used), the same S2 protocol (600 images
per class drawn, 120 / 120 to test, 72 / 72 to val, 408 / 408 to train; the
other 8,405 images unused), and everything else as ham10000_binary_cpu.py: the
space, 224 px, cached augmented views, selection by 5-fold cross-validation on
train + val. One change: the budget is time, not a trial count (issue 28): trials
run until 40 minutes of search are spent.

Evaluation, declared before the test split is read (benchmarks/paper_tables.py,
row S2-melanoma): analysis.evaluate --ensemble auto, the final model chosen on
out-of-fold validation predictions; accuracy at the argmax on the 240 test images.
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical(
        "backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])  # S2: vgg16 (best)
    unfreeze = trial.suggest_categorical("unfreeze", [0, 21, 41])  # S2: 0 (frozen)
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),  # S2: 1e-3
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),  # S2: 0.5
        "head_units": trial.suggest_categorical("head_units", [0, 128, 256]),  # S2: 256
        "augment": trial.suggest_categorical("augment", ["none", "heavy"]),  # S2: none
    }
    if unfreeze:
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [2, 4])
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-5, 1e-3, log=True)
    return hp


STUDY = Study(
    name="melanoma_s2_cpu",
    description="S2's protocol on melanoma10k (the abstract's reading): a balanced 1,200-image subsample, "
                "benign vs malignant; EfficientNet-Lite on cached features",
    dataset=Dataset(loader="melanoma", image_size=224, positive_class="malignant", split="S2"),
    space=space,
    fixed={"weights": "imagenet", "batch_size": 32, "class_weight": True},
    metric="val_balanced_accuracy",
    num_samples=None,  # until the time limit is spent
    max_epochs=15,
    grace_period=3,
    reduction_factor=2,
    max_concurrent=2,
    cpus_per_trial=1,
    gpus_per_trial=0,
    time_limit_s=40 * 60,
    cv_folds=5,
    augment_views=4,
    seed=0,
)
