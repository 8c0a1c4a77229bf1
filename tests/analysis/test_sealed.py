"""A results folder is sealed: tools read checkpoints only inside the folder they are given, and write there
(or to the --out the user gave). Real checkpoints, from the session's tiny study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures.runs import files_under

CLASSES = ["benign", "malignant"]


def checkpoints(folder: Path) -> list[str]:
    """Each trial's checkpoint as ``trial_dir/checkpoint_NNNNNN``, whether recorded relative or absolute."""
    board = pd.read_parquet(folder / "leaderboard.parquet")
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in board["checkpoint_path"].dropna()]


def record_checkpoints(folder: Path, paths) -> None:
    """Rewrite the leaderboard's ``checkpoint_path`` column, in checkpoints() order."""
    board = pd.read_parquet(folder / "leaderboard.parquet")
    has = board["checkpoint_path"].notna()
    board.loc[has, "checkpoint_path"] = list(paths)
    board.to_parquet(folder / "leaderboard.parquet", index=False)


def test_the_leaderboard_records_checkpoints_relative_to_the_folder(run_dir):
    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    assert board["checkpoint_path"].notna().all()
    for path in board["checkpoint_path"]:
        assert not Path(path).is_absolute() and "://" not in path and ".." not in Path(path).parts, path
        assert (run_dir / path / "model.keras").is_file()


def test_a_copy_is_evaluated_with_its_own_models_not_those_where_it_was_made(run_dir, tmp_path):
    """Copy runs/tiny away, run a new study under the old name, evaluate the copy: the copy's models are scored."""
    from analysis.evaluate import evaluate_top_k
    from analysis.splits import decode_split, read_split
    from trainables.checkpoint import load_classifier

    first = shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    paths = checkpoints(first)
    record_checkpoints(first, [str(first / p) for p in paths])  # absolute, as versions before this one wrote them
    copy = shutil.copytree(first, tmp_path / "backup" / "tiny")
    for i, path in enumerate(paths):  # the new study's models, at the old place
        shutil.rmtree(first / path)
        shutil.copytree(copy / paths[(i + 1) % len(paths)], first / path)

    table = evaluate_top_k(copy, k=1, n_boot=10, log=lambda line: None)
    best = next(p for p in paths if p.startswith(f"{table['trial_name'].iloc[0]}/"))
    own = load_classifier(copy / best)
    images = decode_split(read_split(copy, "test"), own.input_shape[1])
    expected = own.predict(images, verbose=0)
    assert not np.allclose(load_classifier(first / best).predict(images, verbose=0), expected, atol=1e-4)
    rows = pd.read_parquet(copy / "test_predictions.parquet")  # calibrated, as the model ships: undo T to compare
    from analysis.calibration import apply_temperature

    raw = apply_temperature(rows[[f"prob_{c}" for c in CLASSES]].to_numpy(), 1 / rows["temperature"].iloc[0])
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    record = json.loads((copy / "test_evaluation.json").read_text())["evaluations"][-1]["trials"][0]
    assert record["checkpoint"] == best  # recorded relative to the folder too


ESCAPES = ("absolute path elsewhere", "dot-dot", "linked trial folder")


