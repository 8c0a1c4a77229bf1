"""The reference-study files in spaces/: each loads, and each holds its paper's configuration.

No Ray, no data, no training. The published values live here, one small table
per study (S1-S5, from shared/paper-tables.md), so a space narrowed until a
paper's configuration falls out of it fails a test.
"""

import ast
import re
import warnings
from pathlib import Path

import optuna
import pytest

from search import load_study
from trainables.datasets import get_loader
from trainables.hparams import resolve_hparams
from trainables.train import phases

SPACES = Path(__file__).resolve().parents[2] / "spaces"
STUDY_FILES = sorted(p for p in SPACES.glob("*.py") if p.stem != "quickstart")

# What each study file must reproduce: the study's data, split protocol and image size.
# `epochs` is the longest schedule among the rows below; max_epochs must hold it.
STUDIES = {
    "melanoma": dict(tag="S1", loader="melanoma", image_size=224, positive_class="malignant", options={}, epochs=20),
    "ham10000_binary": dict(tag="S2", loader="ham10000", image_size=224, positive_class="malignant",
                            options={"target": "binary"}, epochs=20),
    "covid_radiography": dict(tag="S3", loader="covid", image_size=128, positive_class=None,
                              options={"classes": ["COVID", "Normal", "Viral Pneumonia"]}, epochs=10),
    "histopathology": dict(tag="S4", loader="folder", image_size=224, positive_class="malignant", options={},
                           epochs=10),
    "ham10000": dict(tag="S5", loader="ham10000", image_size=224, positive_class=None, options={}, epochs=20),
}

