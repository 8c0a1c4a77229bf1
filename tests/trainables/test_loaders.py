"""Dataset loaders on tiny fixtures in each published layout, on bad inputs, and on the real data in shared/."""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures.datasets import (
    HAM_AGES,
    HAM_COUNTS,
    HAM_SEXES,
    HAM_SITES,
    copy_file,
    make_covid,
    make_folder,
    make_ham10000,
    make_melanoma,
    shared_dataset,
    symlink,
    write_garbage,
    write_image,
    write_truncated_jpeg,
)
from trainables.data import decode_image, decode_images
from trainables.datasets import DatasetError, list_loaders, load_table, metadata_columns
from trainables.datasets.integrity import find_corrupt, find_duplicates


def _counts(table: pd.DataFrame) -> dict[str, int]:
    return {k: int(v) for k, v in table["label"].value_counts().items()}


def test_loaders_registered():
    assert {"covid", "folder", "ham10000", "melanoma"} <= set(list_loaders())


# --- HAM10000 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["kaggle", "images", "root"])
def test_ham10000_layouts(tmp_path, layout):
    root = make_ham10000(tmp_path / "ham", layout=layout)
    table = load_table("ham10000", root)
    assert list(table.columns[:4]) == ["path", "label", "group", "origin"]
    assert _counts(table) == HAM_COUNTS
    assert table["path"].is_unique and all(Path(p).is_file() for p in table["path"])
    assert set(table["origin"]) == {""}
    # Two consecutive images of a class share a lesion: nv has 4 images in 2 lesions.
    assert table[table["label"] == "nv"]["group"].nunique() == 2
    if layout == "kaggle":  # Kaggle's lower-case copy of part 1 must not add rows
        assert not any("ham10000_images_part_1" in p for p in table["path"])


def test_ham10000_binary_target(tmp_path):
    table = load_table("ham10000", make_ham10000(tmp_path / "ham"), target="binary")
    malignant = HAM_COUNTS["mel"] + HAM_COUNTS["bcc"] + HAM_COUNTS["akiec"]
    assert _counts(table) == {"benign": sum(HAM_COUNTS.values()) - malignant, "malignant": malignant}


def test_ham10000_carries_age_sex_site_and_source(tmp_path):
    table = load_table("ham10000", make_ham10000(tmp_path / "ham"))
    assert metadata_columns(table) == ["age", "sex", "localization", "dx_type", "source"]
    assert set(table["source"]) == {"vidir_modern"}  # the CSV's "dataset": where the image was acquired
    n = len(table)  # rows in image_id order, as the fixture numbers them
    assert table["age"].dtype == "float64" and table["age"].iloc[: n - 1].tolist() == [
        HAM_AGES[i % len(HAM_AGES)] for i in range(n - 1)]
    assert pd.isna(table["age"].iloc[-1])  # an empty cell is NaN, not 0 or ""
    assert table["sex"].tolist() == [HAM_SEXES[i % 2] for i in range(n)]
    assert table["localization"].tolist() == [HAM_SITES[i % 3] for i in range(n)]
    assert isinstance(table["sex"].dtype, pd.StringDtype) and set(table["dx_type"]) == {"histo"}


