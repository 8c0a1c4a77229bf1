"""Study files are validated when they load, before Ray starts, with did-you-mean errors."""

import re
import time

import pytest

from search import Dataset, Study, StudyError, load_study


def space(trial):
    return {"backbone": trial.suggest_categorical("backbone", ["cnn_s2", "mobilenet_v2"]),
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}


def make(**changes):
    return Study(**{"name": "s", "space": space, **changes})


def test_quickstart_loads():
    study = load_study("spaces/quickstart.py")
    assert study.name == "quickstart"
    assert study.source.endswith("spaces/quickstart.py")


def test_defaults_are_valid():
    study = make()
    assert study.metric == "val_balanced_accuracy" and study.mode == "max"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"metric": "val_balanced_acc"}, "did you mean 'val_balanced_accuracy'"),
        ({"mode": "maximum"}, "did you mean 'max'"),
        ({"grace_period": 5, "max_epochs": 3}, "grace_period: bad value 5; it must be <= max_epochs (3)"),
        ({"num_samples": 0}, "num_samples: bad value 0"),
        ({"reduction_factor": 1}, "reduction_factor: bad value 1"),
        ({"gpus_per_trial": -0.5}, "gpus_per_trial: bad value -0.5"),
        ({"mixed_precision": "yes"}, "mixed_precision: bad value 'yes'; use True, False or 'auto'"),
        ({"name": "bad name/"}, "name: bad value 'bad name/'"),
        ({"dataset": Dataset(loader="ham1000")}, "did you mean 'ham10000'"),
        ({"dataset": Dataset(split="stratifed")}, "did you mean 'stratified'"),
        ({"fixed": {"droput": 0.2}}, "unknown hyperparameter 'droput'; did you mean 'dropout'"),
        ({"fixed": {"augment": "heavvy"}}, "unknown augment 'heavvy'; did you mean 'heavy'"),
        ({"fixed": {"unfreeze": -3}}, "unfreeze: bad value -3"),
        ({"fixed": {"learning_rate": 3}}, "learning_rate: bad value 3"),
        # Accepted before, then trained differently from what the leaderboard records:
        ({"fixed": {"batch_size": 0}}, "fixed: batch_size: bad value 0; use a positive integer"),  # Keras used 32
        ({"fixed": {"batch_size": 10**9}}, "fixed: batch_size: bad value 1000000000; use a positive integer up to"),
        ({"fixed": {"head_units": 10**9}}, "fixed: head_units: bad value 1000000000; use 0 (no hidden layer) or a width up to 16384"),
        ({"fixed": {"unfreeze": True}}, "fixed: unfreeze: bad value True"),  # ran as unfreeze=1
        ({"fixed": {"head_units": True}}, "fixed: head_units: bad value True"),  # ran as 1 unit
        ({"fixed": {"warmup_epochs": True}}, "fixed: warmup_epochs: bad value True"),
        ({"fixed": {"class_weight": 1}}, "fixed: unknown class_weight 1"),  # 1 == True to Python
        ({"mixed_precision": 1}, "mixed_precision: bad value 1; use True, False or 'auto'"),
        # Open-ended needs a budget: without one, Ray would propose trials for ever.
        ({"num_samples": None}, "num_samples: bad value None; None runs trials until the time limit is spent, and "
                                "this study has none: set time_limit_s"),
        ({"num_samples": 0}, "num_samples: bad value 0; use an integer >= 1, or None with time_limit_s"),
        ({"fixed": [("dropout", 0.1)]}, "fixed: bad value [('dropout', 0.1)]; use a dict"),  # was AttributeError
        # NaN compares False with everything, so `nan <= 0` let these through:
        ({"time_limit_s": float("nan")}, "time_limit_s: bad value nan; use a positive number of seconds, or None"),
        ({"time_limit_s": float("inf")}, "time_limit_s: bad value inf"),
        ({"cpus_per_trial": float("nan")}, "cpus_per_trial: bad value nan; use a positive number"),
        ({"cpus_per_trial": float("inf")}, "cpus_per_trial: bad value inf"),  # refused only once Ray had started
        ({"gpus_per_trial": float("inf")}, "gpus_per_trial: bad value inf"),
        ({"cpus_per_trial": 0.00001}, "cpus_per_trial: bad value 1e-05; Ray cannot schedule less than 0.0001"),
        ({"weights_dir": 3}, "weights_dir: bad value 3; use a folder path"),
        ({"dataset": Dataset(image_size=100000)}, "dataset.image_size: bad value 100000; use an integer from 16 to 4096"),
        ({"dataset": Dataset(classes=["a", "b", "a"])}, "dataset.classes: bad value ['a', 'b', 'a']; list each class once (repeated: a)"),
        ({"dataset": Dataset(classes="ab")}, "dataset.classes: bad value 'ab'; use a list of class names"),
        ({"dataset": Dataset(classes=["benign", "Benign"])},  # two classes no reader tells apart
         "dataset.classes: names that differ only in letter case or Unicode normalisation would be separate classes "
         "that read the same:\n  'Benign' and 'benign' differ only in letter case: 'B' (U+0042) vs 'b' (U+0062)\n"
         "List each class once, spelt as its folder is."),
        ({"dataset": Dataset(classes=["be\u0301nin", "b\u00e9nin"])},  # NFD and NFC: one class, listed twice
         "dataset.classes: bad value ['bénin', 'bénin']; list each class once (repeated: bénin)"),
        ({"dataset": Dataset(classes=["benign", "malignant"], positive_class="malignent")},
         "dataset.positive_class: unknown class 'malignent'; did you mean 'malignant'"),
        ({"dataset": Dataset(seed=True)}, "dataset.seed: bad value True"),  # was never checked
        ({"dataset": Dataset(seed=-1)}, "dataset.seed: bad value -1"),
        ({"dataset": Dataset(split_options=None)}, "dataset.split_options: bad value None; use a dict"),
        ({"dataset": Dataset(path=3)}, "dataset.path: bad value 3; use a folder path"),
    ],
)
def test_bad_fields_name_field_value_and_fix(changes, expected):
    with pytest.raises(StudyError, match=re.escape(expected)):
        make(**changes)


