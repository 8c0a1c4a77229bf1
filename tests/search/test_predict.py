"""``python -m search.predict``: new images through the best trial of a finished study.

Unit tests use hand-made results folders (no Ray, no model); the ``e2e`` tests
run a real tiny study once and predict with its real checkpoints.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.reader import ResultsFolderError
from analysis.predict import main, parse_args
from analysis.reader import choose_trial

CLASSES = ["benign", "malignant"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def fake_run(folder: Path, rows: list[dict], *, metric="val_balanced_accuracy", mode="max", checkpoints=True,
             name: str | None = None) -> Path:
    """A results folder with study.json and a leaderboard; ``checkpoints`` makes each row's checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    study = {"metric": metric, "mode": mode, "dataset": {"image_size": 32}, **({"name": name} if name else {})}
    (folder / "study.json").write_text(json.dumps({"study": study}))
    for row in rows:
        if checkpoints and row.get("checkpoint_path"):
            checkpoint = folder / row["checkpoint_path"]  # an absolute path stays itself
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "model.keras").write_bytes(b"placeholder")
    pd.DataFrame(rows).to_parquet(folder / "leaderboard.parquet", index=False)
    return folder


def trial_row(name: str, value: float, loss: float = 0.5, checkpoint: bool = True, recorded_in: Path | None = None,
              **extra) -> dict:
    """A leaderboard row; its checkpoint path relative to the results folder, as recorded now, or, with
    ``recorded_in``, the absolute path into that folder that earlier versions recorded."""
    path = f"{name}/checkpoint_000001"
    if recorded_in is not None:
        path = str(recorded_in / path)
    return {"trial_id": name[-5:], "trial_name": name, "status": "finished", "best_val_balanced_accuracy": value,
            "best_val_loss": loss, "checkpoint_path": path if checkpoint else None, **extra}


def write_images(folder: Path) -> dict[str, str]:
    """Mixed inputs: grayscale PNG, RGBA PNG, odd-sized JPEG with an upper-case suffix, in subfolders."""
    rng = np.random.default_rng(0)
    images = {
        "gray.png": Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8), "L"),
        "sub/rgba.png": Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), "RGBA"),
        "sub/deeper/odd.JPG": Image.fromarray(rng.integers(0, 255, (57, 101, 3), dtype=np.uint8), "RGB"),
    }
    for name, image in images.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG" if name.endswith(".JPG") else "PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"not a png either, but hidden files are skipped")
    return {name: image.mode for name, image in images.items()}


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_best(board: pd.DataFrame) -> str:
    usable = board[board["checkpoint_path"].notna()]
    return usable.sort_values(["best_val_balanced_accuracy", "best_val_loss"], ascending=[False, True]).iloc[0]["trial_name"]


# --------------------------------------------------------------------------
# the command line, without Ray
# --------------------------------------------------------------------------


def test_help_shows_an_example_and_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Example: python -m search.predict runs/quickstart" in out
    for flag in ("--trial", "--out", "--no-recursive", "--skip-corrupt", "--batch-size"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["runs/x"], "the following arguments are required: images_dir"),
        (["runs/x", "imgs", "--skip"], "unrecognized arguments: --skip"),  # no abbreviations
        (["runs/x", "imgs", "--batch-size", "0"], "must be a positive integer, got '0'"),
        (["runs/x", "imgs", "--batch-size", "many"], "must be an integer, got 'many'"),
    ],
)
def test_bad_flags_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_folder_without_results_is_refused(tmp_path, capsys):
    images = tmp_path / "images"
    write_images(images)
    code, _, err = run([tmp_path, images], capsys)
    assert code == 2
    assert "is not a results folder: it has no study.json" in err
    assert "run python -m search.run first" in err
    code, _, err = run([tmp_path / "nope", images], capsys)
    assert code == 2 and "does not exist" in err and "run python -m search.run first" in err


def test_images_folder_missing_or_without_images(tmp_path, capsys):
    folder = fake_run(tmp_path / "run", [trial_row("trial_000_cnn_s3", 0.8)])
    code, _, err = run([folder, tmp_path / "missing"], capsys)
    assert code == 2 and f"images folder {str(tmp_path / 'missing')!r} does not exist" in err

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    (empty / ".x.png").write_bytes(b"hidden")
    code, _, err = run([folder, empty], capsys)
    assert code == 2 and "holds no .jpg/.jpeg/.png/.dcm images in it or its subfolders" in err

    Image.new("RGB", (8, 8)).save(empty / "sub" / "a.png")
    code, _, err = run([folder, empty, "--no-recursive"], capsys)
    assert code == 2 and "subfolders not searched: --no-recursive" in err