# The published rows. Each: study file, the Optuna parameters that pick the row (`params`), the
# hyperparameters a trial then trains with (`config`, fixed values and defaults included), the
# number of epochs, and the schedule that gives: (first epoch, end epoch, learning rate, unfreeze).
ROWS = [
    # S1: MobileNetV2, GAP -> Dense(128) -> Dropout(0.3), batch 16, no augmentation.
    pytest.param(
        "melanoma",
        {"backbone": "mobilenet_v2", "unfreeze": 30, "learning_rate": 1e-3, "dropout": 0.3, "head_units": 128,
         "batch_size": 16, "augment": "none", "warmup_epochs": 10, "fine_tune_lr": 1e-5},
        {"backbone": "mobilenet_v2", "weights": "imagenet", "unfreeze": 30, "warmup_epochs": 10,
         "learning_rate": 1e-3, "fine_tune_lr": 1e-5, "dropout": 0.3, "head_units": 128, "pooling": "avg",
         "augment": "none", "class_weight": False, "batch_size": 16},
        20, [(0, 10, 1e-3, 0), (10, 20, 1e-5, 30)],
        id="S1-best-frozen10-then-top30-1e-5",  # test accuracy 0.8891
    ),
    pytest.param(
        "melanoma",
        {"backbone": "mobilenet_v2", "unfreeze": 0, "learning_rate": 1e-3, "dropout": 0.3, "head_units": 128,
         "batch_size": 16, "augment": "none"},
        {"backbone": "mobilenet_v2", "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-3, "dropout": 0.3,
         "head_units": 128, "augment": "none", "batch_size": 16},
        10, [(0, 10, 1e-3, 0)],
        id="S1-frozen",  # test accuracy 0.8805
    ),
    # S2: frozen ImageNet backbones + GAP -> Dense(256) -> Dropout(0.5); Adam 1e-3, batch 32,
    # balanced class weights, up to 20 epochs, no augmentation.
    pytest.param(
        "ham10000_binary",
        {"backbone": "vgg16", "unfreeze_vgg16": 0, "learning_rate": 1e-3, "dropout": 0.5, "head_units": 256,
         "augment": "none"},
        {"backbone": "vgg16", "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-3, "dropout": 0.5,
         "head_units": 256, "pooling": "avg", "augment": "none", "class_weight": True, "batch_size": 32},
        20, [(0, 20, 1e-3, 0)],
        id="S2-best-vgg16-frozen",  # test accuracy 0.87
    ),
    pytest.param(
        "ham10000_binary",
        {"backbone": "mobilenet_v2", "unfreeze_mobilenet_v2": 0, "learning_rate": 1e-3, "dropout": 0.5,
         "head_units": 256, "augment": "none"},
        {"backbone": "mobilenet_v2", "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-3, "dropout": 0.5,
         "head_units": 256, "pooling": "avg", "augment": "none", "class_weight": True, "batch_size": 32},
        20, [(0, 20, 1e-3, 0)],
        id="S2-mobilenet_v2-frozen",  # 0.82
    ),
    pytest.param(  # the custom CNN from scratch: ... Flatten -> Dense(256) -> Dropout(0.5)
        "ham10000_binary",
        {"backbone": "cnn_s2", "cnn_learning_rate": 1e-3, "cnn_dropout": 0.5},
        {"backbone": "cnn_s2", "weights": None, "unfreeze": "all", "learning_rate": 1e-3, "dropout": 0.5,
         "head_units": 256, "pooling": "flatten", "augment": "none", "class_weight": True, "batch_size": 32},
        20, [(0, 20, 1e-3, "all")],
        id="S2-custom-cnn",  # 0.84
    ),
    # S3: GAP -> Dense(128) -> Dropout(0.5), batch 16, 5 epochs, 128 px.
    pytest.param(
        "covid_radiography",
        {"backbone": "mobilenet_v2", "unfreeze_mobilenet_v2": 0, "learning_rate": 1e-4, "dropout": 0.5,
         "head_units": 128, "augment": "heavy"},  # nearest policy to rotation 15, shift .1, h-flip, zoom .1
        {"backbone": "mobilenet_v2", "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-4, "dropout": 0.5,
         "head_units": 128, "pooling": "avg", "augment": "heavy", "class_weight": False, "batch_size": 16},
        5, [(0, 5, 1e-4, 0)],
        id="S3-best-mobilenet_v2-frozen-augmented",  # test accuracy 0.8994
    ),
    *[
        pytest.param(
            "covid_radiography",
            {"backbone": name, f"unfreeze_{name}": 0, "learning_rate": 1e-4, "dropout": 0.5, "head_units": 128,
             "augment": "none"},
            {"backbone": name, "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-4, "dropout": 0.5,
             "head_units": 128, "augment": "none", "batch_size": 16},
            5, [(0, 5, 1e-4, 0)],
            id=f"S3-{name}-frozen",  # 0.8963, 0.8963, 0.8901, 0.8932
        )
        for name in ("resnet50", "vgg16", "densenet121", "mobilenet_v2")
    ],
    pytest.param(  # fine-tuned after its frozen run: 5 epochs at 1e-4, then the last 10 layers at 1e-5
        "covid_radiography",
        {"backbone": "resnet50", "unfreeze_resnet50": 10, "learning_rate": 1e-4, "dropout": 0.5, "head_units": 128,
         "augment": "none", "warmup_epochs": 5, "fine_tune_lr": 1e-5},
        {"backbone": "resnet50", "weights": "imagenet", "unfreeze": 10, "warmup_epochs": 5, "learning_rate": 1e-4,
         "fine_tune_lr": 1e-5, "dropout": 0.5, "head_units": 128, "augment": "none", "batch_size": 16},
        10, [(0, 5, 1e-4, 0), (5, 10, 1e-5, 10)],
        id="S3-resnet50-top10-1e-5",  # 0.8963
    ),
    pytest.param(  # Conv32-Pool-Conv64-Pool, Flatten -> Dense(128) -> Dropout(0.5), from scratch
        "covid_radiography",
        {"backbone": "cnn_s3", "cnn_learning_rate": 1e-3, "cnn_dropout": 0.5},
        {"backbone": "cnn_s3", "weights": None, "unfreeze": "all", "learning_rate": 1e-3, "dropout": 0.5,
         "head_units": 128, "pooling": "flatten", "augment": "none", "batch_size": 16},
        5, [(0, 5, 1e-3, "all")],
        id="S3-baseline-cnn",  # 0.8960
    ),
    # S4: MobileNetV2, last 30 layers trained with the head from the start at Adam 1e-5;
    # GAP -> (BatchNorm, not supported) -> Dropout(0.4) -> Dense; batch 8; rotation/zoom/flip/shear.
    # It stopped early (patience 5) and gives no epoch cap: any cap gives this single phase.
    pytest.param(
        "histopathology",
        {"backbone": "mobilenet_v2", "unfreeze": 30, "learning_rate": 1e-5, "dropout": 0.4, "head_units": 0,
         "batch_size": 8, "augment": "heavy", "class_weight": False, "warmup_epochs": 0},
        {"backbone": "mobilenet_v2", "weights": "imagenet", "unfreeze": 30, "warmup_epochs": 0,
         "learning_rate": 1e-5, "dropout": 0.4, "head_units": 0, "pooling": "avg", "augment": "heavy",
         "class_weight": False, "batch_size": 8},
        10, [(0, 10, 1e-5, 30)],
        id="S4-mobilenet_v2-top30-1e-5",  # val accuracy 0.80 (10 images)
    ),
    # S5: EfficientNetB1, GAP -> Dropout -> Dense(7), balanced class weights, flips, rotation, zoom,
    # brightness, contrast; phase 1 frozen, phase 2 top 30 layers at a "very low" rate. Not given by
    # the study, so Keras's usual values: dropout 0.2 (EfficientNet's own), Adam 1e-3, fine-tune 1e-5,
    # batch 32, 5 + 15 epochs.
    pytest.param(
        "ham10000",
        {"backbone": "efficientnet_b1", "unfreeze": 30, "learning_rate": 1e-3, "dropout": 0.2, "head_units": 0,
         "batch_size": 32, "augment": "heavy", "warmup_epochs": 5, "fine_tune_lr": 1e-5},
        {"backbone": "efficientnet_b1", "weights": "imagenet", "unfreeze": 30, "warmup_epochs": 5,
         "learning_rate": 1e-3, "fine_tune_lr": 1e-5, "dropout": 0.2, "head_units": 0, "pooling": "avg",
         "augment": "heavy", "class_weight": True, "batch_size": 32},
        20, [(0, 5, 1e-3, 0), (5, 20, 1e-5, 30)],
        id="S5-efficientnet_b1-phase1-then-top30",  # val accuracy 0.7189
    ),
    pytest.param(
        "ham10000",
        {"backbone": "efficientnet_b1", "unfreeze": 0, "learning_rate": 1e-3, "dropout": 0.2, "head_units": 0,
         "batch_size": 32, "augment": "heavy"},
        {"backbone": "efficientnet_b1", "weights": "imagenet", "unfreeze": 0, "learning_rate": 1e-3,
         "dropout": 0.2, "head_units": 0, "augment": "heavy", "class_weight": True, "batch_size": 32},
        5, [(0, 5, 1e-3, 0)],
        id="S5-efficientnet_b1-phase1-frozen",  # val accuracy 0.6810
    ),
]

