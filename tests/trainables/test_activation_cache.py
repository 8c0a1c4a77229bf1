"""The frozen-backbone activation cache: same results as end to end, invalidated by any change, built once."""

import multiprocessing
import os
import warnings

import numpy as np
import pytest

from trainables import activation_cache as cache
from trainables import create_backbone
from trainables.efficientnet_lite import VARIANTS as LITE_VARIANTS
from trainables.efficientnet_lite import block_ends
from trainables.hparams import DEFAULTS
from trainables.train import TrialSettings, fit_classifier

SETTINGS = dict(max_epochs=3, metric="val_balanced_accuracy", mode="max", class_names=("benign", "malignant"),
                positive=1, seed=7)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))


def small_data(n=48, size=32, seed=0):
    """Two classes that differ in brightness, so a frozen ImageNet backbone separates them."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.integers(0, 160, (n, size, size, 3)) + 80 * y[:, None, None, None]
    return x.astype(np.uint8), y


def frozen_lite0_config(**extra):
    return {**DEFAULTS, "backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
            "learning_rate": 3e-3, "head_units": 16, "dropout": 0.2, "batch_size": 8, "trial_number": 1, **extra}


def train(config, data, *, activation_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tune.report outside a Tuner warns and returns
        settings = TrialSettings(**SETTINGS, activation_cache=activation_cache)
        return fit_classifier(config, data, settings)


def test_cached_and_end_to_end_training_agree():
    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    cached = train(frozen_lite0_config(), data, activation_cache=True)
    assert len(list(cache.cache_dir().glob("*.npy"))) == 2  # train and val features
    end_to_end = train(frozen_lite0_config(), data, activation_cache=False)

    p_cached = cached.predict(data["x_val"], verbose=0)
    p_full = end_to_end.predict(data["x_val"], verbose=0)
    # float16 features differ from float32 ones by about 1e-3 relative; after 3 epochs that stays small.
    assert np.abs(p_cached - p_full).max() < 0.02
    assert (p_cached.argmax(1) == p_full.argmax(1)).mean() >= 0.95
    assert not np.allclose(p_cached, 0.5, atol=0.05)  # it did learn something


def test_partly_unfrozen_trial_from_the_cache_agrees_too():
    # The top 11 layers of efficientnet_lite0 are its last block: cut below it and fine-tune. (No warm-up: a warm-up
    # trains on the head-only float16 entries, tests/trainables/test_cached_warmup.py.)
    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    config = frozen_lite0_config(unfreeze=11, warmup_epochs=0, fine_tune_lr=1e-3)
    cached = train(config, data, activation_cache=True)
    assert [p.name for p in cache.cache_dir().glob("*.npy")]  # served from the cache
    end_to_end = train(config, data, activation_cache=False)
    p_cached, p_full = (m.predict(data["x_val"], verbose=0) for m in (cached, end_to_end))
    assert np.abs(p_cached - p_full).max() < 1e-4  # float32 features for fine-tuning: the same computation


def test_many_steps_per_call_on_cached_features_train_the_same_model(monkeypatch):
    """A head on cached features runs 64 training steps per call into TensorFlow (its per-step overhead is most of
    such a trial); the batches and updates are the same as one step per call."""
    import trainables.train as train_module

    x, y = small_data(n=96)
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    config = frozen_lite0_config(batch_size=4)  # 12 steps an epoch: several calls at 1, one at 64
    assert train_module.steps_per_execution(top=object()) == 64 and train_module.steps_per_execution(top=None) == 1
    many = train(config, data, activation_cache=True)
    monkeypatch.setattr(train_module, "CACHED_STEPS_PER_EXECUTION", 1)
    one = train(config, data, activation_cache=True)
    p_many, p_one = (m.predict(data["x_val"], verbose=0) for m in (many, one))
    assert np.abs(p_many - p_one).max() < 1e-5
    assert not np.allclose(p_many, 0.5, atol=0.05)  # it did learn something


@pytest.mark.parametrize("head_units, dropout", [(0, 0.0), (16, 0.3)])
def test_a_head_that_averages_first_gives_the_same_output_on_pooled_features(head_units, dropout):
    """Head-only trials train on features averaged once (``pooled``) through the head's own layers after its
    pooling (``pooled_head``): the same outputs as the whole head on the feature maps, from the same weights."""
    from trainables.activation_cache import pooled
    from trainables.model import build_head
    from trainables.train import pooled_head

    hp = {**DEFAULTS, "pooling": "avg", "head_units": head_units, "dropout": dropout}
    head = build_head(hp, (3, 3, 40), num_classes=7, seed=1)
    maps = np.random.default_rng(0).normal(size=(32, 3, 3, 40)).astype(np.float16)
    fast = pooled_head(head)
    assert pooled(maps).shape == (32, 40) and pooled(maps).dtype == np.float32
    assert np.allclose(fast.predict(pooled(maps), verbose=0), head.predict(maps, verbose=0), atol=1e-6)
    assert {id(w) for w in fast.weights} == {id(w) for w in head.weights}  # training one trains the other
    with pytest.raises(ValueError, match="not average pooling"):
        pooled_head(build_head({**hp, "pooling": "flatten"}, (3, 3, 40), num_classes=7))


def test_a_trial_names_cache_entries_by_the_digest_the_driver_shipped(monkeypatch):
    """Hashing a split's images (1.2 GB for HAM10000 at 224 px) is done once by the driver; trials use its digest."""
    from trainables.data import data_digest

    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    shipped = {**data, "digest_x_train": data_digest(data["x_train"]), "digest_x_val": data_digest(data["x_val"])}
    train(frozen_lite0_config(), shipped, activation_cache=True)  # builds the entries under the shipped digests
    built = sorted(p.name for p in cache.cache_dir().glob("*.npy"))

    def no_hashing(x):
        raise AssertionError("a trial hashed the images although the driver shipped their digest")

    monkeypatch.setattr(cache, "data_digest", no_hashing)
    train(frozen_lite0_config(trial_number=2), shipped, activation_cache=True)  # served, no hashing
    assert sorted(p.name for p in cache.cache_dir().glob("*.npy")) == built  # the same entries: no new build
    with pytest.raises(AssertionError, match="hashed the images"):
        train(frozen_lite0_config(trial_number=3), data, activation_cache=True)  # without digests it must hash


