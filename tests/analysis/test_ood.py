"""Out-of-distribution warnings (``analysis.ood``): the session's real tiny study (embedded images, 48 px on disk,
trained at 32), real image files: copies of its images, real dermoscopy photographs, fresh synthetic lesions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fixtures.datasets import shared_dataset


@pytest.fixture(scope="module")
def study(run_dir, tmp_path_factory):
    """A copy of the tiny study with its reference fitted once (the tests write into the copy, never the original)."""
    from analysis.ood import reference_for

    folder = shutil.copytree(run_dir, tmp_path_factory.mktemp("ood") / "tiny")
    lines = []
    reference = reference_for(folder, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("fitted the out-of-distribution reference on ")
    return folder, reference


def study_images(folder: Path, split: str) -> pd.DataFrame:
    """The rows of ``split`` in splits.parquet with ``image`` (as recorded) and ``path`` (on this machine)."""
    from analysis.splits import located, read_splits

    table = read_splits(folder / "splits.parquet")
    return located(folder, table[table["split"] == split].reset_index(drop=True))


def photographs(n: int) -> list[Path]:
    """``n`` real dermoscopy photographs (224 x 224 JPEGs) from the shared melanoma10k set."""
    return sorted((shared_dataset("melanoma10k") / "train" / "malignant").glob("*.jpg"))[:n]


def fresh_lesions(folder: Path, n_per_class: int = 4) -> list[Path]:
    """Synthetic lesions of the study's own kind and size (48 px) from another seed: none is an image of the study."""
    from trainables.datasets.embedded import generate_embedded

    root = generate_embedded(folder, n_per_class=n_per_class, image_size=48, seed=12345)
    return sorted(root.glob("*/*.png"))


def test_a_copied_training_image_is_recognised_by_its_content_wherever_it_lies(study, tmp_path):
    from analysis.ood import check

    folder, reference = study
    train = study_images(folder, "train").iloc[:2]
    elsewhere = tmp_path / "new patients"
    elsewhere.mkdir()
    same_bytes = shutil.copyfile(train["path"].iloc[0], elsewhere / "patient_1.png")
    reencoded = elsewhere / "patient_2.jpg"  # other bytes, other name: found by its perceptual hash
    Image.open(train["path"].iloc[1]).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(reencoded,
                                                                                                     quality=85)

    found = check(reference, [same_bytes, reencoded])
    assert found["study_image"].tolist() == [f"train/{name}" for name in train["image"]]
    assert found["warning"].iloc[0].startswith(f"same file as {train['image'].iloc[0]} (an image of the study's "
                                               "train split")
    assert found["warning"].iloc[1].startswith(f"same image as {train['image'].iloc[1]} (pHash ")
    assert not found["ood"].any()  # a copy of a training image is in distribution; it is only no fair test


def test_a_real_photograph_is_flagged_by_its_size_and_its_features(study):
    from analysis.ood import check

    _, reference = study
    found = check(reference, photographs(3))
    assert found["ood"].all()
    for warning, distance in zip(found["warning"], found["feature_distance"]):
        assert "size 224x224 px, training images 48x48" in warning
        assert f"feature distance {distance:.2f} > {reference.threshold:.2f} (99th percentile of validation)" in warning
    assert (found["study_image"] == "").all()


def test_fresh_lesions_like_the_training_images_are_not_flagged(study, tmp_path):
    from analysis.ood import check

    _, reference = study
    found = check(reference, fresh_lesions(tmp_path / "fresh"))
    assert not found["ood"].any(), found["warning"].tolist()
    assert (found["warning"] == "").all() and (found["study_image"] == "").all()
    assert (found["feature_distance"] <= reference.threshold).all()


def test_the_reference_is_cached_names_no_place_and_never_decodes_the_test_split(study):
    from analysis.files import OOD_REFERENCE
    from analysis.ood import load_reference, reference_for
    from analysis.splits import image_paths

    folder, reference = study
    lines = []
    assert reference_for(folder, log=lines.append).meta == reference.meta and lines == []  # read back, not refitted
    written = pd.read_parquet(folder / OOD_REFERENCE)
    test = written[written["split"] == "test"]
    assert len(test) == len(study_images(folder, "test")) > 0
    assert test["phash"].isna().all() and test["embedding"].isna().all() and test["width"].isna().all()
    root = image_paths(folder, study_images(folder, "train")["image"][:1])[0].rsplit("/", 2)[0]
    text = written.drop(columns=["embedding", "phash"]).astype(str).to_csv() + str(written.attrs)
    assert str(folder) not in text and root not in text and not any(Path(n).is_absolute() for n in written["image"])

    # New splits (here: one validation image moved to train) make it stale: it is refitted, and says so.
    splits = pd.read_parquet(folder / "splits.parquet")
    splits.loc[splits.index[splits["split"] == "val"][0], "split"] = "train"
    splits.to_parquet(folder / "splits.parquet", index=False)
    assert load_reference(folder) is None
    refitted = reference_for(folder, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("refitted the out-of-distribution reference on ")
    assert refitted.meta["images"]["train"] == reference.meta["images"]["train"] + 1


def test_predict_and_results_predict_carry_the_warnings(study, tmp_path, capsys):
    from analysis.predict import main
    from analysis.results import load_results

    folder, _ = study
    images = tmp_path / "images"
    images.mkdir()
    for photo in photographs(2):
        shutil.copyfile(photo, images / photo.name)
    train_image = study_images(folder, "train")["path"].iloc[0]
    shutil.copyfile(train_image, images / "copy.png")
    shutil.copyfile(fresh_lesions(tmp_path / "fresh", 1)[0], images / "fresh.png")

    assert main([str(folder), str(images), "--out", str(tmp_path / "p.csv")]) == 0
    stdout = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("file")
    assert table["ood"].to_dict() == {**{p.name: True for p in photographs(2)}, "copy.png": False, "fresh.png": False}
    assert table.loc["copy.png", "study_image"].startswith("train/") and table.loc["fresh.png", "warning"] == ""
    assert "warning: 2 of 4 images look unlike the training images: melanoma_" in stdout
    assert "their predictions are not reliable" in stdout
    assert "note: 1 of these images are copies of the study's images by content (1 train)" in stdout

    paths = [images / "copy.png", images / photographs(1)[0].name]
    prediction = load_results(folder).predict(paths)
    assert prediction.ood.tolist() == [False, True]
    assert prediction.warnings[0].startswith("same file as ") and "size 224x224 px" in prediction.warnings[1]
