"""Cross-validated selection (``Study(cv_folds=k)``): folds, fold-mean reporting, the fold ensemble, and a
configuration that wins one lucky validation split but loses under cross-validation."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from search.study import Dataset, Study, StudyError
from trainables.datasets import DatasetError
from trainables.hparams import DEFAULTS
from trainables.splits import assign_folds


def _table(n_per_class=(30, 12), groups_of=1, seed=0):
    labels = ["benign"] * n_per_class[0] + ["malignant"] * n_per_class[1]
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"label": rng.permutation(labels)})
    table["group"] = [f"g{i // groups_of}" for i in range(len(table))]
    split = pd.Series(rng.choice(["train", "train", "train", "val", "test", "unused"], len(table)), index=table.index)
    return table, split


def test_folds_are_stratified_seeded_and_cover_train_and_val_exactly_once():
    table, split = _table()
    folds = assign_folds(table, split, 4, seed=3)
    pool = split.isin(["train", "val"])
    assert folds[pool].notna().all() and folds[~pool].isna().all()  # test and unused rows get no fold
    assert sorted(folds[pool].unique()) == [0, 1, 2, 3]  # each train/val row lands in exactly one fold
    per_fold = pd.crosstab(folds[pool], table["label"][pool])
    assert (per_fold.max() - per_fold.min() <= 1).all()  # stratified: class counts within one of each other
    assert folds.equals(assign_folds(table, split, 4, seed=3))  # seeded
    assert not folds.equals(assign_folds(table, split, 4, seed=4))


def test_grouped_folds_keep_every_group_in_one_fold():
    table, split = _table(n_per_class=(60, 30), groups_of=3)
    split = split.groupby(table["group"]).transform("first")  # a grouped protocol keeps groups within a split
    folds = assign_folds(table, split, 3, seed=0, grouped_by=["group"])
    pool = split.isin(["train", "val"])
    assert folds[pool].groupby(table["group"][pool]).nunique().eq(1).all()
    assert sorted(folds[pool].unique()) == [0, 1, 2] and folds[~pool].isna().all()


def test_too_few_images_or_groups_for_k_folds_is_a_named_error():
    table, split = _table(n_per_class=(30, 3))
    split[:] = "train"
    with pytest.raises(DatasetError, match=r"class 'malignant' has only 3 .* use cv_folds <= 3"):
        assign_folds(table, split, 5, seed=0)
    table, split = _table(n_per_class=(20, 20), groups_of=10)
    split[:] = "train"
    with pytest.raises(DatasetError, match="only 4 group"):
        assign_folds(table, split, 5, seed=0, grouped_by=["group"])


def _space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "5"])
def test_study_refuses_a_bad_cv_folds(bad):
    with pytest.raises(StudyError, match=r"cv_folds: bad value .*integer >= 2"):
        Study(name="s", space=_space, cv_folds=bad, fixed={"backbone": "cnn_s2"})


def test_cv_folds_none_or_1_is_one_validation_split():
    from search.study import cv_folds

    for k in (None, 1):
        assert cv_folds(Study(name="s", space=_space, cv_folds=k, fixed={"backbone": "cnn_s2"})) is None
    assert cv_folds(Study(name="s", space=_space, cv_folds=5, fixed={"backbone": "cnn_s2"})) == 5


def test_prepare_writes_folds_for_train_and_val_and_refuses_too_many(tmp_path):
    from search.prepare import prepare_data

    dataset = Dataset(loader="embedded", image_size=16, options={"n_per_class": 20, "image_size": 16},
                      near_duplicates=False)
    study = Study(name="s", space=_space, dataset=dataset, cv_folds=3, fixed={"backbone": "cnn_s2"})
    prepared = prepare_data(study)
    table = prepared.splits
    pool = table["split"].isin(["train", "val"])
    assert table.loc[pool, "fold"].notna().all() and table.loc[~pool, "fold"].isna().all()
    assert "x_test" not in prepared.arrays  # the test split is still never decoded
    for split in ("train", "val"):
        assert prepared.arrays[f"fold_{split}"].tolist() == table.loc[table["split"] == split, "fold"].tolist()
    plain = prepare_data(Study(name="s", space=_space, dataset=dataset, fixed={"backbone": "cnn_s2"}))
    assert "fold" not in plain.splits.columns and "fold_train" not in plain.arrays  # cv_folds=None: unchanged
    assert table["split"].equals(plain.splits["split"])  # the split itself does not move
    too_many = Study(name="s", space=_space, dataset=dataset, cv_folds=40, fixed={"backbone": "cnn_s2"})
    with pytest.raises(StudyError, match=r"cv_folds: bad value 40; .*use cv_folds <= 17"):
        prepare_data(too_many)


# --- the lucky split ---------------------------------------------------------------------------------------

SETTINGS = dict(max_epochs=2, metric="val_balanced_accuracy", mode="max", class_names=("benign", "malignant"),
                positive=1, seed=7)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path / "cache"))


def lite0(**extra):
    """Frozen ImageNet efficientnet_lite0 on cached features: only a small head trains (seconds)."""
    return {**DEFAULTS, "backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
            "head_units": 0, "dropout": 0.0, "batch_size": 8, "trial_number": 1, **extra}


def run_trial(config, data, monkeypatch, tmp_path, *, cv_folds=None):
    """``fit_classifier`` with ``ray.tune.report`` captured: (models, reported epochs, last checkpoint copy)."""
    import ray.tune

    from trainables.train import TrialSettings, fit_classifier

    reports, saved = [], []

    def report(metrics, checkpoint=None):
        reports.append(dict(metrics))
        if checkpoint is not None:
            saved.append(shutil.copytree(checkpoint.path, tmp_path / f"checkpoint_{len(saved)}_{id(reports)}"))

    monkeypatch.setattr(ray.tune, "report", report)
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = fit_classifier(config, data, TrialSettings(**SETTINGS, cv_folds=cv_folds))
    return models, reports, saved[-1] if saved else None


def lucky_split_data(n_per_class=40, size=48, seed=0):
    """Images whose class shows in their colour (reddish or bluish), and one validation split whose labels
    mostly disagree with it.

    Train (60 images) is labelled by colour; in the validation split (20) three labels in four are flipped:
    the unrepresentative draw a small validation split can be, taken to the extreme. On it a configuration
    that learns the colour scores below chance and one that learns nothing (a constant prediction) scores
    0.5, so the weak configuration wins the one split. Under 4-fold CV on train ∪ val each fold holds about
    a quarter of the odd rows, and the fold mean ranks the configurations as clean data (and a test split) would.
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat([0, 1], n_per_class))
    x = rng.integers(0, 120, (len(y), size, size, 3))
    x[..., 0] += 130 * y[:, None, None]
    x[..., 2] += 130 * (1 - y)[:, None, None]
    x = x.astype(np.uint8)
    n_val = len(y) // 4
    y_val = y[:n_val].copy()
    y_val[: 3 * n_val // 4] = 1 - y_val[: 3 * n_val // 4]
    x_train, y_train, x_val = x[n_val:], y[n_val:], x[:n_val]
    table = pd.DataFrame({"label": np.concatenate([y_train, y_val]).astype(str)})
    split = pd.Series(["train"] * len(y_train) + ["val"] * len(y_val))
    folds = assign_folds(table, split, 4, seed=0).to_numpy(dtype=int)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
            "fold_train": folds[:len(y_train)], "fold_val": folds[len(y_train):]}