def _leaky_folder(run_dir: Path, tmp_path: Path, escape: str) -> tuple[Path, Path]:
    """A copy of the study whose checkpoints lead to ``other``, a second copy outside it."""
    folder = shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    other = shutil.copytree(run_dir, tmp_path / "runs" / "other")
    paths = checkpoints(folder)
    if escape == "absolute path elsewhere":
        record_checkpoints(folder, [str(other / p) for p in paths])
    elif escape == "dot-dot":
        record_checkpoints(folder, [f"../other/{p}" for p in paths])
    else:
        record_checkpoints(folder, paths)
        for path in paths:
            trial_dir = folder / Path(path).parent
            shutil.rmtree(trial_dir)
            trial_dir.symlink_to(other / Path(path).parent, target_is_directory=True)
    return folder, other


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("tool", ["evaluate", "export", "report --evaluate"])
def test_a_checkpoint_outside_the_folder_is_refused_and_nothing_is_written(run_dir, tmp_path, capsys, escape, tool):
    folder, other = _leaky_folder(run_dir, tmp_path, escape)
    before = files_under(folder)
    if tool == "evaluate":
        from analysis.evaluate import main

        code = main([str(folder), "--top-k", "1", "--bootstrap", "10"])
    elif tool == "export":
        from analysis.export import main

        code = main([str(folder), "--format", "keras", "--verify-on", "none"])
    else:
        from analysis.report import EXIT_FAILED, main

        assert main([str(folder), "--evaluate", "--top-k", "1"]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert "test evaluation failed: OutsideFolderError" in err and repr(str(folder)) in err
        assert "OutsideFolderError" in (folder / "report.md").read_text()
        assert not (folder / "test_evaluation.json").exists() and not (folder / "test_predictions.parquet").exists()
        return
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "results folder" in err and repr(str(folder)) in err
    assert "trial_" in err and "Traceback" not in err
    assert files_under(folder) == before  # no evaluation, no log of a test-split use, no export


def test_a_trial_name_that_leaves_the_folder_is_not_an_export_file_name(run_dir, tmp_path, capsys):
    from analysis.export import main

    folder = shutil.copytree(run_dir, tmp_path / "a" / "b" / "tiny")
    board = pd.read_parquet(folder / "leaderboard.parquet")
    board["trial_name"] = "../../pwned_export"
    board.to_parquet(folder / "leaderboard.parquet", index=False)
    assert main([str(folder), "--format", "keras", "--verify-on", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trial_name '../../pwned_export'") and "--out" in err
    assert not list(tmp_path.rglob("*pwned*")) and not (folder / "export").exists()


def _on_a_folder_dataset(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the study whose dataset is a folder of its own (the embedded images, copied): the folder names
    each image relative to that dataset's root, so the dataset can move without the results."""
    from analysis.splits import image_paths

    folder = shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    splits = pd.read_parquet(folder / "splits.parquet")
    assert not any(Path(p).is_absolute() for p in splits["path"])  # names, not places
    source = Path(image_paths(folder, splits["path"][:1])[0]).parent.parent  # root of the class folders
    data = shutil.copytree(source, tmp_path / "data", ignore=shutil.ignore_patterns("*.json"))
    record = json.loads((folder / "study.json").read_text())
    record["study"]["dataset"].update(loader="folder", path=str(data), options={})
    (folder / "study.json").write_text(json.dumps(record))
    return folder, data


def test_a_moved_dataset_is_named_with_the_flag_that_finds_it_and_the_flag_works(run_dir, tmp_path, capsys):
    from analysis.evaluate import main

    folder, data = _on_a_folder_dataset(run_dir, tmp_path)
    assert main([str(folder), "--top-k", "1", "--bootstrap", "10"]) == 0
    capsys.readouterr()
    before = pd.read_parquet(folder / "test_predictions.parquet")
    moved = data.rename(tmp_path / "elsewhere")
    log = (folder / "test_evaluation.json").read_text()

    assert main([str(folder), "--top-k", "1", "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the study's images cannot be found") and repr(str(data)) in err
    assert "--data-dir DIR" in err and "Traceback" not in err
    assert (folder / "test_evaluation.json").read_text() == log  # nothing read, nothing logged

    assert main([str(folder), "--top-k", "1", "--bootstrap", "10", "--data-dir", str(moved)]) == 0
    after = pd.read_parquet(folder / "test_predictions.parquet")
    pd.testing.assert_frame_equal(after, before)  # the same images, by name, found at their new place


def test_another_dataset_at_the_recorded_place_is_refused_by_name(run_dir, tmp_path, capsys):
    from analysis.export import main

    folder, data = _on_a_folder_dataset(run_dir, tmp_path)
    gone = sorted((data / "malignant").iterdir())[-1]
    gone.unlink()  # one image of the study is no longer in its dataset
    assert main([str(folder), "--format", "keras", "--verify-split", "val"]) == 2
    err = capsys.readouterr().err
    assert "not 1 of the" in err and "is it the study's dataset?" in err and "--data-dir" in err
    assert not (folder / "export").exists()


def test_a_data_dir_for_a_generated_dataset_is_refused_by_name(run_dir, tmp_path, capsys):
    from analysis.evaluate import main

    folder = shutil.copytree(run_dir, tmp_path / "tiny")
    assert main([str(folder), "--top-k", "1", "--bootstrap", "10", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "the study's dataset ('embedded') is generated, not read from a folder; leave --data-dir out" in err
    assert not (folder / "test_evaluation.json").exists() or "test_split_log" not in (folder / "test_evaluation.json").read_text()
