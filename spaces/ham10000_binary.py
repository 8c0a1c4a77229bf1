"""S2: custom CNN vs VGG16 vs MobileNetV2 on a balanced HAM10000 subsample, benign vs malignant.

    python -m search.run spaces/ham10000_binary.py --data-dir /path/to/ham10000

Data: HAM10000 (10,015 dermoscopy images, CC BY-NC-SA 4.0), the Kaggle
"skin-cancer-mnist-ham10000" layout, from
https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000
or the Harvard Dataverse, https://doi.org/10.7910/DVN/DBW86T
Labels are binary, as in the study: malignant = mel, bcc, akiec; benign = nv, bkl, df, vasc.

Split: protocol S2, the study's sizes: 600 images per class drawn, 120 / 120
to test, 72 / 72 to val, 408 / 408 to train; the other 8,815 images are unused.
Like the study, it splits images, not lesions, so some lesions leak across splits.

The study's best row (VGG16, test accuracy 0.87) is one point of this space:
frozen VGG16 + GAP + Dense(256) + Dropout(0.5), Adam 1e-3, batch 32, balanced
class weights, up to 20 epochs. Its custom CNN (0.84) and frozen MobileNetV2
(0.82) rows are points too.
"""

from search import Dataset, Study

# Unfreeze depths in backbone layers (base.layers[-k:]); 0 = frozen, the study's choice for both.
# VGG16 has only 20 layers: 4 is block 5, 8 is blocks 4-5.
UNFREEZE = {"vgg16": [0, 4, 8], "mobilenet_v2": [0, 30, 60], "efficientnet_b0": [0, 30, 60]}


def space(trial):
    # Paper: the three models below; efficientnet_b0 asks whether a newer backbone beats them.
    backbone = trial.suggest_categorical("backbone", ["vgg16", "mobilenet_v2", "cnn_s2", "efficientnet_b0"])
    if backbone == "cnn_s2":
        # The study's custom CNN, from scratch. Its head flattens (no pooling), then Dense(256) and
        # Dropout(0.5); Adam 1e-3. The convolutional blocks' own dropouts (0.3, 0.4) are built in.
        return {
            "backbone": backbone,
            "weights": None,
            "unfreeze": "all",
            "pooling": "flatten",
            "head_units": 256,
            "learning_rate": trial.suggest_float("cnn_learning_rate", 1e-4, 1e-2, log=True),  # paper: 1e-3
            "dropout": trial.suggest_float("cnn_dropout", 0.2, 0.6),  # paper: 0.5
        }
    unfreeze = trial.suggest_categorical(f"unfreeze_{backbone}", UNFREEZE[backbone])
    hp = {
        "backbone": backbone,
        "weights": "imagenet",
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),  # paper: 1e-3
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),  # paper: 0.5
        "head_units": trial.suggest_categorical("head_units", [0, 128, 256]),  # paper: Dense(256, relu)
        # The study did not augment; with 816 training images augmentation may matter most here.
        "augment": trial.suggest_categorical("augment", ["none", "light", "heavy"]),
    }
    if unfreeze:
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [2, 5])  # head first, then unfreeze
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-6, 1e-4, log=True)
    return hp


STUDY = Study(
    name="ham10000_binary",
    description="S2: HAM10000 balanced 1,200-image subsample, benign vs malignant; custom CNN, VGG16, MobileNetV2",
    # target="binary" maps the 7 diagnoses to benign / malignant, as the study; 224 px as the study.
    dataset=Dataset(loader="ham10000", image_size=224, positive_class="malignant", split="S2",
                    options={"target": "binary"}),
    space=space,
    # The study's batch and balanced class weights (near 1 on this balanced subsample, kept for fidelity).
    fixed={"batch_size": 32, "class_weight": True},
    metric="val_balanced_accuracy",
    # Budget for one GPU. 816 training images make an epoch take seconds, so trials are cheap:
    # 60 of them, each up to the study's 20 epochs.
    num_samples=60,
    max_epochs=20,
    # The study stopped after 3 epochs without improvement; ASHA's first rung at epoch 3 is as patient.
    grace_period=3,
    reduction_factor=2,
    # VGG16 at 224 px with batch 32 fits four to a GPU; two CPU cores each.
    max_concurrent=4,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
    seed=0,
)
