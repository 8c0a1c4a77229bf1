"""A fine-tuned trial's warm-up trains its head on the whole frozen backbone's cached features (cached_warmup),
then fine-tunes from that head: the fidelity ladder that lets ASHA judge a configuration's head in seconds."""

import numpy as np
import pytest

from trainables import activation_cache as cache
from trainables import train as train_module

from test_activation_cache import SETTINGS, frozen_lite0_config, small_data, train, train_capturing_checkpoints


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))


def data_split():
    x, y = small_data()
    return {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}


def fine_tuned(**extra):
    return frozen_lite0_config(**{"unfreeze": "all", "warmup_epochs": 1, "fine_tune_lr": 1e-3, **extra})


def test_the_warm_up_reads_the_entries_a_head_only_trial_built(monkeypatch):
    data = data_split()
    train(frozen_lite0_config(), data, activation_cache=True)  # a head-only trial: train and val features
    entries = sorted(p.name for p in cache.cache_dir().glob("*.npy"))
    assert len(entries) == 2
    calls = []
    real = train_module.cached_features

    def spy(prefix, x, **kw):
        calls.append((prefix.name, kw["dtype"], kw["pool"]))
        return real(prefix, x, **kw)

    monkeypatch.setattr(train_module, "cached_features", spy)
    train(fine_tuned(), data, activation_cache=True)
    # The warm-up trained on the whole backbone's pooled head-only features, the very entries already there;
    # the fine-tuning of every layer then ran the network (nothing below "all" to cache).
    assert calls == [("efficientnet_lite0", cache.HEAD_ONLY_DTYPE, True)] * 2
    assert sorted(p.name for p in cache.cache_dir().glob("*.npy")) == entries


@pytest.mark.parametrize("unfreeze", ["all", 11])
def test_fine_tuning_continues_from_the_head_the_cached_warm_up_trained(unfreeze, tmp_path, monkeypatch):
    data = data_split()
    config = fine_tuned(unfreeze=unfreeze)
    cached, folders = train_capturing_checkpoints(config, data, tmp_path / "cached", monkeypatch, max_epochs=2)
    # The warm-up's checkpoint holds the whole classifier, so the next phase (or a resume) starts from it.
    assert (folders[0] / "model.keras").is_file()
    end_to_end, _ = train_capturing_checkpoints(config, data, tmp_path / "full", monkeypatch, max_epochs=2,
                                                activation_cache=False)
    p_cached, p_full = (m.predict(data["x_val"], verbose=0) for m in (cached, end_to_end))
    # Float16 features in the warm-up, as a head-only trial's: close to end to end, not identical. A fine-tuning
    # phase that started from a fresh head instead would be far off (checked below).
    assert np.abs(p_cached - p_full).max() < 0.02
    fresh, _ = train_capturing_checkpoints({**config, "warmup_epochs": 0, "learning_rate": 1e-3}, data,
                                           tmp_path / "fresh", monkeypatch, max_epochs=1, activation_cache=False)
    assert np.abs(fresh.predict(data["x_val"], verbose=0) - p_full).max() > 0.02


@pytest.mark.parametrize("unfreeze", ["all", 11])
def test_a_trial_resumed_after_its_cached_warm_up_fine_tunes_as_if_never_stopped(unfreeze, tmp_path, monkeypatch):
    data = data_split()
    # No dropout and one batch an epoch: nothing random is drawn after the warm-up, so the two runs must agree.
    config = fine_tuned(unfreeze=unfreeze, dropout=0.0, batch_size=len(data["x_train"]))
    whole, folders = train_capturing_checkpoints(config, data, tmp_path / "whole", monkeypatch, max_epochs=2)
    resumed, _ = train_capturing_checkpoints(config, data, tmp_path / "resumed", monkeypatch, max_epochs=2,
                                             resume_from=folders[0])  # the warm-up's checkpoint (epoch 1)
    np.testing.assert_allclose(resumed.predict(data["x_val"], verbose=0), whole.predict(data["x_val"], verbose=0),
                               atol=1e-4)
    # And from the fine-tuning phase's own checkpoint (a cut's holds only its top): nothing left to train.
    again, _ = train_capturing_checkpoints(config, data, tmp_path / "again", monkeypatch, max_epochs=2,
                                           resume_from=folders[-1])
    np.testing.assert_allclose(again.predict(data["x_val"], verbose=0), whole.predict(data["x_val"], verbose=0),
                               atol=1e-6)


def test_augmented_warm_ups_use_the_bank_and_plain_augmented_ones_run_the_network():
    from trainables.hparams import resolve_hparams
    from trainables.train import TrialSettings, cached_warmup, phases

    def settings(**kw):
        return TrialSettings(**{**SETTINGS, **kw})

    light = resolve_hparams(fine_tuned(augment="light"))
    assert cached_warmup(light, settings(augment_views=2), phases(light, 3))
    assert cached_warmup(light, settings(), phases(light, 3)) is None  # fresh random views every epoch
    plain = resolve_hparams(fine_tuned())
    assert cached_warmup(plain, settings(activation_cache=False), phases(plain, 3)) is None
    no_warmup = resolve_hparams(fine_tuned(warmup_epochs=0))
    assert cached_warmup(no_warmup, settings(), phases(no_warmup, 3)) is None