def test_floats_and_nan_learning_rates_where_ints_are_meant_stay_refused():
    for fixed, expected in [({"batch_size": 16.0}, "batch_size: bad value 16.0"),
                            ({"unfreeze": 30.0}, "unfreeze: bad value 30.0"),
                            ({"learning_rate": float("nan")}, "learning_rate: bad value nan"),
                            ({"fine_tune_lr": -1e-5}, "fine_tune_lr: bad value -1e-05")]:
        with pytest.raises(StudyError, match=re.escape(expected)):
            make(fixed=fixed)
    for changes in ({"num_samples": True}, {"seed": True}, {"reduction_factor": 2.5}, {"name": 3}):
        with pytest.raises(StudyError, match=f"{next(iter(changes))}: bad value"):
            make(**changes)


def test_unfreeze_deeper_than_the_backbone_names_its_layer_count():
    """Keras would train every layer of a 154-layer MobileNetV2 for unfreeze=100000, recorded as 100000."""
    def deep(trial):
        return {"backbone": trial.suggest_categorical("backbone", ["cnn_s3", "mobilenet_v2"]), "unfreeze": 100000}

    with pytest.raises(StudyError, match=r"space: unfreeze: bad value 100000; backbone '(cnn_s3|mobilenet_v2)' "
                                         r"has (5|154) layers; use at most \2, or 'all'"):
        make(space=deep)
    # A depth in fixed is checked against the backbone the space picks, and named as fixed.
    with pytest.raises(StudyError, match="fixed: unfreeze: bad value 6; backbone 'cnn_s3' has 5 layers"):
        make(space=lambda trial: {"backbone": "cnn_s3"}, fixed={"unfreeze": 6})
    # The whole backbone by count is allowed (the same as "all").
    make(space=lambda trial: {"backbone": "mobilenet_v2", "unfreeze": 154})


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: make(num_sample=3), "Study(...): unknown field 'num_sample'; did you mean 'num_samples'?"),
        (lambda: make(dataset=Dataset(image_sise=64)), "Dataset(...): unknown field 'image_sise'; did you mean 'image_size'?"),
        (lambda: Study(name="s"), "Study(...): missing required field(s) space"),
    ],
)
def test_misspelt_or_missing_keyword_gets_a_did_you_mean_not_a_type_error(build, expected):
    with pytest.raises(StudyError, match=re.escape(expected)):
        build()


