"""S5's leak-free twin on a CPU: HAM10000, 7 classes, split by lesion with a test split; ~45 minutes on 2 CPU cores.

    python -m search.run spaces/ham10000_grouped_cpu.py --data-dir ../shared/datasets/ham10000

Data: HAM10000 (10,015 dermoscopy images of 7,470 lesions, CC BY-NC-SA 4.0), the
Kaggle "skin-cancer-mnist-ham10000" layout, from
https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000
or the Harvard Dataverse, https://doi.org/10.7910/DVN/DBW86T

Split: protocol "grouped" by lesion_id (the loader's group), 70/15/15 train /
val / test, stratified by class as far as whole lesions allow: no lesion has
images on both sides of a split, so neither validation nor test is inflated by
a second photograph of a training lesion. S5 itself split images 80/20 with no
test set (spaces/ham10000_cpu.py); this is the number we stand behind, and no
published S5 number shares its protocol (S5's 0.7189 is an image-level
validation accuracy).

Everything else is spaces/ham10000_cpu.py's, for the same reasons:
- efficientnet_lite0 / lite1 with ImageNet weights shipped by pip (offline);
  EfficientNetB1 (the study's) needs its Keras file;
- 128 px instead of 224 px; the activation cache computes the frozen part once;
- unfreeze depths the cache serves (0, 21, 41; the study's 30 is not a clean cut);
- no augmentation (a cached bank of K views costs K frozen passes over the
  ~7,000 training images per backbone and cut);
- batch 32, a 2-epoch warm-up (phase 1) before fine-tuning (phase 2);
- balanced class weights, as the study;
- budget: 16 trials, up to 10 epochs (ASHA rungs at 2 and 6), 30 minutes of
  search, two trials at a time on one core each.
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
    name="ham10000_grouped_cpu",
    description="S5 leak-free twin on 2 CPU cores: HAM10000, 7 diagnoses, split by lesion_id with a test split; "
                "EfficientNet-Lite on cached features",
    dataset=Dataset(loader="ham10000", image_size=128, split="grouped",
                    split_options={"by": "group", "val": 0.15, "test": 0.15}),
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
