"""Study files are validated when they load, before Ray starts, with did-you-mean errors."""

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
    ],
)
def test_bad_fields_name_field_value_and_fix(changes, expected):
    with pytest.raises(StudyError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make(**changes)


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


def test_error_inside_study_file_names_the_file(write_study):
    path = write_study("STUDY = Study(name='x', space=lambda trial: {}, max_epochs=0)\n")
    with pytest.raises(StudyError, match=r"study.py: max_epochs: bad value 0"):
        load_study(path)
