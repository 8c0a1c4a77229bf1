"""Grad-CAM (analysis.explain): every backbone, nested and cached checkpoints, a map that follows the lesion,
``search.predict --explain`` and the report's panel."""

import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.explain import (ExplainError, explain_section, gradcam, overlay, overlay_names, target_layer)
from trainables.backbones import list_backbones
from trainables.hparams import DEFAULTS
from trainables.model import build_model

SIZE = 48  # the ImageNet backbones' maps are 2 x 2 here, the small CNNs' finer


def _predict_helpers():
    """tests/search/test_predict.py's helpers (a results folder, its images, running the command)."""
    path = Path(__file__).resolve().parents[1] / "search" / "test_predict.py"
    spec = importlib.util.spec_from_file_location("_test_predict_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _predict_helpers()


def hp(backbone, **changes):
    small = backbone.startswith("cnn_")  # the reference studies' CNNs flatten
    return {**DEFAULTS, "backbone": backbone, "pooling": "flatten" if small else "avg", "head_units": 8, **changes}


# --------------------------------------------------------------------------
# every backbone
# --------------------------------------------------------------------------

# The rule (the last 4-D map before the head, past trailing pooling and dropout) picks these:
EXPECTED_TARGETS = {"vgg16": "block5_conv3", "resnet50": "conv5_block3_out", "densenet121": "relu",
                    "mobilenet_v2": "out_relu",
                    **{f"efficientnet_{v}": "top_activation" for v in ("b0", "b1", "lite0", "lite1", "lite2")}}
SMALL_CNN_TARGETS = {"cnn_s3": keras.layers.Conv2D, "cnn_s2": keras.layers.BatchNormalization}


@pytest.mark.parametrize("backbone", list_backbones())
def test_gradcam_on_every_registered_backbone(backbone):
    keras.utils.set_random_seed(0)
    model, built = build_model(hp(backbone), input_shape=(SIZE, SIZE, 3), num_classes=3, seed=0)
    target = target_layer(model)
    assert target.path[0] is built  # found inside the nested backbone
    assert len(target.layer.output.shape) == 4
    if backbone in SMALL_CNN_TARGETS:
        assert isinstance(target.layer, SMALL_CNN_TARGETS[backbone])
    else:
        assert target.layer.name == EXPECTED_TARGETS[backbone], target.name
    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    maps = gradcam(model, x, [0, 1, 2], target=target)  # one class per image
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    if backbone.startswith("cnn_"):  # fine maps: not uniform even with random weights
        assert (maps.max(axis=(1, 2)) - maps.min(axis=(1, 2)) > 0.5).all()
        predicted = model.predict(x, verbose=0).argmax(axis=1)
        np.testing.assert_allclose(gradcam(model, x), gradcam(model, x, predicted), atol=1e-6)  # None: the argmax
        np.testing.assert_allclose(gradcam(model, x, 2), gradcam(model, x, [2, 2, 2]), atol=1e-6)  # int: for all


def test_bad_inputs_are_named_errors():
    model, _ = build_model(hp("cnn_s3"), input_shape=(32, 32, 3), num_classes=2, seed=0)
    with pytest.raises(ExplainError, match=r"class_index must be in \[0, 2\), got \[5\]"):
        gradcam(model, np.zeros((1, 32, 32, 3)), 5)
    with pytest.raises(ExplainError, match="must be \\(N, H, W, 3\\) RGB"):
        gradcam(model, np.zeros((32, 32, 3)))
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ExplainError, match="has no convolutional feature map"):
        target_layer(dense)


