"""S3: a small CNN and five transfer-learning models on chest X-rays, COVID vs Normal vs Viral Pneumonia.

    python -m search.run spaces/covid_radiography.py --data-dir /path/to/COVID-19_Radiography_Dataset

Data: the COVID-19 Radiography Database (Chowdhury et al. 2020; Rahman et al. 2021), from
https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database
Only its three original classes are used, as in the study (Lung_Opacity is left out).

Split: protocol S3, as the study did it: 1,344 images per class sampled with
random_state 1987, then stratified 68/16/16 with the same state (2,741 / 645 / 646).

The study's best row (MobileNetV2 frozen + augmentation, test accuracy 0.8994)
is one point of this space: frozen MobileNetV2 + GAP + Dense(128) + Dropout(0.5),
Adam 1e-4, batch 16, 5 epochs (epoch 5 of the trial), augmented. Its other rows
(baseline CNN at 1e-3; ResNet50, VGG16, DenseNet121 frozen at 1e-4; ResNet50 with
its last 10 layers fine-tuned at 1e-5) are points too. The study's label handling
was faulty and its accuracies look degenerate, so it is a weak anchor; the
database authors report 97.9% 3-class accuracy.
"""

from search import Dataset, Study

# Unfreeze depths in backbone layers (base.layers[-k:]); 0 = frozen, the study's choice except for
# ResNet50, whose last 10 layers it fine-tuned. VGG16 has only 20 layers: 4 is block 5, 8 blocks 4-5.
UNFREEZE = {
    "mobilenet_v2": [0, 30, 60],
    "resnet50": [0, 10, 40],
    "vgg16": [0, 4, 8],
    "densenet121": [0, 30, 60],
}


def space(trial):
    # Paper: all five of these.
    backbone = trial.suggest_categorical("backbone", ["mobilenet_v2", "resnet50", "vgg16", "densenet121", "cnn_s3"])
    if backbone == "cnn_s3":
        # The study's baseline CNN, from scratch: Conv32-Pool-Conv64-Pool, Flatten, Dense(128), Dropout(0.5).
        return {
            "backbone": backbone,
            "weights": None,
            "unfreeze": "all",
            "pooling": "flatten",
            "head_units": 128,
            "learning_rate": trial.suggest_float("cnn_learning_rate", 1e-4, 1e-2, log=True),  # paper: 1e-3
            "dropout": trial.suggest_float("cnn_dropout", 0.2, 0.6),  # paper: 0.5
        }
    unfreeze = trial.suggest_categorical(f"unfreeze_{backbone}", UNFREEZE[backbone])  # best row: 0
    hp = {
        "backbone": backbone,
        "weights": "imagenet",
        "unfreeze": unfreeze,
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),  # paper: 1e-4
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),  # paper: 0.5
        "head_units": trial.suggest_categorical("head_units", [0, 128, 256]),  # paper: Dense(128, relu)
        # Paper's best: rotation 15 deg, shift 0.1, h-flip, zoom 0.1. No policy matches it; "heavy" holds
        # each of those transforms (larger: full rotations, zoom 0.2) plus v-flip and brightness/contrast.
        "augment": trial.suggest_categorical("augment", ["none", "light", "heavy"]),
    }
    if unfreeze:
        # The study fine-tuned ResNet50 after its frozen run: 5 head epochs, then 5 at 1e-5.
        hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", [1, 2, 5])  # paper: 5
        hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", 1e-6, 1e-4, log=True)  # paper: 1e-5
    return hp


STUDY = Study(
    name="covid_radiography",
    description="S3: COVID-19 Radiography, 3 classes; baseline CNN vs frozen / fine-tuned ImageNet backbones at 128 px",
    # 128 px as the study (it loaded at 192 px and resized; we decode straight to 128). No positive
    # class: three classes, so AUC is macro one-vs-rest.
    dataset=Dataset(loader="covid", image_size=128, split="S3",
                    options={"classes": ["COVID", "Normal", "Viral Pneumonia"]}),
    space=space,
    fixed={"batch_size": 16},  # the study's batch
    metric="val_balanced_accuracy",  # the study's val set is balanced, so this equals its accuracy
    # Budget for one GPU. 2,741 training images at 128 px: an epoch takes seconds. 10 epochs hold the
    # study's 5 (read at epoch 5) and its 5 + 5 fine-tuning run; 60 trials over five models.
    num_samples=60,
    max_epochs=10,
    grace_period=2,
    reduction_factor=2,
    # Small images and models: four trials to a GPU, two CPU cores each.
    max_concurrent=4,
    cpus_per_trial=2,
    gpus_per_trial=0.25,
    seed=0,
)