def best(reports, metric="val_balanced_accuracy"):
    return max(r[metric] for r in reports)


def test_a_cross_validated_trial_fine_tunes_on_cached_features(fresh_cache, tmp_path, monkeypatch):
    """unfreeze > 0 with a warm-up: each fold builds its own backbone; all train their tops on fold 0's cached
    prefix output (the frozen part is the same pretrained weights). A real study's folds 2..k once got fold 0's
    prefix as their backbone and failed on the cached features."""
    data = lucky_split_data()
    config = lite0(unfreeze=11, warmup_epochs=1, fine_tune_lr=1e-3)
    models, reports, checkpoint = run_trial(config, data, monkeypatch, tmp_path, cv_folds=4)
    assert len(models) == 4 and [r["epoch"] for r in reports] == [1, 2]
    assert all(m.input_shape[1:] == data["x_train"].shape[1:] for m in models)  # every fold takes raw images
    assert all(np.isfinite(r["val_balanced_accuracy"]) for r in reports) and checkpoint is not None
    import keras

    backbones = {id(layer) for m in models for layer in m.layers if isinstance(layer, keras.Model) and layer.name != "head"}
    assert len(backbones) == 4  # each fold fine-tunes its own copy


def test_a_configuration_that_wins_one_lucky_split_loses_under_cross_validation(fresh_cache, tmp_path, monkeypatch):
    from analysis.evaluate import predict_rows
    from trainables.checkpoint import fold_folders, load_classifier

    data = lucky_split_data()
    lucky_a, learns_b = lite0(learning_rate=1e-5), lite0(learning_rate=1e-2)
    one_split = {name: best(run_trial(config, data, monkeypatch, tmp_path)[1])
                 for name, config in (("A", lucky_a), ("B", learns_b))}
    assert one_split["A"] > one_split["B"], one_split  # the one validation split picks A

    cv = {}
    for name, config in (("A", lucky_a), ("B", learns_b)):
        models, reports, checkpoint = run_trial(config, data, monkeypatch, tmp_path, cv_folds=4)
        cv[name] = best(reports)
        assert len(models) == 4 and len(reports) == SETTINGS["max_epochs"]
        assert {"val_balanced_accuracy_std", "val_loss_std", "train_loss_std"} <= set(reports[0])
    assert cv["B"] > cv["A"], cv  # the fold mean picks B
    assert cv["B"] - cv["A"] > 0.15

    # B's last checkpoint holds its 4 fold models (the frozen part once); it loads as their ensemble, and
    # the reported metric is the mean of the fold models' scores on their own held-out folds.
    assert [p.name for p in fold_folders(checkpoint)] == ["fold_0", "fold_1", "fold_2", "fold_3"]
    assert (checkpoint / "frozen.keras").is_file() and (checkpoint / "fold_0" / "top.keras").is_file()
    ensemble = load_classifier(checkpoint)
    x_all = np.concatenate([data["x_train"], data["x_val"]])
    y_all = np.concatenate([data["y_train"], data["y_val"]])
    fold = np.concatenate([data["fold_train"], data["fold_val"]])
    each = [m.predict(x_all, verbose=0) for m in models]
    if reports[-1]["checkpoint_s"] > 0:  # the last epoch checkpointed: the loaded models are the returned ones
        np.testing.assert_allclose(ensemble.predict(x_all, verbose=0), np.mean(each, axis=0), atol=1e-5)
    oof = predict_rows(ensemble, x_all, pd.DataFrame({"fold": fold}), None, 64)  # analysis.evaluate's validation
    from trainables.metrics import classification_metrics

    per_fold = [classification_metrics(y_all[fold == f], oof[fold == f], ["benign", "malignant"], positive=1)
                ["balanced_accuracy"] for f in range(4)]
    assert np.mean(per_fold) == pytest.approx(cv["B"], abs=1e-6)  # the checkpoint is the best epoch's
    test = pd.DataFrame({"fold": pd.array([pd.NA] * 5, dtype="Int64")})  # test rows: the whole ensemble
    np.testing.assert_allclose(predict_rows(ensemble, x_all[:5], test, None, 64),
                               ensemble.predict(x_all[:5], verbose=0), atol=1e-6)


