"""S4: MobileNetV2 fine-tuning on histopathology images, benign vs malignant.

    python -m search.run spaces/histopathology.py --data-dir /path/to/histopathology

Data: the study used a small custom set in two class folders. Any set in that
layout works (loader "folder"):

    ROOT/benign/*.png|jpg   ROOT/malignant/*.png|jpg   ROOT/prediction/ (optional, unlabelled, ignored)

A public one is BreakHis (7,909 microscopy images of breast tumours at 40-400x;
Spanhol et al. 2016), from
https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/
It nests images by tumour type, patient and magnification; link them into the
two folders first (the file names are unique):

    for c in benign malignant; do mkdir -p ROOT/$c
      find "$PWD/BreaKHis_v1/histology_slides/breast/$c" -name '*.png' -exec ln -s {} ROOT/$c/ \\; ; done

BreakHis has several images per patient and this split is image-level, so patients leak across it.

Split: protocol S4, as the study did it: stratified 80/20 train / val, no test set
(the study's 50 images gave 40 / 10).

The study's configuration is one point of this space: MobileNetV2 with its last
30 layers unfrozen from the start, GAP -> Dropout(0.4) -> Dense head, Adam 1e-5,
batch 8, augmented (rotation 20, zoom 0.2, h-flip, shear). It reports validation
accuracy 0.80 on its 10 validation images. Two of its details have no
hyperparameter here: a BatchNorm layer in the head and ReduceLROnPlateau.
"""

from search import Dataset, Study


def space(trial):
    # Paper: mobilenet_v2. Two backbones of the same mobile class ask whether a newer one beats it.
    backbone = trial.suggest_categorical("backbone", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_b0"])
    # Top k backbone layers, counted like the study's base.layers[-k:]. Paper: 30.
    unfreeze = trial.suggest_categorical("unfreeze", [0, 30, 60])
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        # One rate for head and unfrozen layers while warmup_epochs is 0, as in the study (1e-5);
        # the range reaches up to rates that suit a frozen backbone's head.
        "learning_rate": trial.suggest_float("learning_rate", 3e-6, 3e-3, log=True),  # paper: 1e-5
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),  # paper: 0.4
        "head_units": trial.suggest_categorical("head_units", [0, 128]),  # paper: 0, no hidden layer
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32]),  # paper: 8
        # Paper: rotation 20, zoom 0.2, h-flip, shear. "heavy" is the nearest: full rotations and flips
        # (slides have no orientation), zoom 0.2, shifts, brightness/contrast; no shear.
        "augment": trial.suggest_categorical("augment", ["none", "light", "heavy"]),
        # BreakHis is about 1:2 benign:malignant; the study did not weight classes.
        "class_weight": trial.suggest_categorical("class_weight", [False, True]),
    }
    if unfreeze:
        # The study trained the head and the top 30 layers together from epoch 0: warm-up 0.
        warmup = trial.suggest_categorical("warmup_epochs", [0, 2, 5])  # paper: 0
        hp["warmup_epochs"] = warmup
        if warmup:
            hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-6, 1e-4, log=True)
    return hp


STUDY = Study(
    name="histopathology",
    description="S4: histopathology folders, benign vs malignant; MobileNetV2 with its top layers fine-tuned",
    # Two class folders in a fixed order; 224 px as the study.
    dataset=Dataset(loader="folder", image_size=224, classes=["benign", "malignant"],
                    positive_class="malignant", split="S4"),
    space=space,
    fixed={"weights": "imagenet"},  # every backbone here starts from ImageNet, as the study's
    metric="val_balanced_accuracy",
    # Budget for one GPU. The study stopped on val accuracy with patience 5 and gave no epoch cap;
    # 30 epochs leave room for its small learning rate. A set of the study's size trains in
    # seconds per epoch.
    num_samples=40,
    max_epochs=30,
    grace_period=5,  # the study's patience
    reduction_factor=2,
    # Four MobileNet-class trials at 224 px share one GPU; two CPU cores each.
    max_concurrent=4,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
    seed=0,
)