def test_cached_trials_checkpoints_explain_like_their_classifier(tmp_path):
    """A trial on cached features is saved as frozen part + top; the joined model nests the map one or two
    levels deeper (classifier -> cached_top -> the backbone's top layers), and gives the same maps."""
    from trainables.activation_cache import frozen_part, split_backbone
    from trainables.backbones import create_backbone
    from trainables.checkpoint import load_classifier, save_classifier
    from trainables.train import cached_top

    shape = (64, 64, 3)
    backbone = create_backbone("efficientnet_lite0", input_shape=shape, weights="imagenet")
    model, _ = build_model(hp("efficientnet_lite0", weights="imagenet", unfreeze=0), input_shape=shape,
                           num_classes=2, seed=3, backbone=backbone)
    x = np.random.default_rng(1).uniform(0, 255, (2, *shape)).astype("float32")
    expected = gradcam(model, x)
    assert (expected.reshape(2, -1).std(axis=1) > 0.05).all()
    # unfreeze 0: the frozen part is the whole backbone, the top is the head
    (tmp_path / "zero").mkdir()
    save_classifier(tmp_path / "zero", model, frozen=frozen_part(backbone), top=model.get_layer("head"))
    loaded = load_classifier(tmp_path / "zero")
    assert target_layer(loaded).name == "efficientnet_lite0/top_activation"
    np.testing.assert_allclose(gradcam(loaded, x), expected, atol=1e-4)
    # unfreeze 3: the frozen part ends below the backbone's top 3 layers, which the top holds with the head
    prefix, suffix, _ = split_backbone(backbone, 3)
    (tmp_path / "three").mkdir()
    save_classifier(tmp_path / "three", model, frozen=frozen_part(prefix),
                    top=cached_top(suffix, model.get_layer("head"), prefix.output.shape[1:]))
    loaded = load_classifier(tmp_path / "three")
    assert target_layer(loaded).name == "cached_top/efficientnet_lite0_top3/top_activation"
    np.testing.assert_allclose(gradcam(loaded, x), expected, atol=1e-4)


# --------------------------------------------------------------------------
# the map follows the lesion
# --------------------------------------------------------------------------

LESION = 48  # px
BAR = (slice(40, 44), slice(4, 44))  # a ruler-like bright bar in every image, whatever the class


def lesion_image(rng, centre=None) -> np.ndarray:
    """Dark noisy skin, the fixed bar, and (with ``centre``) a bright round lesion, which makes class 1."""
    image = rng.normal(40, 12, (LESION, LESION, 1)).clip(0, 255) * np.ones(3)
    image[BAR] = 200
    if centre is not None:
        y, x = np.mgrid[:LESION, :LESION]
        image += 200 * np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * 4.0 ** 2))[..., None]
    return image.clip(0, 255).astype("float32")