def test_the_cv_folds_flag_overrides_the_study_and_is_a_search_flag():
    from search.run import SEARCH_FLAGS, apply_overrides, given_flags, parse_args

    args = parse_args(["study.py", "--cv-folds", "5"])
    assert "cv_folds" in SEARCH_FLAGS and given_flags(args) == {"cv_folds": 5}  # recorded, re-applied on --resume
    study = Study(name="s", space=_space, fixed={"backbone": "cnn_s2"})
    assert apply_overrides(study, args).cv_folds == 5
    assert apply_overrides(study, parse_args(["study.py"])).cv_folds is None


def test_a_cross_validated_trial_names_cache_entries_by_the_shipped_digests(fresh_cache, tmp_path, monkeypatch):
    """Folds (and augmented banks) use the driver's digests of train and val, as a one-split trial does."""
    import trainables.activation_cache as cache
    from trainables.data import data_digest

    data = lucky_split_data()
    data.update(digest_x_train=data_digest(data["x_train"]), digest_x_val=data_digest(data["x_val"]))

    def no_hashing(x):
        raise AssertionError("a trial hashed the images although the driver shipped their digest")

    monkeypatch.setattr(cache, "data_digest", no_hashing)
    models, reports, _ = run_trial(lite0(), data, monkeypatch, tmp_path, cv_folds=4)
    assert len(models) == 4 and len(reports) == 2
    with pytest.raises(AssertionError, match="hashed the images"):
        run_trial(lite0(trial_number=2), lucky_split_data(), monkeypatch, tmp_path, cv_folds=4)