def test_ham10000_bad_target_and_option(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    with pytest.raises(DatasetError, match=r"target must be one of \['dx', 'binary'\], got 'malignant'"):
        load_table("ham10000", root, target="malignant")
    with pytest.raises(DatasetError, match=r"has no option\(s\) \['targte'\]; valid options: \['target', 'strict'\]"):
        load_table("ham10000", root, targte="binary")


def test_ham10000_missing_columns_named(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    csv = root / "HAM10000_metadata.csv"
    pd.read_csv(csv).drop(columns=["lesion_id", "dx"]).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['lesion_id', 'dx'\]"):
        load_table("ham10000", root)


def test_ham10000_missing_csv(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    (root / "HAM10000_metadata.csv").rename(root / "metadata.csv")
    with pytest.raises(DatasetError, match=r"HAM10000_metadata.csv not found .*CSV files there: \['metadata.csv'\]"):
        load_table("ham10000", root)


def test_ham10000_ids_without_files_and_files_without_rows(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    shutil.rmtree(root / "ham10000_images_part_1")  # the copy would otherwise still provide the file
    (root / "HAM10000_images_part_1" / "ISIC_0024306.jpg").unlink()
    write_image(root / "HAM10000_images_part_2" / "ISIC_9999999.jpg")
    with pytest.raises(DatasetError) as err:
        load_table("ham10000", root)
    message = str(err.value)
    assert "1 of 15 image_id(s) in HAM10000_metadata.csv have no image file (e.g. ISIC_0024306)" in message
    assert "1 image file(s) have no row in HAM10000_metadata.csv" in message and "ISIC_9999999.jpg" in message
    assert "strict': False" in message
    # strict=False drops both sides instead.
    table = load_table("ham10000", root, strict=False)
    assert len(table) == 14 and not table["path"].str.contains("ISIC_9999999").any()


def test_ham10000_many_missing_files_shows_a_few(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    for folder in ("HAM10000_images_part_2",):
        shutil.rmtree(root / folder)
    with pytest.raises(DatasetError, match=r"8 of 15 image_id\(s\) .* \(e\.g\. ISIC_0024313, .*, \.\.\. \(3 more\)\)"):
        load_table("ham10000", root)


def test_ham10000_bad_rows(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    meta.loc[0, "dx"] = "melanoma"
    meta.to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"unknown dx value\(s\) \['melanoma'\]"):
        load_table("ham10000", root)
    meta.loc[0, "dx"] = "nv"
    pd.concat([meta, meta.iloc[[1]]]).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"1 image_id\(s\) appear more than once .*: ISIC_0024307"):
        load_table("ham10000", root)


def test_ham10000_no_images(tmp_path):
    root = tmp_path / "ham"
    root.mkdir()
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["ISIC_1"], "dx": ["nv"]}).to_csv(root / "HAM10000_metadata.csv")
    with pytest.raises(DatasetError, match="no .jpg/.png images found"):
        load_table("ham10000", root)


# --- Melanoma ----------------------------------------------------------------------------------------------------


def test_melanoma_13k_layout(tmp_path):
    table = load_table("melanoma", make_melanoma(tmp_path / "mel", variant="13k", n=3))
    assert _counts(table) == {"benign": 6, "malignant": 6}  # labels lower-cased from Benign/Malignant
    assert table.groupby("origin").size().to_dict() == {"test": 6, "train": 6}
    assert table["group"].isna().all()
    assert all(f"/{o}/" in p for o, p in zip(table["origin"], table["path"]))


def test_melanoma_10k_without_test_folder(tmp_path):
    table = load_table("melanoma", make_melanoma(tmp_path / "mel", variant="10k", n=2))
    assert _counts(table) == {"benign": 2, "malignant": 2}
    assert set(table["origin"]) == {"train"}


def test_melanoma_mixed_case_folders(tmp_path):
    root = tmp_path / "mel"
    write_image(root / "Train" / "Benign" / "a.jpg")
    write_image(root / "Train" / "malignant" / "b.JPG")
    write_image(root / "train_notes.txt.d" / "x.jpg")  # an unrelated folder at the root is ignored
    assert _counts(load_table("melanoma", root)) == {"benign": 1, "malignant": 1}


def test_melanoma_errors(tmp_path):
    nested = make_melanoma(tmp_path / "download" / "melanoma_cancer_dataset", variant="10k")
    hint = r"no train/ folder .*Did you mean .*melanoma_cancer_dataset'\?(.|\n)*benign/"
    with pytest.raises(DatasetError, match=hint):
        load_table("melanoma", nested.parent)

    shutil.rmtree(nested / "train" / "malignant")
    with pytest.raises(DatasetError, match=r"has no malignant/ folder \(found: \['benign'\]\)"):
        load_table("melanoma", nested)

    (nested / "train" / "Malignant").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*Malignant' holds no .jpg"):
        load_table("melanoma", nested)

    write_image(nested / "train" / "malignant" / "m.jpg")
    with pytest.raises(DatasetError, match=r"has both Malignant/ and malignant/"):
        load_table("melanoma", nested)

    shutil.rmtree(nested / "train" / "Malignant")
    write_image(nested / "train" / "nevus" / "n.jpg")
    with pytest.raises(DatasetError, match=r"unexpected folder .*nevus'; train/ must hold only benign/ and malignant/"):
        load_table("melanoma", nested)


def test_melanoma_test_folder_checked_too(tmp_path):
    root = make_melanoma(tmp_path / "mel", variant="13k")
    shutil.rmtree(root / "test" / "Benign")
    with pytest.raises(DatasetError, match=r"test' has no benign/ folder"):
        load_table("melanoma", root)


# --- COVID-19 Radiography ----------------------------------------------------------------------------------------


def test_covid_current_release_ignores_masks(tmp_path):
    root = make_covid(tmp_path / "COVID-19_Radiography_Dataset", n=2)
    table = load_table("covid", root)
    assert _counts(table) == {"COVID": 2, "Normal": 2, "Viral Pneumonia": 2}
    assert not table["path"].str.contains("/masks/").any()
    assert table["path"].str.contains("/images/").all()
    assert decode_image(table["path"][0], 16).shape == (16, 16, 3)  # grayscale PNG -> 3 channels


def test_covid_lung_opacity_optional_and_classes_option(tmp_path):
    root = make_covid(tmp_path / "covid", classes=("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"))
    assert set(load_table("covid", root)["label"]) == {"COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"}
    picked = load_table("covid", root, classes=["COVID", "Viral Pneumonia"])
    assert _counts(picked) == {"COVID": 2, "Viral Pneumonia": 2}


def test_covid_older_flat_release(tmp_path):
    root = make_covid(tmp_path / "covid", classes=("COVID-19", "NORMAL", "Viral Pneumonia"), flat=True)
    table = load_table("covid", root)
    assert _counts(table) == {"COVID": 2, "Normal": 2, "Viral Pneumonia": 2}  # canonical names


def test_covid_errors(tmp_path):
    root = make_covid(tmp_path / "covid", classes=("COVID", "Normal"))
    missing = r"class folder\(s\) \['Viral Pneumonia'\] not found .*found folders: \['COVID', 'Normal'\]"
    with pytest.raises(DatasetError, match=missing):
        load_table("covid", root)
    with pytest.raises(DatasetError, match=r"unknown class\(es\) \['Pneumonia'\]"):
        load_table("covid", root, classes=["COVID", "Pneumonia"])
    (root / "Viral Pneumonia" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"Viral Pneumonia/images' holds no .jpg/.jpeg/.png/.dcm images"):
        load_table("covid", root)
    with pytest.raises(DatasetError, match=r"single class \{'COVID': 2\}"):
        load_table("covid", root, classes=["COVID"])


# --- Generic class-per-folder (S4) --------------------------------------------------------------------------------


def test_folder_with_prediction(tmp_path):
    root = make_folder(tmp_path / "histo", n=3, prediction=2)
    table = load_table("folder", root)
    assert _counts(table) == {"benign": 3, "malignant": 3}
    assert not table["path"].str.contains("/prediction/").any()
    assert load_table("folder", root, classes=["malignant", "benign"])["label"].iloc[0] == "malignant"


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path / "histo", classes=("benign",))
    with pytest.raises(DatasetError, match=r"single class \{'benign': 3\}; a classifier needs at least two"):
        load_table("folder", root)
    (root / "malignant").mkdir()
    with pytest.raises(DatasetError, match=r"malignant' holds no .jpg/.jpeg/.png/.dcm images"):
        load_table("folder", root)
    with pytest.raises(DatasetError, match=r"class folder 'tumour' not found"):
        load_table("folder", root, classes=["benign", "tumour"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"has no images. Expected layout:\n  ROOT/"):
        load_table("folder", empty)


NFC_BENIN, NFD_BENIN = unicodedata.normalize("NFC", "bénin"), unicodedata.normalize("NFD", "bénin")


def test_class_folders_differing_only_in_case_are_refused(tmp_path):
    """benign/ beside Benign/ used to give three classes, two of which read the same."""
    root = make_folder(tmp_path / "histo", classes=("benign", "Benign", "malignant"))
    message = (r"folder: class folders in '.*histo' that differ only in letter case or Unicode normalisation would "
               r"be separate classes that read the same:\n  'Benign' and 'benign' differ only in letter case: "
               r"'B' \(U\+0042\) vs 'b' \(U\+0062\)\nMerge them into one folder per class")
    with pytest.raises(DatasetError, match=message):
        load_table("folder", root)
    with pytest.raises(DatasetError, match=message):  # picking one of them is no way round: which one is meant?
        load_table("folder", root, classes=["benign", "malignant"])


def test_class_folders_differing_only_in_unicode_normalisation_are_refused(tmp_path):
    """'bénin' in NFC and in NFD used to give ['bénin', 'bénin', 'malignant']."""
    root = make_folder(tmp_path / "derm", classes=(NFC_BENIN, NFD_BENIN, "malignant"))
    if len([p for p in root.iterdir()]) < 3:
        pytest.skip("this file system stores one normal form only")
    with pytest.raises(DatasetError, match=re.escape(
            "'be\\u0301nin' and 'bénin' differ only in Unicode normalisation: "
            "'e\\u0301' (U+0065 U+0301) vs 'é' (U+00E9)")):
        load_table("folder", root)


def test_a_class_folder_named_in_nfd_is_the_class_typed_in_nfc(tmp_path):
    """A folder named on macOS (NFD) and the name typed in a study (NFC) are one class, named in NFC."""
    root = make_folder(tmp_path / "derm", classes=(NFD_BENIN, "malignant"))
    table = load_table("folder", root)
    assert set(table["label"]) == {NFC_BENIN, "malignant"}
    picked = load_table("folder", root, classes=[NFC_BENIN, "malignant"])
    assert _counts(picked) == {NFC_BENIN: 3, "malignant": 3}
    assert _counts(load_table("folder", root, classes=[NFD_BENIN, "malignant"])) == _counts(picked)
    # the metadata CSV names the image by its NFC path
    _metadata_csv(root, [(f"{NFC_BENIN}/{NFD_BENIN}_0.png", 30, "female")])
    with_meta = load_table("folder", root, metadata="meta.csv")
    assert with_meta["age"].notna().sum() == 1


def test_covid_folders_of_one_class_are_refused(tmp_path):
    root = make_covid(tmp_path / "covid")
    write_image(root / "covid" / "images" / "extra.png")  # COVID/ beside covid/: one was dropped without a word
    with pytest.raises(DatasetError, match=r"covid: '.*covid' has both (COVID/ and covid/|covid/ and COVID/), which "
                                           r"are both class 'COVID'; merge them into one COVID/ folder"):
        load_table("covid", root)


def _metadata_csv(root: Path, rows: list[tuple], columns=("file", "age", "sex")) -> None:
    pd.DataFrame(rows, columns=list(columns)).to_csv(root / "meta.csv", index=False)


def test_folder_metadata_csv_joins_by_path_or_file_name(tmp_path):
    root = make_folder(tmp_path / "histo", n=3)
    # by path relative to the root, by a unique file name, with an empty age; malignant_1.png has no row
    _metadata_csv(root, [("benign/benign_0.png", 30, "female"), ("benign_1.png", 71, "male"),
                         ("malignant/malignant_0.png", None, "female")])
    table = load_table("folder", root, metadata="meta.csv")
    table.index = [Path(p).name for p in table["path"]]
    assert metadata_columns(table) == ["age", "sex"]
    assert table["age"].dtype == "float64" and isinstance(table["sex"].dtype, pd.StringDtype)
    assert table.loc["benign_0.png", "age"] == 30 and table.loc["benign_1.png", "sex"] == "male"
    assert pd.isna(table.loc["malignant_0.png", "age"]) and table.loc["malignant_0.png", "sex"] == "female"
    assert table.loc[["benign_2.png", "malignant_1.png"], ["age", "sex"]].isna().all().all()  # no row: NA
    assert load_table("folder", root, metadata=str(root / "meta.csv"))["sex"].notna().sum() == 3  # absolute path


def test_folder_bad_metadata_csv_is_refused_by_name(tmp_path):
    root = make_folder(tmp_path / "histo", n=3)
    with pytest.raises(DatasetError, match=r"metadata file .*meta.csv' not found; give options=\{'metadata'"):
        load_table("folder", root, metadata="meta.csv")
    _metadata_csv(root, [("benign/benign_0.png", 30, "f")], columns=("image", "age", "sex"))
    with pytest.raises(DatasetError, match=r"'meta.csv' has no 'file' column \(its columns: \['image', 'age', "
                                           r"'sex'\]\); add one naming each image relative to the dataset folder"):
        load_table("folder", root, metadata="meta.csv")
    _metadata_csv(root, [("benign/benign_0.png", 30, "f"), ("benign/nope.png", 40, "m"), ("x.png", 1, "m")])
    with pytest.raises(DatasetError, match=r"2 file\(s\) of 'meta.csv' are no image of the dataset \(e.g. "
                                           r"benign/nope.png, x.png\); name each image relative to"):
        load_table("folder", root, metadata="meta.csv")
    _metadata_csv(root, [("benign/benign_0.png", 30, "f"), ("benign_0.png", 40, "m")])  # one image, two rows
    with pytest.raises(DatasetError, match=r"1 image\(s\) have more than one row in 'meta.csv' .*keep one row per"):
        load_table("folder", root, metadata="meta.csv")
    _metadata_csv(root, [("benign/benign_0.png", "a"), ("benign/benign_0.png", "b")], columns=("file", "site"))
    with pytest.raises(DatasetError, match=r"more than one row"):
        load_table("folder", root, metadata="meta.csv")
    _metadata_csv(root, [("benign/benign_0.png", "x", "f")], columns=("file", "label", "split"))
    with pytest.raises(DatasetError, match=r"column\(s\) \['label', 'split'\], names the image table already uses"):
        load_table("folder", root, metadata="meta.csv")


def test_a_file_name_of_two_images_must_be_given_by_path(tmp_path):
    root = make_folder(tmp_path / "histo", n=1)
    copy_file(root / "benign" / "benign_0.png", root / "malignant" / "benign_0.png")
    _metadata_csv(root, [("benign_0.png", 30, "f")])
    with pytest.raises(DatasetError, match=r"benign_0.png: a file name of several images; give its path"):
        load_table("folder", root, metadata="meta.csv")


def test_a_loader_metadata_column_may_not_take_a_pipeline_name():
    from trainables.datasets._registry import PIPELINE_COLUMNS, check_table
    from trainables.near_duplicates import CLUSTER_COLUMN

    assert CLUSTER_COLUMN in PIPELINE_COLUMNS  # the one name kept in step by hand
    table = pd.DataFrame({"path": ["a", "b"], "label": ["x", "y"], "group": None, "origin": "", "split": "z"})
    with pytest.raises(DatasetError, match=r"metadata column\(s\) \['split'\] take names the pipeline adds"):
        check_table(table, "mine")


def test_missing_path_errors(tmp_path):
    urls = re.escape("https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000 or https://doi.org/10.7910/DVN/DBW86T")
    with pytest.raises(DatasetError, match=r"'.*nowhere' does not exist. Expected layout:\n(.|\n)*Download it from " + urls):
        load_table("ham10000", tmp_path / "nowhere")
    (tmp_path / "file.zip").write_bytes(b"zip")
    with pytest.raises(DatasetError, match=r"is a file, not a folder(.|\n)*train/"):
        load_table("melanoma", tmp_path / "file.zip")
    with pytest.raises(DatasetError, match=r"needs a path"):
        load_table("covid", None)
    with pytest.raises(DatasetError, match=r"unknown dataset loader 'ham1000'; did you mean 'ham10000'\?"):
        load_table("ham1000", tmp_path)


# --- One listing rule for every loader: hidden entries, nested and linked folders ----------------------------------


def test_folder_hidden_and_system_folders_are_not_classes(tmp_path, capsys):
    root = make_folder(tmp_path / "histo", n=2)
    write_image(root / ".thumbs" / "t.png")  # was a third class
    (root / ".ipynb_checkpoints").mkdir()  # was "class folder holds no images"
    (root / "__MACOSX" / "benign").mkdir(parents=True)
    write_image(root / "benign" / ".thumbs" / "small.png")  # hidden inside a class folder too
    write_image(root / "benign" / "__MACOSX" / "benign_0.png")
    (root / "benign" / "._benign_0.png").write_bytes(b"macOS resource fork")
    (root / "benign" / "notes.txt").write_text("not an image")
    table = load_table("folder", root)
    assert _counts(table) == {"benign": 2, "malignant": 2}
    err = capsys.readouterr().err
    assert "note: folder: left out 1 file(s) that are not .jpg/.jpeg/.png/.dcm (benign/notes.txt); 6 hidden" in err

    shutil.rmtree(root / "malignant")
    write_image(root / "malignant" / ".thumbs" / "m.png")
    with pytest.raises(DatasetError, match=r"malignant' holds no .jpg/.jpeg/.png/.dcm images \(left out: 1 hidden"):
        load_table("folder", root)


def test_folder_reads_nested_subfolders(tmp_path, capsys):
    root = make_folder(tmp_path / "histo", n=2)
    for i in range(10):
        write_image(root / "malignant" / "batch 2" / "deeper" / f"m{i}.png")
    table = load_table("folder", root)
    assert _counts(table) == {"benign": 2, "malignant": 12}
    assert capsys.readouterr().err == ""  # nothing left out, nothing said


def test_folder_follows_linked_folders_once(tmp_path, capsys):
    root = make_folder(tmp_path / "histo", n=2)
    elsewhere = make_folder(tmp_path / "elsewhere", classes=("more",), n=3)
    symlink(root / "benign" / "linked", elsewhere / "more")  # followed: its 3 images join benign
    symlink(root / "benign" / "loop", root / "benign")  # a loop: its folder is listed once
    symlink(root / "malignant" / "gone.png", tmp_path / "deleted.png")  # a broken link
    table = load_table("folder", root)
    assert _counts(table) == {"benign": 5, "malignant": 2}
    assert table["path"].is_unique
    err = capsys.readouterr().err
    assert "1 linked folder(s) already listed (benign/loop)" in err
    assert "1 broken link(s) or special file(s) (malignant/gone.png)" in err


@pytest.mark.parametrize(
    "loader, build, class_dir",
    [
        ("folder", lambda root: make_folder(root, n=2), "benign"),
        ("melanoma", lambda root: make_melanoma(root, variant="10k", n=2), "train/benign"),
        ("covid", lambda root: make_covid(root, n=2), "COVID/images"),
        ("ham10000", lambda root: make_ham10000(root, layout="images"), "images"),
    ],
)
def test_every_loader_reads_nested_folders_and_skips_hidden_ones(tmp_path, capsys, loader, build, class_dir):
    root = build(tmp_path / loader)
    before = _counts(load_table(loader, root))
    folder = root / class_dir
    moved = sorted(p for p in folder.iterdir() if p.is_file())[0]
    nested = folder / "batch 2" / "scans"
    nested.mkdir(parents=True)
    moved.rename(nested / moved.name)
    write_image(folder / ".thumbs" / moved.name)  # a viewer's thumbnail cache, not an image of the dataset
    write_image(folder / "__MACOSX" / moved.name)
    capsys.readouterr()
    after = load_table(loader, root)
    assert _counts(after) == before
    assert str(nested / moved.name) in set(after["path"])
    assert f"note: {loader}: left out 2 hidden or __MACOSX file(s)/folder(s)" in capsys.readouterr().err


# --- Integrity: corrupt files and duplicates ------------------------------------------------------------------------


def test_find_corrupt(tmp_path):
    good = [write_image(tmp_path / "ok.jpg", size=32), write_image(tmp_path / "ok.png", mode="L")]
    truncated = write_truncated_jpeg(tmp_path / "truncated.jpg")
    garbage = write_garbage(tmp_path / "garbage.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    half_png = tmp_path / "half.png"
    half_png.write_bytes(write_image(tmp_path / "big.png", size=64).read_bytes()[:200])
    missing = tmp_path / "missing.jpg"

    bad = dict(find_corrupt([*good, truncated, garbage, empty, half_png, missing], workers=2))
    assert set(bad) == {str(p) for p in (truncated, garbage, empty, half_png, missing)}
    assert "truncated" in bad[str(truncated)]
    assert bad[str(garbage)].startswith("UnidentifiedImageError")
    assert bad[str(empty)] == "empty file" and bad[str(missing)] == "file not found"
    # The same files make the decoder fail, listing each of them.
    with pytest.raises(DatasetError, match=r"2 image\(s\) could not be decoded(.|\n)*garbage.jpg(.|\n)*truncated.jpg"):
        decode_images([*good, truncated, garbage], 16, use_cache=False, workers=1)


def test_find_duplicates(tmp_path):
    root = make_folder(tmp_path / "data", n=3)
    copy_file(root / "benign" / "benign_0.png", root / "benign" / "benign_copy.png")
    copy_file(root / "benign" / "benign_0.png", root / "malignant" / "relabelled.png")  # a copy with the other label
    table = load_table("folder", root)

    pairs = find_duplicates(table)
    assert len(pairs) == 3  # 3 copies -> 3 pairs
    assert pairs["sha256"].nunique() == 1 and "cross_split" not in pairs
    assert int((~pairs["same_label"]).sum()) == 2

    table["split"] = np.where(table["path"].str.contains("malignant"), "test", "train")
    pairs = find_duplicates(table)
    assert sorted(pairs["cross_split"]) == [False, True, True]

    assert find_duplicates(load_table("folder", make_folder(tmp_path / "clean"))).empty


# --- Real data in shared/datasets (skipped when absent) --------------------------------------------------------------

HAM_OFFICIAL = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def test_real_ham10000():
    root = shared_dataset("ham10000")
    table = load_table("ham10000", root)
    assert len(table) == 10_015
    assert _counts(table) == HAM_OFFICIAL
    assert table["group"].nunique() == 7_470
    binary = load_table("ham10000", root, target="binary")
    assert _counts(binary) == {"benign": 8_061, "malignant": 1_954}


def test_real_melanoma10k():
    table = load_table("melanoma", shared_dataset("melanoma10k"))
    assert _counts(table) == {"benign": 5_000, "malignant": 4_605}
    assert set(table["origin"]) == {"train"}  # this copy has no test/ folder


def test_real_melanoma10k_integrity():
    """The README counts 22 duplicate pairs in the full set (train + test); the train/ copy here has 14."""
    table = load_table("melanoma", shared_dataset("melanoma10k"))
    pairs = find_duplicates(table)
    assert len(pairs) == 14, pairs
    assert pairs["same_label"].all()  # every copy sits in its own class: no label conflicts
    assert find_corrupt(table["path"], workers=2) == []
