"""Distinct trials (search.distinct): no configuration of a study is proposed twice.

The real searcher of a study (``search.tuner.make_searcher``: cheap first, Optuna's TPE inside Ray's
``OptunaSearch``), asked for trials and told their results as Ray would, without Ray's trial loop.
"""

import random

import pytest
from ray.tune.search import Searcher

from search import Dataset, Study
from search.distinct import RESAMPLE_DRAWS, searcher_exhausted, stream_seed, trained_config
from search.tuner import make_searcher

DATA = Dataset(loader="embedded", image_size=32, near_duplicates=False)


def frozen_or_tuned(trial):
    """Mostly head-only (frozen pretrained lite0), as the melanoma studies: cheap first has much to draw from."""
    return {"backbone": "efficientnet_lite0", "weights": "imagenet",
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
            "unfreeze": trial.suggest_categorical("unfreeze", [0, "all"]),
            "dropout": trial.suggest_float("dropout", 0.1, 0.5)}


def six_configurations(trial):
    """2 x 3 configurations, nothing continuous."""
    return {"backbone": trial.suggest_categorical("backbone", ["cnn_s3", "cnn_s2"]),
            "learning_rate": trial.suggest_categorical("learning_rate", [1e-3, 3e-3, 1e-2])}


def run_searcher(study: Study, trials: int) -> list:
    """Ask the study's searcher for up to ``trials`` trials one at a time, each told a result; their configs."""
    searcher = make_searcher(study)
    searcher.set_search_properties(study.metric, study.mode, {})
    scores, configs = random.Random(0), []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        searcher.on_trial_complete(f"t{i}", {study.metric: scores.random(), "training_iteration": 1})
        configs.append(config)
    return searcher, configs


def repeats(configs: list, max_epochs: int) -> list[tuple[int, int]]:
    keys = [trained_config(c, max_epochs) for c in configs]
    return [(i, keys.index(k)) for i, k in enumerate(keys) if k in keys[:i]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tpe_start_up_does_not_replay_the_cheap_first_trials(seed, capsys):
    # Before the fix both drew from RandomSampler(seed=study.seed): seed 0 gave 20 trials of which
    # 5, 6, 8 and 9 repeated 0, 1, 2 and 3.
    study = Study(name="s", dataset=DATA, space=frozen_or_tuned, num_samples=20, max_concurrent=1, seed=seed)
    _, configs = run_searcher(study, 20)
    assert len(configs) == 20
    assert repeats(configs, study.max_epochs) == []
    assert all(c["unfreeze"] == 0 for c in configs[:5])  # cheap first still holds: the first 20 // 4 are heads
    assert "re-sampled" not in capsys.readouterr().out  # the streams are apart: nothing needed re-sampling


def test_a_repeat_is_re_sampled_and_said(capsys):
    study = Study(name="s", dataset=DATA, space=six_configurations, num_samples=6, max_concurrent=1, seed=0)
    searcher, configs = run_searcher(study, 6)
    assert len(configs) == 6 and repeats(configs, study.max_epochs) == []  # all six, once each
    out = capsys.readouterr().out
    assert "re-sampled at random as trial" in out
    # Optuna's study records the refusal (shown in optuna.db): a failed trial naming the one it repeats.
    refused = [t for t in searcher.searcher._ot_study.trials if "repeats_trial" in t.user_attrs]
    assert refused and all(t.state.name == "FAIL" for t in refused)
    assert any("resampled" in t.user_attrs for t in searcher.searcher._ot_study.trials)
    assert not searcher_exhausted(searcher)


def test_a_space_with_every_configuration_run_ends_the_search(capsys):
    study = Study(name="s", dataset=DATA, space=six_configurations, num_samples=10, max_concurrent=1, seed=0)
    searcher, configs = run_searcher(study, 10)
    assert len(configs) == 6 and repeats(configs, study.max_epochs) == []
    assert searcher_exhausted(searcher) and searcher.suggest("again") == Searcher.FINISHED
    assert f"{RESAMPLE_DRAWS} random draws of the space found no configuration that has not run" in \
        capsys.readouterr().out


def test_the_trained_configuration_is_what_counts():
    # Optuna's parameter names and trial_number change nothing trained; the study's fixed values and defaults do.
    a = {"backbone": "cnn_s2", "dropout_s2": 0.2, "dropout": 0.2, "trial_number": 1}
    assert trained_config(a) == trained_config({"backbone": "cnn_s2", "trial_number": 7})  # 0.2 is the default
    assert trained_config(a) != trained_config({**a, "batch_size": 16})


def test_each_stream_has_its_own_seed():
    seeds = {stream_seed(s, stream) for s in range(3) for stream in ("sampler", "cheap_first", "resample")}
    assert len(seeds) == 9 and stream_seed(0, "sampler") == stream_seed(0, "sampler")