def test_unknown_trial_gets_a_did_you_mean(tmp_path, capsys):
    folder = tmp_path / "run"
    fake_run(folder, [trial_row("trial_000_cnn_s3", 0.8), trial_row("trial_001_cnn_s2", 0.7)])
    images = tmp_path / "images"
    write_images(images)
    code, _, err = run([folder, images, "--trial", "trial_001_cnn_s"], capsys)
    assert code == 2
    assert "unknown trial 'trial_001_cnn_s'; did you mean 'trial_001_cnn_s2'?" in err
    assert "Valid: trial_000_cnn_s3, trial_001_cnn_s2" in err


def test_no_trial_with_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run"
    rows = [trial_row("trial_000_cnn_s3", float("nan"), checkpoint=False, status="errored", error="ValueError: x")]
    fake_run(folder, rows)
    images = tmp_path / "images"
    write_images(images)
    code, _, err = run([folder, images], capsys)
    assert code == 2 and "no trial in" in err and "has a checkpoint" in err and "'errored': 1" in err
    code, _, err = run([folder, images, "--trial", "trial_000_cnn_s3"], capsys)
    assert code == 2 and "trial 'trial_000_cnn_s3' has no checkpoint (status errored: ValueError: x)" in err


def test_missing_checkpoint_folder_says_the_run_may_have_moved(tmp_path, capsys):
    folder = tmp_path / "run"
    fake_run(folder, [trial_row("trial_000_cnn_s3", 0.8)], checkpoints=False)
    images = tmp_path / "images"
    write_images(images)
    code, _, err = run([folder, images], capsys)
    assert code == 2
    assert ("the checkpoint folder 'trial_000_cnn_s3/checkpoint_000001' of trial_000_cnn_s3 is not in the results "
            f"folder {str(folder)!r}") in err
    assert "was the run moved" in err


def test_best_trial_by_metric_and_mode_with_ties_to_lower_loss(tmp_path):
    folder = tmp_path / "run"
    rows = [
        trial_row("trial_000_a", 0.70, loss=0.40),
        trial_row("trial_001_b", 0.90, loss=0.60),
        trial_row("trial_002_c", 0.90, loss=0.30),  # ties on the metric, lower loss wins
        trial_row("trial_003_d", 0.95, checkpoint=False),  # best, but nothing to load
        trial_row("trial_004_e", float("nan")),
    ]
    fake_run(folder, rows)
    study = {"metric": "val_balanced_accuracy", "mode": "max"}
    chosen = choose_trial(folder, study, None)
    assert chosen.name == "trial_002_c" and chosen.value == 0.9 and chosen.relocated_from is None
    assert chosen.checkpoint == folder / "trial_002_c" / "checkpoint_000001"
    assert choose_trial(folder, study, "trial_000_a").name == "trial_000_a"
    assert choose_trial(folder, study, "000_a").name == "trial_000_a"  # a trial_id works too

    board = pd.read_parquet(folder / "leaderboard.parquet")
    board["best_val_loss"] = [0.4, 0.6, 0.3, 0.1, 0.2]
    board.to_parquet(folder / "leaderboard.parquet")
    assert choose_trial(folder, {"metric": "val_loss", "mode": "min"}, None).name == "trial_004_e"


def test_a_moved_results_folder_finds_its_checkpoints(tmp_path):
    old = tmp_path / "old" / "run"
    rows = [trial_row("trial_000_a", 0.7, recorded_in=old)]  # written by an earlier version: absolute
    new = fake_run(tmp_path / "new" / "run", rows, checkpoints=False)
    (new / "trial_000_a" / "checkpoint_000001").mkdir(parents=True)
    (new / "trial_000_a" / "checkpoint_000001" / "model.keras").write_bytes(b"placeholder")
    chosen = choose_trial(new, {"metric": "val_balanced_accuracy", "mode": "max"}, None)
    assert chosen.checkpoint == new / "trial_000_a" / "checkpoint_000001"
    assert chosen.relocated_from == str(old / "trial_000_a" / "checkpoint_000001")


