"""S5 on a CPU: the HAM10000 7-class study sized to finish in about 45 minutes on 2 CPU cores, with offline weights.

    python -m search.run spaces/ham10000_cpu.py --data-dir ../shared/datasets/ham10000

Data: HAM10000 (10,015 dermoscopy images of 7,470 lesions, CC BY-NC-SA 4.0), the
Kaggle "skin-cancer-mnist-ham10000" layout, from
https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000
or the Harvard Dataverse, https://doi.org/10.7910/DVN/DBW86T

Split: protocol S5 exactly as spaces/ham10000.py: stratified 80/20 by image,
8,012 train / 2,003 val, no test set. Lesions leak across it (several images
per lesion), so its validation numbers, like the study's, are optimistic; the
leak-free twin is spaces/ham10000_grouped_cpu.py (grouped by lesion_id, with a
test split), the number to stand behind.

What changes from spaces/ham10000.py, and why:
- backbones with ImageNet weights shipped by pip (efficientnet_lite0, lite1),
  so it runs on an air-gapped machine; EfficientNetB1 (the study's), B0 and
  DenseNet121 need their Keras files;
- 128 px instead of 224 px: 10,015 images through a frozen backbone cost about
  a third of the 224 px pass, and the activation cache computes them once;
- unfreeze depths the activation cache serves (0, 21, 41: docs/activation-cache.md;
  the study's 30 is not a clean cut of EfficientNet-Lite), so fine-tuned
  trials train their top layers on cached features;
- no augmentation (the study used flips, rotation, zoom, brightness, contrast):
  a cached bank of K augmented views costs K passes of the frozen part over
  8,012 images per backbone and cut, a third of this budget for K = 3;
- batch 32 and one warm-up length (2 epochs) instead of searched: fewer
  dimensions for the ~15 trials the budget holds;
- budget: 16 trials, up to 10 epochs (ASHA rungs at 2 and 6), 30 minutes of
  search, two trials at a time on one core each.
Kept from the study: balanced class weights, and phase 1 (head on the frozen
backbone) then phase 2 (top layers at a low rate) as a point of the space.
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical("backbone", ["efficientnet_lite0", "efficientnet_lite1"])  # S5: b1
    unfreeze = trial.suggest_categorical("unfreeze", [0, 21, 41])  # S5: 30
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),  # S5: not given
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),  # S5: not given
        "head_units": trial.suggest_categorical("head_units", [0, 256]),  # S5: 0
    }
    if unfreeze:
        hp["warmup_epochs"] = 2  # S5: phase 1, length not given
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 3e-5, 1e-3, log=True)  # S5: "very low"
    return hp


STUDY = Study(
    name="ham10000_cpu",
    description="S5 on 2 CPU cores: HAM10000, 7 diagnoses, image-level 80/20 split; EfficientNet-Lite on cached features",
    dataset=Dataset(loader="ham10000", image_size=128, split="S5"),
    space=space,
    fixed={"weights": "imagenet", "augment": "none", "batch_size": 32, "class_weight": True},
    metric="val_balanced_accuracy",
    num_samples=16,
    max_epochs=10,
    grace_period=2,
    reduction_factor=3,
    max_concurrent=2,
    cpus_per_trial=1,
    gpus_per_trial=0,
    time_limit_s=30 * 60,
    seed=0,
)