def test_only_clean_pretrained_trials_with_a_frozen_part_use_it():
    assert cache.can_use_cache(frozen_lite0_config())
    assert cache.can_use_cache(frozen_lite0_config(unfreeze=20))
    assert not cache.can_use_cache(frozen_lite0_config(augment="light"))
    assert not cache.can_use_cache(frozen_lite0_config(unfreeze="all"))
    assert not cache.can_use_cache(frozen_lite0_config(weights=None))


def test_cache_depths_are_clean_cuts():
    mobilenet = create_backbone("mobilenet_v2", input_shape=(32, 32, 3))
    depths = cache.cache_depths(mobilenet)
    assert 0 in depths and 30 in depths  # S1's "last 30 layers" is served
    assert 12 not in depths  # inside a residual block: a skip connection crosses the cut
    prefix, suffix, cut = cache.split_backbone(mobilenet, 30)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(suffix(prefix(x)), mobilenet(x), atol=1e-5)
    assert cache.split_backbone(mobilenet, 12) is None


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_efficientnet_lite_block_ends_are_served_depths(name):
    """Fine-tuning from any block on (README's served-depths table): no skip connection crosses a block end."""
    backbone = create_backbone(name, input_shape=(32, 32, 3))
    names = [layer.name for layer in backbone.layers]
    depths = [len(names) - 1 - names.index(end) for end in block_ends(name)]
    assert depths[-1] == 0 and depths[0] == len(names) - 5  # head's end; stem's end (input, rescaling, conv, bn below)
    assert all(cache.split_backbone(backbone, k) is not None for k in depths)
    # Inside a residual block the cut is refused: its skip connection crosses it.
    last_add = [end for end in block_ends(name) if end.endswith("_add")][-1]
    inside = len(names) - 1 - names.index(last_add.replace("_add", "_project_bn"))
    assert cache.split_backbone(backbone, inside) is None