@pytest.mark.parametrize("copy_name", ["tiny", "tiny-backup"])
def test_a_copy_reads_its_own_checkpoints_never_those_at_the_recorded_place(tmp_path, copy_name):
    """Copy runs/tiny away, run a new study under the old name: the copy still holds, and uses, its own models."""
    first = tmp_path / "runs" / "tiny"
    fake_run(first, [trial_row("trial_000_a", 0.7, recorded_in=first)], name="tiny")  # an earlier version's record
    copy = shutil.copytree(first, tmp_path / "backup" / copy_name)
    study = {"metric": "val_balanced_accuracy", "mode": "max", "name": "tiny"}
    chosen = choose_trial(copy, study, None)
    assert chosen.checkpoint == copy / "trial_000_a" / "checkpoint_000001"
    assert chosen.relocated_from == str(first / "trial_000_a" / "checkpoint_000001")

    shutil.rmtree(copy / "trial_000_a")  # lost in the copy: the first place still has it, and is not read
    with pytest.raises(ResultsFolderError, match=f"is not in the results folder {str(copy)!r}"):
        choose_trial(copy, study, None)


def test_a_relative_checkpoint_path_is_read_inside_the_folder(tmp_path, monkeypatch):
    folder = fake_run(tmp_path / "tiny", [trial_row("trial_000_a", 0.7)], name="tiny")
    assert pd.read_parquet(folder / "leaderboard.parquet")["checkpoint_path"].tolist() == ["trial_000_a/checkpoint_000001"]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative to the folder, not to where the command runs
    chosen = choose_trial(folder, {"metric": "val_balanced_accuracy", "mode": "max", "name": "tiny"}, None)
    assert chosen.checkpoint == folder / "trial_000_a" / "checkpoint_000001" and chosen.relocated_from is None


def _outside_checkpoint(tmp_path: Path) -> Path:
    """A model outside the results folder, in a folder not named after the study."""
    outside = tmp_path / "elsewhere" / "trial_000_a" / "checkpoint_000001"
    outside.mkdir(parents=True)
    (outside / "model.keras").write_bytes(b"placeholder")
    return outside


@pytest.mark.parametrize("escape", ["dot-dot", "absolute elsewhere", "uri elsewhere", "linked trial folder",
                                    "linked model file"])
def test_a_checkpoint_path_that_leaves_the_folder_is_refused(tmp_path, escape):
    from search.storage import OutsideFolderError

    outside = _outside_checkpoint(tmp_path)
    folder = tmp_path / "runs" / "tiny"
    recorded = {"dot-dot": "../../elsewhere/trial_000_a/checkpoint_000001", "absolute elsewhere": str(outside),
                "uri elsewhere": f"file://{outside}"}.get(escape, "trial_000_a/checkpoint_000001")
    row = trial_row("trial_000_a", 0.7)
    row["checkpoint_path"] = recorded
    fake_run(folder, [row], checkpoints=False, name="tiny")
    if escape == "linked trial folder":
        (folder / "trial_000_a").symlink_to(outside.parent, target_is_directory=True)
    elif escape == "linked model file":
        (folder / "trial_000_a" / "checkpoint_000001").mkdir(parents=True)
        (folder / "trial_000_a" / "checkpoint_000001" / "model.keras").symlink_to(outside / "model.keras")
    with pytest.raises(OutsideFolderError) as info:
        choose_trial(folder, {"metric": "val_balanced_accuracy", "mode": "max", "name": "tiny"}, None)
    message = str(info.value)
    assert repr(recorded) in message and repr(str(folder)) in message and "trial_000_a" in message