def lesion_set(seed: int, n: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = [lesion_image(rng, rng.uniform(6, 34, 2) if label else None) for label in labels]
    return np.stack(images), labels


@pytest.fixture(scope="module")
def lesion_model():
    """cnn_s3, trained for a few seconds to tell a bright lesion (anywhere) from none; the bar is in both."""
    keras.utils.set_random_seed(0)
    model, _ = build_model(hp("cnn_s3", pooling="avg", head_units=0, dropout=0.0), input_shape=(LESION, LESION, 3),
                           num_classes=2, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x, y = lesion_set(0, 384)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0, shuffle=False)
    x_test, y_test = lesion_set(1, 200)
    accuracy = (model.predict(x_test, verbose=0).argmax(axis=1) == y_test).mean()
    assert accuracy >= 0.95, accuracy  # it learnt the lesion, so its maps mean something
    return model


def test_the_peak_follows_the_lesion_not_the_fixed_bar(lesion_model):
    yy, xx = np.mgrid[:LESION, :LESION]
    peaks = []
    for centre in [(12, 12), (30, 30), (12, 30), (30, 10)]:
        image = lesion_image(np.random.default_rng(2), centre)
        assert lesion_model.predict(image[None], verbose=0)[0].argmax() == 1
        heatmap = gradcam(lesion_model, image[None])[0]  # the predicted class: lesion
        peak = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= 5, (centre, peak)
        on_lesion = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 6 ** 2
        assert heatmap.max() - heatmap.min() > 0.5  # not uniform
        assert heatmap[on_lesion].mean() > 4 * heatmap[~on_lesion].mean()
        assert heatmap[on_lesion].mean() > 2 * heatmap[BAR].mean()  # the bar is in every image: no evidence
        peaks.append(peak)
    shift = np.subtract(peaks[1], peaks[0])  # the lesion moved by (18, 18)
    assert np.abs(shift - 18).max() <= 5, peaks


# --------------------------------------------------------------------------
# overlays and names
# --------------------------------------------------------------------------


def test_overlay_blends_the_colour_map_over_the_image():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    heatmap = np.zeros((4, 4), dtype=np.float32)
    heatmap[:2, :2] = 1.0  # resized to the image
    out = overlay(image, heatmap)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    hot, cold = out[0, 0].astype(int), out[7, 7].astype(int)
    assert hot[0] > hot[2] and hot[0] > 100  # jet: red where the map is 1
    assert cold[2] > cold[0]  # blue where it is 0
    np.testing.assert_array_equal(overlay(image, np.zeros((8, 8)), alpha=0.0), image)


def test_overlay_names_are_flat_safe_and_unique():
    assert overlay_names(["gray.png", "sub/deeper/odd.JPG", "a b/c?.png", "a_b/c_.png", "A_B/C_.png", ".x.png"]) == [
        "gray.png.png", "sub__deeper__odd.JPG.png", "a_b__c_.png.png", "a_b__c_.png-2.png", "A_B__C_.png-3.png",
        "x.png.png"]


# --------------------------------------------------------------------------
# search.predict --explain
# --------------------------------------------------------------------------


def cnn_run(folder: Path, size: int = 32) -> Path:
    """A results folder (tests/search/test_predict.py's) with one real cnn_s3 checkpoint."""
    from trainables.checkpoint import save_classifier

    run = P.fake_run(folder, [P.trial_row("trial_000_cnn_s3", 0.8)], checkpoints=False)
    checkpoint = run / "trial_000_cnn_s3" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    model, _ = build_model(hp("cnn_s3"), input_shape=(size, size, 3), num_classes=2, seed=0)
    save_classifier(checkpoint, model)
    (checkpoint / "trial.json").write_text(json.dumps({"epoch": 1, "class_names": P.CLASSES}))
    return run


def test_predict_explain_writes_one_overlay_per_image(tmp_path, capsys):
    run = cnn_run(tmp_path / "run")
    images = tmp_path / "images"
    written = P.write_images(images)  # gray.png, sub/rgba.png, sub/deeper/odd.JPG
    out = tmp_path / "explained"
    code, stdout, err = P.run([run, images, "--out", tmp_path / "preds.csv", "--explain", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(overlay_names(sorted(written)))
    for png in out.iterdir():
        with Image.open(png) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (224, 224)
    assert f"explanations: 3 Grad-CAM overlay(s) in {out}" in stdout


def test_predict_explain_into_a_file_is_refused(tmp_path, capsys):
    run = cnn_run(tmp_path / "run")
    images = tmp_path / "images"
    P.write_images(images)
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"x")
    code, _, err = P.run([run, images, "--out", tmp_path / "preds.csv", "--explain", taken], capsys)
    assert code == 2
    assert f"--explain {str(taken)!r} is a file; give a folder" in err


# --------------------------------------------------------------------------
# the report's panel
# --------------------------------------------------------------------------


def evaluated_run(folder: Path, *, evaluated: bool = True) -> Path:
    """A results folder whose test split (8 images per class) analysis.evaluate scored: some right, some wrong."""
    run = cnn_run(folder, size=32)
    study = json.loads((run / "study.json").read_text())
    study["study"]["seed"] = 7
    (run / "study.json").write_text(json.dumps(study))
    rng = np.random.default_rng(0)
    rows = []
    for label_index, label in enumerate(P.CLASSES):
        for i in range(8):
            path = folder / "data" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
            rows.append({"path": str(path), "label": label, "label_index": label_index,
                         "split": "test" if i < 6 else "train"})
    splits = pd.DataFrame(rows)
    splits.to_parquet(run / "splits.parquet", index=False)
    if evaluated:
        test = splits[splits["split"] == "test"].reset_index(drop=True)
        wrong = np.arange(len(test)) % 3 == 0
        predicted = [P.CLASSES[1 - k] if w else P.CLASSES[k] for k, w in zip(test["label_index"], wrong)]
        p = np.where(wrong, 0.3, 0.8)
        # paths as analysis.evaluate writes them: relative to the dataset's root (the folder stays sealed)
        pd.DataFrame({"trial": "trial_000_cnn_s3", "path": [f"{label}/{Path(p).name}" for label, p in
                                                            zip(test["label"], test["path"])], "label": test["label"],
                      "label_index": test["label_index"], "predicted": predicted,
                      "prob_benign": np.where(test["label_index"] == 0, p, 1 - p),
                      "prob_malignant": np.where(test["label_index"] == 1, p, 1 - p)}
                     ).to_parquet(run / "test_predictions.parquet", index=False)
        (run / "test_evaluation.json").write_text(json.dumps({
            "test_split_log": [{"test_split_used_at": "2025-01-01T00:00:00+00:00"}],
            "evaluations": [{"split": "test", "n": len(test), "trials": [
                {"rank": 1, "trial_name": "trial_000_cnn_s3", "class_names": P.CLASSES}]}]}))
    return run


def test_the_panel_is_a_seeded_sample_of_correct_and_wrong_test_images(tmp_path, monkeypatch):
    from analysis import explain
    from analysis.plots import read_test_evaluation
    from analysis.records import latest_evaluation
    from analysis.tables import load_run

    run_dir = evaluated_run(tmp_path)
    decoded = []
    real = explain.decode_split

    def decode_split(rows, size):
        decoded.append(list(rows["path"]))
        return real(rows, size)

    monkeypatch.setattr(explain, "decode_split", decode_split)
    run = load_run(run_dir)
    section = explain_section(run, latest_evaluation(read_test_evaluation(run)))
    assert section.title == "Where the model looks"
    plots = [block for kind, block in section.blocks if kind == "plot"]
    assert len(plots) == 1 and plots[0].path.is_file(), section.blocks
    assert plots[0].path == run_dir / "report_files" / "gradcam_test.png"
    text = " ".join(block for kind, block in section.blocks if kind == "text")
    assert "trial_000_cnn_s3" in text and "seed (7)" in text and "cnn_s3/" in text
    assert "benign: 4 correct, 2 wrong" in text and "malignant: 4 correct, 2 wrong" in text
    # only evaluated test images, at most 3 per class and outcome: 3 + 2 per class
    test_paths = set(run.splits.loc[run.splits["split"] == "test", "path"])
    assert len(decoded) == 1 and len(decoded[0]) == 10 and set(decoded[0]) <= test_paths
    first = plots[0].path.read_bytes()
    again = explain_section(load_run(run_dir), latest_evaluation(read_test_evaluation(run)))
    assert decoded[1] == decoded[0]  # the same sample every time
    assert [b for k, b in again.blocks if k == "plot"][0].path.read_bytes() == first


def test_without_a_test_evaluation_no_test_image_is_read(tmp_path, monkeypatch):
    from analysis import explain
    from analysis.plots import read_test_evaluation
    from analysis.records import latest_evaluation
    from analysis.tables import load_run

    def refuse(rows, size):
        raise AssertionError("the panel read test images before analysis.evaluate ran")

    monkeypatch.setattr(explain, "decode_split", refuse)
    run = load_run(evaluated_run(tmp_path, evaluated=False))
    section = explain_section(run, latest_evaluation(read_test_evaluation(run)))
    text = " ".join(block for kind, block in section.blocks if kind == "text")
    assert "Not drawn" in text and "python -m analysis.evaluate" in text and "never reads the test split" in text
    assert not [b for k, b in section.blocks if k == "plot"]