_loaded = {}


def study_of(stem: str):
    if stem not in _loaded:
        _loaded[stem] = load_study(SPACES / f"{stem}.py")
    return _loaded[stem]


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def paper_point(study, params: dict) -> dict:
    """``space(FixedTrial(params))`` with the study's fixed values: the trial's hyperparameters.

    Every parameter must be asked for, and every value must lie in the distribution the space
    asks with (FixedTrial itself only warns about a value outside it).
    """
    trial = optuna.trial.FixedTrial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the explicit check below reports out-of-range values
        hp = study.space(trial)
    assert set(trial.params) == set(params), f"space never asked for {sorted(set(params) - set(trial.params))}"
    for name, value in params.items():
        dist = trial.distributions[name]
        assert dist._contains(dist.to_internal_repr(value)), f"{name}={value!r} is outside the space's {dist}"
    return resolve_hparams({**study.fixed, **hp})


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_study_file_loads(path):
    study = load_study(path)  # validation and a 32-sample dry run of the space
    assert study.name == path.stem


def test_every_reference_study_has_a_file():
    assert set(STUDIES) <= {p.stem for p in STUDY_FILES}


@pytest.mark.parametrize("stem, params, config, epochs, schedule", ROWS)
def test_paper_configuration_is_a_point_of_the_space(stem, params, config, epochs, schedule):
    study = study_of(stem)
    hp = paper_point(study, params)
    assert {k: hp[k] for k in config} == config  # FixedTrial hands values back unchanged: exact
    assert study.max_epochs >= epochs
    assert phases(hp, epochs) == schedule


@pytest.mark.parametrize("stem", STUDIES)
def test_dataset_protocol_and_budget_match_the_paper(stem):
    facts, study = STUDIES[stem], study_of(stem)
    ds = study.dataset
    assert ds.loader == facts["loader"]
    assert ds.split == facts["tag"]  # trainables/splits.py reproduces each study's split as S1..S5
    assert ds.image_size == facts["image_size"]
    assert ds.positive_class == facts["positive_class"]
    assert {k: ds.options.get(k) for k in facts["options"]} == facts["options"]
    assert study.metric == "val_balanced_accuracy"  # imbalanced data: never plain accuracy
    assert study.max_epochs >= facts["epochs"]
    assert study.grace_period <= study.max_epochs


@pytest.mark.parametrize("stem", STUDIES)
def test_docstring_gives_run_command_and_download_url(stem):
    path = SPACES / f"{stem}.py"
    doc = docstring(path)
    assert f"python -m search.run spaces/{path.name}" in doc
    assert re.search(r"https?://\S+", doc)
    # The loader's own download URLs (shown when a dataset folder is missing) appear too.
    for url in re.findall(r"https?://\S+", get_loader(STUDIES[stem]["loader"]).url):
        assert url in doc, f"{path.name} does not give the loader's URL {url}"
