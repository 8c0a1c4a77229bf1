"""S1: MobileNetV2 transfer learning on dermoscopy, benign vs malignant melanoma.

    python -m search.run spaces/melanoma.py --data-dir /path/to/melanoma-cancer-dataset

Data: the Kaggle "Melanoma Cancer Dataset" the study used (13,879 images,
train/ and test/ x Benign/Malignant), from
https://www.kaggle.com/datasets/bhaveshmittal/melanoma-cancer-dataset
The "Melanoma Skin Cancer Dataset of 10000 Images" has the same layout and works too:
https://www.kaggle.com/datasets/hasnainjaved/melanoma-skin-cancer-dataset-of-10000-images

Split: protocol S1, as the study did it: train/ and test/ pooled, shuffled with
seed 42 and cut 70/15/15 (9,715 / 2,081 / 2,083 of the 13,879 images). The search sees only
train and val; test is written to splits.parquet for the final comparison.

The study's best row (test accuracy 0.8891) is one point of this space:
frozen MobileNetV2 + Dense(128) + Dropout(0.3) head, 10 epochs of Adam 1e-3,
then the last 30 layers unfrozen for 10 more epochs at 1e-5, batch 16, no
augmentation. Its first row (frozen only, 0.8805) is the point with unfreeze=0.
"""

from search import Dataset, Study


def space(trial):
    # Paper: mobilenet_v2. Two backbones of the same mobile class ask whether a newer one beats it.
    backbone = trial.suggest_categorical("backbone", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_b0"])
    # Top k backbone layers, counted like the study's base.layers[-k:]. Paper: 30 (0 = its frozen row).
    unfreeze = trial.suggest_categorical("unfreeze", [0, 30, 60])
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),  # paper: 1e-3
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),  # paper: 0.3
        "head_units": trial.suggest_categorical("head_units", [0, 128, 256]),  # paper: Dense(128, relu)
        "batch_size": trial.suggest_categorical("batch_size", [16, 32]),  # paper: 16
        # Paper's best: none. Its augmented row (flips, rotation 0.5, zoom 0.2, translate 0.1) is
        # "heavy" minus brightness/contrast.
        "augment": trial.suggest_categorical("augment", ["none", "light", "heavy"]),
    }
    if unfreeze:
        # The study fine-tuned a model whose head had trained alone first: warm-up, then unfreeze.
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [2, 5, 10])  # paper: 10
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-6, 1e-4, log=True)  # paper: 1e-5
    return hp


STUDY = Study(
    name="melanoma",
    description="S1: melanoma dermoscopy, benign vs malignant; MobileNetV2 two-phase fine-tuning and mobile peers",
    # 224 px and the S1 split, as the study. The classes are near balanced (6,289 / 5,590 in train),
    # so no class weights; balanced accuracy is still the metric, as on every study.
    dataset=Dataset(loader="melanoma", image_size=224, positive_class="malignant", split="S1"),
    space=space,
    fixed={"weights": "imagenet"},  # every backbone here starts from ImageNet, as the study's
    metric="val_balanced_accuracy",
    # Budget for one GPU. 20 epochs fit the paper's 10 frozen + 10 fine-tuned. ~40 trials cover
    # 3 backbones x 3 depths with room for TPE; on one modern GPU this is a few hours.
    num_samples=40,
    max_epochs=20,
    # ASHA rungs at epochs 4 and 12: a trial with the paper's 10-epoch warm-up is judged once while
    # still frozen (the study's frozen model scored 0.88, so it competes) and again after fine-tuning.
    grace_period=4,
    reduction_factor=3,
    # Four MobileNet-class trials at 224 px share one GPU comfortably (memory growth is on);
    # two CPU cores each keep the input pipeline fed.
    max_concurrent=4,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
    seed=0,
)
