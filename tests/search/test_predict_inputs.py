"""``search.predict.find_images``: the files it predicts follow the loaders' listing rule (no model needed)."""

from __future__ import annotations

import pytest

from fixtures.datasets import make_folder, symlink, write_image
from analysis.predict import PredictError, find_images
from trainables.datasets import load_table


def _relative(files, root) -> list[str]:
    return [f.relative_to(root).as_posix() for f in files]


def test_hidden_and_macosx_entries_are_skipped_and_counted(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.jpg")
    write_image(tmp_path / "__MACOSX" / "sub" / "b.jpg")  # archive junk without a dot in its name
    write_image(tmp_path / ".thumbs" / "a.png")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / "notes.txt").write_text("not an image")
    files, left_out = find_images(tmp_path)
    assert _relative(files, tmp_path) == ["a.png", "sub/b.jpg"]
    assert left_out.describe(tmp_path) == (
        "1 file(s) that are not .jpg/.jpeg/.png/.dcm (notes.txt); "
        "3 hidden or __MACOSX file(s)/folder(s) (._a.png, .thumbs, __MACOSX)"
    )


def test_predict_and_the_folder_loader_list_the_same_files(tmp_path):
    """Nested and linked subfolders, hidden ones and loops: one rule for training and prediction."""
    root = make_folder(tmp_path / "data", n=2)
    elsewhere = make_folder(tmp_path / "elsewhere", classes=("more",), n=2)
    symlink(root / "benign" / "linked", elsewhere / "more")  # followed by both
    symlink(root / "benign" / "loop", root / "benign")  # a loop: listed once, by both
    write_image(root / "benign" / "deep" / "er" / "x.png")
    write_image(root / "benign" / ".thumbs" / "t.png")
    write_image(root / "benign" / "__MACOSX" / "m.png")
    table = load_table("folder", root)
    files, left_out = find_images(root / "benign")
    assert sorted(map(str, files)) == sorted(table.loc[table["label"] == "benign", "path"])
    assert len(files) == 2 + 2 + 1
    assert "1 linked folder(s) already listed (loop)" in left_out.describe(root / "benign")


def test_no_recursive_reads_the_top_folder_only(tmp_path):
    write_image(tmp_path / "top.png")
    write_image(tmp_path / "sub" / "below.png")
    files, left_out = find_images(tmp_path, recursive=False)
    assert _relative(files, tmp_path) == ["top.png"]
    assert not left_out  # a subfolder not searched on request is no surprise
    (tmp_path / "top.png").unlink()
    with pytest.raises(PredictError, match=r"holds no .jpg/.jpeg/.png/.dcm images directly in it \(subfolders not searched"):
        find_images(tmp_path, recursive=False)