def test_a_cached_trials_checkpoint_predicts_like_its_classifier(tmp_path, capsys):
    """A trial on cached features saves its frozen backbone and head apart; predict joins them again."""
    from trainables.activation_cache import shared_backbone
    from trainables.checkpoint import save_classifier
    from trainables.data import decode_image
    from trainables.model import build_model
    from trainables.hparams import DEFAULTS

    hp = {**DEFAULTS, "backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "head_units": 8}
    frozen = shared_backbone("efficientnet_lite0", weights="imagenet", input_shape=(32, 32, 3))
    model, _ = build_model(hp, input_shape=(32, 32, 3), num_classes=2, seed=3, backbone=frozen.model)
    head = model.get_layer("head")
    head.set_weights([w * 4 for w in head.get_weights()])  # probabilities well apart from 0.5, yet not saturated
    folder = fake_run(tmp_path / "run", [trial_row("trial_000_efficientnet_lite0", 0.8)],
                      checkpoints=False)
    checkpoint = folder / "trial_000_efficientnet_lite0" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    save_classifier(checkpoint, model, frozen=frozen, top=head)
    (checkpoint / "trial.json").write_text(json.dumps({"epoch": 1, "class_names": CLASSES}))
    images = tmp_path / "images"
    write_images(images)

    code, _, err = run([folder, images, "--out", tmp_path / "preds.csv"], capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "preds.csv")
    expected = model.predict(np.stack([decode_image(str(images / f), 32) for f in table["file"]]), verbose=0)
    np.testing.assert_allclose(table[["prob_benign", "prob_malignant"]].to_numpy(), expected, atol=1e-5)


# --------------------------------------------------------------------------
# end to end: a real tiny study, real checkpoints
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two small CNN trials of one epoch each, run once for every e2e test here."""
    from fixtures.studies import TINY_STUDY  # noqa: PLC0415

    from search.run import main as run_main

    folder = tmp_path_factory.mktemp("predict_e2e")
    study = folder / "tiny.py"
    study.write_text("from search import Dataset, Study\n" + TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "1"))
    assert run_main([str(study), "--storage", str(folder / "runs"), "--seed", "5"]) == 0
    run_dir = folder / "runs" / "tiny"
    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    assert board["checkpoint_path"].notna().all(), board[["trial_name", "status", "error"]]
    return run_dir


@pytest.mark.e2e
def test_mixed_images_are_predicted_with_the_best_trial(tiny_run, tmp_path, capsys):
    images = tmp_path / "new images"
    modes = write_images(images)
    out = tmp_path / "out" / "preds.csv"
    code, stdout, err = run([tiny_run, images, "--out", out], capsys)
    assert code == 0, err
    table = pd.read_csv(out)
    assert list(table.columns) == ["file", "predicted", "prob_benign", "prob_malignant", "model", "members", "tta",
                                   "temperature", "threshold", "ood", "feature_distance", "study_image", "warning"]
    assert sorted(table["file"]) == sorted(modes)  # one row per image, relative paths, subfolders searched
    probs = table[["prob_benign", "prob_malignant"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) and (probs >= 0).all()
    assert (table["predicted"] == [CLASSES[k] for k in probs.argmax(axis=1)]).all()

    best = expected_best(pd.read_parquet(tiny_run / "leaderboard.parquet"))
    assert f"the final model is the best trial on validation, {best}, uncalibrated" in stdout
    assert set(table["model"]) == {best} and table["temperature"].isna().all()
    assert "predicted 3 image(s)" in stdout and f"predictions: {out}" in stdout
    counts = table["predicted"].value_counts()
    for name in CLASSES:
        assert any(line.split()[:2] == [name, str(counts.get(name, 0))] for line in stdout.splitlines())
    assert "ignored 1 file(s)" in err  # notes.txt; the hidden file is skipped without a word

    code, _, err = run([tiny_run, images, "--out", out, "--no-recursive"], capsys)
    assert code == 0, err
    assert pd.read_csv(out)["file"].tolist() == ["gray.png"]


@pytest.mark.e2e
def test_predictions_reproduce_the_validation_metric(tiny_run, tmp_path, capsys):
    """Decoding and resizing match training: on the val split the CSV gives the leaderboard's numbers."""
    from trainables.metrics import classification_metrics

    from analysis.splits import read_split

    val = read_split(tiny_run, "val")  # path: where each image is on this machine
    images = tmp_path / "val"
    for row in val.itertuples():
        (images / row.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, images / row.label / Path(row.path).name)
    code, stdout, err = run([tiny_run, images], capsys)  # default out: RUN_DIR/predictions.csv
    assert code == 0, err
    assert "in the study's splits" not in stdout  # copies are not the study's own files by path (by content: ood.py)
    table = pd.read_csv(tiny_run / "predictions.csv")
    assert len(table) == len(val)
    y_true = table["file"].str.split("/").str[0].map(CLASSES.index).to_numpy()
    scores = classification_metrics(y_true, table[["prob_benign", "prob_malignant"]].to_numpy(), CLASSES, positive=1)

    board = pd.read_parquet(tiny_run / "leaderboard.parquet").set_index("trial_name")
    trial = board.loc[expected_best(board.reset_index())]
    assert scores["balanced_accuracy"] == pytest.approx(trial["best_val_balanced_accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(trial["best_val_loss"], abs=1e-3)


@pytest.mark.e2e
def test_a_photograph_stored_turned_is_predicted_upright(tiny_run, tmp_path, capsys):
    """A JPEG stored 128 x 64 with EXIF orientation 6 used to get exactly the probabilities of its stored
    (unturned) pixels; it gets those of the image a viewer shows, and the summary says it was rotated."""
    from fixtures.datasets import upright_picture, write_rotated_jpeg

    images = tmp_path / "phone"
    shown = write_rotated_jpeg(images / "lesion.jpg", upright_picture())
    Image.fromarray(shown).save(images / "upright.png")  # the pixels a viewer shows, stored upright, no tag
    with Image.open(images / "lesion.jpg") as stored:
        stored.convert("RGB").save(images / "as_stored.png")  # the stored pixels, as they were read before
    code, stdout, err = run([tiny_run, images, "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    probs = pd.read_csv(tmp_path / "p.csv").set_index("file")[["prob_benign", "prob_malignant"]]
    assert np.allclose(probs.loc["lesion.jpg"], probs.loc["upright.png"], atol=1e-6), probs
    assert not np.allclose(probs.loc["lesion.jpg"], probs.loc["as_stored.png"], atol=1e-4), probs
    assert "note: 1 image(s) rotated by their EXIF orientation (read upright, as a viewer shows them)" in stdout


@pytest.mark.e2e
def test_another_trial_can_be_chosen(tiny_run, tmp_path, capsys):
    board = pd.read_parquet(tiny_run / "leaderboard.parquet")
    other = board[board["trial_name"] != expected_best(board)].iloc[0]["trial_name"]
    images = tmp_path / "images"
    write_images(images)
    code, stdout, err = run([tiny_run, images, "--trial", other, "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert f"trial {other} alone (--trial), uncalibrated" in stdout
    code, _, err = run([tiny_run, images, "--trial", other[:-1]], capsys)
    assert code == 2 and f"did you mean {other!r}?" in err


@pytest.mark.e2e
def test_corrupt_images_stop_the_run_unless_skipped(tiny_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 120, 90)).save(images / "good.png")
    (images / "garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    png = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    out = tmp_path / "p.csv"

    code, _, err = run([tiny_run, images, "--out", out], capsys)
    assert code == 2
    assert "2 of 3 image(s)" in err and "garbage.jpg (" in err and "truncated.png (" in err and "--skip-corrupt" in err
    assert not out.exists()

    code, stdout, err = run([tiny_run, images, "--out", out, "--skip-corrupt"], capsys)
    assert code == 0, err
    assert "skipped 2 unreadable image(s)" in err and "garbage.jpg" in err
    assert "predicted 1 image(s)" in stdout
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    assert list(table.columns) == ["predicted", "prob_benign", "prob_malignant", "model", "members", "tta",
                                   "temperature", "threshold", "ood", "feature_distance", "study_image", "warning",
                                   "error"]
    assert table.loc["good.png", "predicted"] in CLASSES and table.loc["good.png", "error"] == ""
    for name in ("garbage.jpg", "truncated.png"):
        assert table.loc[name, "predicted"] == "" and table.loc[name, "error"]


@pytest.mark.e2e
def test_moved_run_folder_still_works_and_a_lost_checkpoint_is_named(tiny_run, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tiny_run, moved)
    board = pd.read_parquet(moved / "leaderboard.parquet")
    board["checkpoint_path"] = [str(Path("/gone/runs/tiny") / Path(p).parent.name / Path(p).name)
                                for p in board["checkpoint_path"]]
    board.to_parquet(moved / "leaderboard.parquet", index=False)
    images = tmp_path / "images"
    write_images(images)

    code, stdout, err = run([moved, images], capsys)
    assert code == 0, err
    assert "note: checkpoint found in the moved run folder, not at /gone/runs/tiny/" in stdout
    assert len(pd.read_csv(moved / "predictions.csv")) == 3

    for trial_dir in moved.glob("trial_*"):
        shutil.rmtree(trial_dir)
    code, _, err = run([moved, images], capsys)
    assert code == 2 and "the checkpoint folder '/gone/runs/tiny/" in err and "was the run moved" in err


# --------------------------------------------------------------------------
# the final model's temperature and threshold (final_model.json, written by analysis.evaluate)
# --------------------------------------------------------------------------


def test_threshold_flag_must_be_a_probability(capsys):
    for bad, message in (("1.5", "must be strictly between 0 and 1, got '1.5'"), ("x", "must be a number, got 'x'")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["runs/x", "imgs", "--threshold", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.e2e
def test_the_stored_temperature_and_threshold_are_applied_and_threshold_overrides(tiny_run, tmp_path, capsys):
    from analysis.calibration import apply_temperature

    folder = shutil.copytree(tiny_run, tmp_path / "tiny")
    images = tmp_path / "images"
    write_images(images)
    code, stdout, err = run([folder, images, "--out", tmp_path / "raw.csv"], capsys)
    assert code == 0, err
    assert "no final_model.json in the results folder" in stdout
    raw = pd.read_csv(tmp_path / "raw.csv").set_index("file")[["prob_benign", "prob_malignant"]].to_numpy()

    best = expected_best(pd.read_parquet(folder / "leaderboard.parquet"))
    calibrated = apply_temperature(raw, 3.0)
    threshold = float(np.sort(calibrated[:, 1])[:2].mean())  # between the lowest two: one benign, two malignant
    checkpoint = pd.read_parquet(folder / "leaderboard.parquet").set_index("trial_name").loc[best, "checkpoint_path"]
    (folder / "final_model.json").write_text(json.dumps({
        "class_names": CLASSES, "positive_class": "malignant", "model": best, "trials": [best], "tta": None,
        "checkpoints": [checkpoint], "temperature": 3.0, "threshold": threshold,
        "threshold_rule": "target sensitivity 0.95 on validation", "chosen_by": "given",
        "per_trial": {best: {"temperature": 3.0, "threshold": {"class": "malignant", "value": threshold,
                                                               "rule": "target sensitivity 0.95 on validation"}}}}))
    code, stdout, err = run([folder, images, "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "p.csv").set_index("file")
    np.testing.assert_allclose(table[["prob_benign", "prob_malignant"]].to_numpy(), calibrated, atol=2e-6)
    assert table["predicted"].tolist() == ["malignant" if p >= threshold else "benign" for p in calibrated[:, 1]]
    assert sorted(table["predicted"]) == ["benign", "malignant", "malignant"]
    assert "temperature 3.0000" in stdout
    assert f"'malignant' when its calibrated probability >= {threshold:.4f}" in stdout

    code, stdout, err = run([folder, images, "--out", tmp_path / "q.csv", "--threshold", "0.999999"], capsys)
    assert code == 0, err
    assert pd.read_csv(tmp_path / "q.csv")["predicted"].tolist() == ["benign"] * 3
    assert "threshold 0.999999 from --threshold (replaces" in stdout

    record = json.loads((folder / "final_model.json").read_text())
    record["class_names"] = CLASSES[::-1]  # a record fitted for another class order is refused
    (folder / "final_model.json").write_text(json.dumps(record))
    code, _, err = run([folder, images, "--out", tmp_path / "r.csv"], capsys)
    assert code == 2 and "final_model.json was fitted for classes ['malignant', 'benign']" in err


@pytest.mark.e2e
def test_a_loop_of_links_in_the_images_folder_is_left_out_with_a_note(tiny_run, tmp_path, capsys):
    """Following a link that loops raised OSError out of the listing (a traceback); now it is named and skipped."""
    from PIL import Image

    images = tmp_path / "new"
    images.mkdir()
    Image.new("RGB", (40, 40), (180, 90, 60)).save(images / "lesion.png")
    (images / "loop_a").symlink_to("loop_b")
    (images / "loop_b").symlink_to("loop_a")
    code, stdout, err = run([tiny_run, images, "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert "ignored 2 broken link(s) or special file(s) (loop_a, loop_b)" in stdout + err
    assert pd.read_csv(tmp_path / "p.csv")["file"].tolist() == ["lesion.png"]