def test_weights_size_and_data_change_the_entry():
    x, _ = small_data(n=8)
    backbone = create_backbone("efficientnet_lite0", input_shape=(32, 32, 3), weights="imagenet")
    key = cache.entry_key(backbone, x)
    assert cache.entry_key(backbone, x.copy()) == key

    other_pixels = x.copy()
    other_pixels[0, 0, 0, 0] ^= 1
    assert cache.entry_key(backbone, other_pixels) != key

    bigger = create_backbone("efficientnet_lite0", input_shape=(48, 48, 3), weights="imagenet")
    assert cache.entry_key(bigger, small_data(n=8, size=48)[0]) != key

    backbone.weights[0].assign(backbone.weights[0].numpy() + 1e-3)
    assert cache.entry_key(backbone, x) != key


def _build_in_process(queue):
    x, _ = small_data(n=16)
    backbone = create_backbone("efficientnet_lite0", input_shape=(32, 32, 3), weights="imagenet")
    calls = []
    original = backbone.predict
    backbone.predict = lambda *a, **k: calls.append(1) or original(*a, **k)
    features = cache.cached_features(backbone, x)
    queue.put((len(calls), features.shape))


def test_concurrent_trials_build_an_entry_once():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_build_in_process, args=(queue,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(calls for calls, _ in results) == [0, 1]  # one builder, one reader
    assert results[0][1] == results[1][1]
    assert len(list(cache.cache_dir().glob("*.npy"))) == 1


def test_eviction_removes_least_recently_used_first(tmp_path):
    folder = cache.cache_dir()
    folder.mkdir(parents=True)
    for i, name in enumerate(["old", "mid", "new"]):
        np.save(folder / f"{name}.npy", np.zeros(1000, dtype=np.float16))
        os.utime(folder / f"{name}.npy", (1000 + i, 1000 + i))
    size = (folder / "old.npy").stat().st_size
    deleted = cache.evict(limit=2 * size)
    assert [p.stem for p in deleted] == ["old"]
    assert sorted(p.stem for p in folder.glob("*.npy")) == ["mid", "new"]


def test_augmented_trials_train_on_a_bank_of_views():
    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    config = frozen_lite0_config(augment="light")
    assert not cache.can_use_cache(config) and cache.can_use_cache(config, augment_views=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = TrialSettings(**SETTINGS, augment_views=2)
        model = fit_classifier(config, data, settings)
    banks = [np.load(p, mmap_mode="r") for p in cache.cache_dir().glob("*.npy")]
    bank = next(b for b in banks if b.ndim == 5)  # (views, images, h, w, channels)
    assert bank.shape[:2] == (2, len(data["x_train"]))
    assert not np.array_equal(bank[0], bank[1])  # two different random views
    assert model.predict(data["x_val"], verbose=0).shape == (len(data["x_val"]), 2)


def train_capturing_checkpoints(config, data, tmp_path, monkeypatch, *, activation_cache=True, resume_from=None,
                                **settings):
    """A trial whose checkpoints are kept (copied out of Tune's report), one per epoch; returns (model, folders)."""
    import shutil

    import ray.tune

    folders = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None:
            folders.append(shutil.copytree(checkpoint.path, tmp_path / f"checkpoint_{len(folders)}"))

    monkeypatch.setattr(ray.tune, "report", report)
    monkeypatch.setattr(ray.tune, "get_checkpoint",
                        lambda: resume_from and ray.tune.Checkpoint.from_directory(str(resume_from)))
    # elapsed_s always grows, so every epoch "improves" and the last checkpoint holds the returned model.
    options = {**SETTINGS, "metric": "elapsed_s", "activation_cache": activation_cache, **settings}
    return fit_classifier(config, data, TrialSettings(**options)), folders


@pytest.mark.parametrize("unfreeze", [0, 11])
def test_a_cached_trials_checkpoint_holds_its_frozen_part_and_top_and_loads_whole(unfreeze, tmp_path, monkeypatch):
    from trainables.checkpoint import load_classifier

    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    config = frozen_lite0_config(unfreeze=unfreeze, warmup_epochs=0, fine_tune_lr=1e-3)  # float32 cut: see above
    model, folders = train_capturing_checkpoints(config, data, tmp_path / "cached", monkeypatch)
    assert sorted(p.name for p in folders[-1].iterdir()) == ["frozen.keras", "top.keras", "trial.json"]
    loaded = load_classifier(folders[-1])
    p_loaded, p_model = (m.predict(data["x_val"], verbose=0) for m in (loaded, model))
    np.testing.assert_allclose(p_loaded, p_model, atol=1e-5)

    end_to_end, folders = train_capturing_checkpoints(config, data, tmp_path / "full", monkeypatch,
                                                      activation_cache=False)
    assert sorted(p.name for p in folders[-1].iterdir()) == ["model.keras", "trial.json"]
    p_full = end_to_end.predict(data["x_val"], verbose=0)
    # float32 features for fine-tuning compute the same as end to end; float16 ones for a head alone are close.
    assert np.abs(p_loaded - p_full).max() < (1e-4 if unfreeze else 0.02)


@pytest.mark.parametrize("activation_cache", [True, False])
def test_a_resumed_trial_restores_what_it_saved(activation_cache, tmp_path, monkeypatch):
    from ray import tune

    from trainables.train import restore

    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    config = frozen_lite0_config()
    trained, folders = train_capturing_checkpoints(config, data, tmp_path / "first", monkeypatch, max_epochs=2,
                                                   activation_cache=activation_cache)
    # Resumed at its last epoch, the trial trains no further: it must predict what it did when it saved.
    resumed, _ = train_capturing_checkpoints({**config, "trial_number": 2}, data, tmp_path / "again", monkeypatch,
                                             max_epochs=2, resume_from=folders[-1], activation_cache=activation_cache)
    np.testing.assert_allclose(resumed.predict(data["x_val"], verbose=0), trained.predict(data["x_val"], verbose=0),
                               atol=1e-6)
    if activation_cache:  # its checkpoint holds the head alone, which only a trial that fits the head can take
        with pytest.raises(ValueError, match="activation cache on"):
            restore(trained, tune.Checkpoint.from_directory(str(folders[-1])))


def test_a_reused_backbone_trains_the_same_as_a_freshly_built_one():
    x, y = small_data()
    data = {"x_train": x[::2], "y_train": y[::2], "x_val": x[1::2], "y_val": y[1::2]}
    cache._build_shared.cache_clear()
    first = train(frozen_lite0_config(), data, activation_cache=True)  # builds the process's backbone
    second = train(frozen_lite0_config(), data, activation_cache=True)  # reuses it
    assert second.get_layer("efficientnet_lite0") is first.get_layer("efficientnet_lite0")
    # The same head initialisation and shuffling: building a backbone must not shift the trial's randomness.
    np.testing.assert_array_equal(second.predict(data["x_val"], verbose=0), first.predict(data["x_val"], verbose=0))


def test_the_shared_backbone_is_rebuilt_for_other_weights_size_or_precision(tmp_path):
    import keras

    def shared(name="efficientnet_lite0", weights="imagenet", size=32):
        return cache.shared_backbone(name, weights=weights, input_shape=(size, size, 3))

    lite0 = shared()
    assert shared() is lite0 and lite0.identity == cache.model_identity(lite0.model)
    assert shared(weights=None).identity != lite0.identity
    assert shared(size=48).identity != lite0.identity
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        assert shared().identity != lite0.identity
    finally:
        keras.mixed_precision.set_global_policy("float32")

    # A weights file replaced on disk is loaded again.
    path = tmp_path / "b0.weights.h5"
    create_backbone("efficientnet_b0", input_shape=(32, 32, 3)).save_weights(path)
    before = shared("efficientnet_b0", weights=str(path))
    assert shared("efficientnet_b0", weights=str(path)) is before
    other = create_backbone("efficientnet_b0", input_shape=(32, 32, 3))
    other.weights[0].assign(other.weights[0].numpy() + 1.0)
    other.save_weights(path)
    after = shared("efficientnet_b0", weights=str(path))
    assert after is not before and after.identity != before.identity