def test_misspelt_keyword_in_a_study_file_names_the_file(write_study):
    path = write_study("STUDY = Study(name='x', max_epoch=3, space=lambda trial: {'backbone': 'cnn_s3'})\n")
    with pytest.raises(StudyError, match=r"study.py: Study\(\.\.\.\): unknown field 'max_epoch'; did you mean 'max_epochs'"):
        load_study(path)


def test_unknown_backbone_in_space_gets_did_you_mean():
    def bad(trial):
        return {"backbone": trial.suggest_categorical("backbone", ["mobilenetv2", "cnn_s2"])}

    with pytest.raises(StudyError, match="unknown backbone 'mobilenetv2'; did you mean 'mobilenet_v2'"):
        make(space=bad)


def test_space_must_return_a_dict():
    with pytest.raises(StudyError, match="return a dict"):
        make(space=lambda trial: [trial.suggest_float("learning_rate", 0.1, 0.2)])


def test_slow_space_is_refused():
    def slow(trial):
        time.sleep(1.2)
        return {}

    with pytest.raises(StudyError, match="a space only suggests values"):
        make(space=slow)


def test_space_exception_is_reported():
    def broken(trial):
        raise KeyError("oops")

    with pytest.raises(StudyError, match="space\\(trial\\) raised KeyError"):
        make(space=broken)


def test_syntax_error_names_file_and_line(write_study):
    path = write_study("STUDY = Study(name='x',\n  space=lambda t: {}\n")
    with pytest.raises(StudyError, match=r"study.py:\d+: syntax error"):
        load_study(path)


def test_missing_study_object(write_study):
    path = write_study("study = 3\n")
    with pytest.raises(StudyError, match="no study object; define `STUDY = Study"):
        load_study(path)


def test_missing_file():
    with pytest.raises(StudyError, match="not found"):
        load_study("spaces/nope.py")


def test_a_folder_given_as_the_study_file_is_named_as_a_folder(tmp_path):
    (tmp_path / "melanoma.py").write_text("")
    with pytest.raises(StudyError, match=re.escape(f"study file {str(tmp_path)!r} is a folder; pass one study file "
                                                   f"in it, e.g. {tmp_path / 'melanoma.py'}")):
        load_study(tmp_path)


def test_a_second_study_object_is_refused_naming_both(write_study):
    path = write_study("BASE = Study(name='a', space=lambda trial: {'backbone': 'cnn_s3'})\n"
                       "STUDY = Study(name='b', space=lambda trial: {'backbone': 'cnn_s3'})\n")
    with pytest.raises(StudyError, match=r"study.py: defines 2 Study objects \(BASE, STUDY\); .*`del BASE`"):
        load_study(path)
    alias = write_study("STUDY = Study(name='b', space=lambda trial: {'backbone': 'cnn_s3'})\nSAME = STUDY\n", "alias.py")
    assert load_study(alias).name == "b"  # one object under two names is still one study


def test_a_study_under_another_name_is_named(write_study):
    path = write_study("MINE = Study(name='a', space=lambda trial: {'backbone': 'cnn_s3'})\n")
    with pytest.raises(StudyError, match="no study object; define `STUDY = Study\\(...\\)` \\(found a Study named MINE"):
        load_study(path)


def test_error_inside_study_file_names_the_file(write_study):
    path = write_study("STUDY = Study(name='x', space=lambda trial: {}, max_epochs=0)\n")
    with pytest.raises(StudyError, match=r"study.py: max_epochs: bad value 0"):
        load_study(path)


def test_class_names_are_compared_in_nfc():
    """A study typed on one machine names the class folders another stored in NFD."""
    nfc, nfd = "b\u00e9nin", "be\u0301nin"
    study = make(dataset=Dataset(classes=[nfd, "malignant"], positive_class=nfc))
    assert study.dataset.classes == [nfc, "malignant"] and study.dataset.positive_class == nfc
