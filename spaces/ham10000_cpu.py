"""S5 at full strength on a CPU: HAM10000, 7 diagnoses, S5's own split; about 1 h 50 min on 2 CPU cores.

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

What a demanding practitioner searches on 2 cores (issue 28), and what differs
from spaces/ham10000.py:
- efficientnet_lite0 / lite1 / lite2 with ImageNet weights shipped by pip (runs
  air-gapped); EfficientNetB1 (the study's) needs its Keras file;
- 224 px, as the study (lite2's native 260 px costs 1.9x per image here:
  40.7 against 21.9 ms on one core);
- unfreeze depths the activation cache serves (0, 21, 41: docs/activation-cache.md;
  the study's 30 is not a clean cut of EfficientNet-Lite), after a searched
  head warm-up (phase 1, then phase 2 at a low rate, as the study);
- augmentation none or heavy (the study: flips, rotation, zoom, brightness,
  contrast) through a cached bank of 2 augmented views per training image: each
  view costs one frozen pass over 8,012 images per backbone and cut (~3 min);
- balanced class weights searched (the study used them), heads with and
  without a hidden layer;
- budget: trials until 85 minutes of search are spent, up to 15 epochs each
  (ASHA rungs at 2, 6), two trials at a time on one core each.
Label smoothing is not a hyperparameter of our trainable yet, so it is not searched.

Evaluation, declared before it runs (benchmarks/paper_tables.py, row S5):
analysis.evaluate --ensemble auto --tta auto on val, which is also where every
choice was made (as S5 reported it).
"""

from search import Dataset, Study


def space(trial):
    backbone = trial.suggest_categorical(
        "backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])  # S5: b1
    unfreeze = trial.suggest_categorical("unfreeze", [0, 21, 41])  # S5: 30
    hp = {
        "backbone": backbone,
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),  # S5: not given
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),  # S5: not given
        "head_units": trial.suggest_categorical("head_units", [0, 256]),  # S5: 0
        "augment": trial.suggest_categorical("augment", ["none", "heavy"]),  # S5: flips, rotation, zoom, ...
        "class_weight": trial.suggest_categorical("class_weight", [True, False]),  # S5: balanced
    }
    if unfreeze:
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [2, 4])  # S5: phase 1, length not given
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 3e-5, 1e-3, log=True)  # S5: "very low"
    return hp


STUDY = Study(
    name="ham10000_cpu",
    description="S5 at full strength on 2 CPU cores: HAM10000, 7 diagnoses, image-level 80/20 split; "
                "EfficientNet-Lite 0/1/2 at 224 px on cached features and cached augmented views",
    dataset=Dataset(loader="ham10000", image_size=224, split="S5"),
    space=space,
    fixed={"weights": "imagenet", "batch_size": 32},
    metric="val_balanced_accuracy",
    num_samples=None,  # until the time limit is spent
    max_epochs=15,
    grace_period=2,
    reduction_factor=3,
    max_concurrent=2,
    cpus_per_trial=1,
    gpus_per_trial=0,
    time_limit_s=85 * 60,
    augment_views=2,
    seed=0,
)
