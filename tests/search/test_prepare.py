"""Before Ray starts: unreadable images stop the run or are skipped and counted; duplicates are reported."""

import pandas as pd
import pytest
import ray

from fixtures.datasets import copy_file, make_folder, write_garbage, write_truncated_jpeg
from search.prepare import available_memory, check_fits_in_memory, prepare_data
from search.run import main, report_duplicates
from search.storage import StudyFolder
from search.study import Dataset, Study, StudyError


def folder_study(root, **dataset):
    return Study(name="s", space=lambda trial: {"backbone": "cnn_s3"},
                 dataset=Dataset(loader="folder", path=str(root), image_size=16, split="stratified",
                                 split_options={"val": 0.25, "test": 0.25}, **dataset))


@pytest.fixture
def damaged(tmp_path):
    root = make_folder(tmp_path / "data", n=8)
    write_garbage(root / "benign" / "garbage.png")
    write_truncated_jpeg(root / "malignant" / "cut.jpg")
    return root


def test_corrupt_images_stop_the_run_with_their_names(damaged, tmp_path, write_study, capsys):
    study = write_study(f"STUDY = Study(name='s', dataset=Dataset(loader='folder', path={str(damaged)!r}, "
                        "image_size=16), space=lambda trial: {'backbone': 'cnn_s3'})\n")
    assert main([str(study), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "2 image(s) cannot be read" in err and "garbage.png" in err and "cut.jpg" in err
    assert "--skip-corrupt" in err
    assert not ray.is_initialized()


def test_skip_corrupt_leaves_them_out_and_counts_them(damaged):
    prepared = prepare_data(folder_study(damaged), skip_corrupt=True)
    assert sorted(p.rsplit("/", 1)[1] for p, _ in prepared.skipped) == ["cut.jpg", "garbage.png"]
    assert len(prepared.splits) == 16
    assert not prepared.splits["path"].str.contains("garbage|cut").any()


def test_duplicates_are_found_and_written(tmp_path, capsys):
    root = make_folder(tmp_path / "data", n=8)
    copy_file(root / "benign" / sorted(p.name for p in (root / "benign").iterdir())[0], root / "malignant" / "copy.png")
    prepared = prepare_data(folder_study(root))
    pairs = prepared.duplicates
    assert len(pairs) == 1 and not pairs["same_label"].iloc[0]

    report_duplicates(prepared, StudyFolder(tmp_path, "run"))
    assert "1 pair(s) of identical image files" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "run" / "duplicates.parquet")) == 1


def test_clean_data_has_no_duplicates_or_skips(tmp_path):
    prepared = prepare_data(folder_study(make_folder(tmp_path / "data", n=8)))
    assert prepared.skipped == [] and prepared.duplicates.empty


def test_images_too_large_for_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", n=8)  # 16 images: 8 train, 4 val, 4 test
    needed = 12 * 16 * 16 * 3  # train and val, decoded to uint8 RGB at image_size 16
    monkeypatch.setattr("search.prepare.available_memory", lambda: (needed - 1, "available"))  # one byte short
    with pytest.raises(StudyError, match=r"dataset.image_size: bad value 16; its 12 train and val images decode to "
                                         r"9 KiB \(12 x 16 x 16 x 3 bytes\), but this machine has 8.999 KiB of memory "
                                         r"available. Use a smaller image_size \(at most 15 fits"):
        prepare_data(folder_study(root))  # decoding these would work: only the estimate refuses
    monkeypatch.setattr("search.prepare.available_memory", lambda: (needed, "available"))
    arrays = prepare_data(folder_study(root)).arrays
    assert arrays["x_train"].nbytes + arrays["x_val"].nbytes == needed  # the estimate is the arrays' real size


def test_the_estimate_names_the_size_and_the_memory_available():
    # The case: 16 images at image_size 100000 crashed allocating 447 GiB.
    with pytest.raises(StudyError, match=r"decode to 447 GiB \(16 x 100000 x 100000 x 3 bytes\), but this machine "
                                         r"has 8 GiB of memory available. Use a smaller image_size \(at most 13377 fits"):
        check_fits_in_memory(16, 100000, available=(8 * 2**30, "available"))


def test_this_machines_memory_is_read_and_small_images_fit():
    memory, counted = available_memory()
    assert counted in ("available", "in all") and 2**26 < memory  # read without extra packages: more than 64 MiB
    check_fits_in_memory(1000, 64)  # 12 MiB of arrays: no refusal


def test_a_misspelt_positive_class_gets_a_did_you_mean(tmp_path):
    study = folder_study(make_folder(tmp_path / "data", n=4), positive_class="malignent")  # classes come from the folder
    with pytest.raises(StudyError, match="dataset.positive_class: unknown class 'malignent'; did you mean 'malignant'"):
        prepare_data(study)


def test_a_positive_class_typed_in_nfc_names_the_folder_stored_in_nfd(tmp_path):
    """'bénin' typed in a study (NFC) and the folder a Mac wrote (NFD) used to give "unknown class 'bénin';
    did you mean 'bénin'?"."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "bénin") for form in ("NFC", "NFD"))
    study = folder_study(make_folder(tmp_path / "data", classes=(nfd, "malignant"), n=4), positive_class=nfc,
                         near_duplicates=False)
    prepared = prepare_data(study)
    assert prepared.class_names == [nfc, "malignant"] and prepared.positive == 0


def test_images_turned_by_their_exif_orientation_are_counted(tmp_path):
    """The data-loading line says how many images were read upright by their EXIF orientation."""
    from fixtures.datasets import upright_picture, write_rotated_jpeg

    root = make_folder(tmp_path / "data", n=4)
    write_rotated_jpeg(root / "benign" / "phone.jpg", upright_picture())
    prepared = prepare_data(folder_study(root, near_duplicates=False))
    assert prepared.rotated == 1
