"""``search.disk_guard`` without Ray running: Ray's state repaired from its good copy, the free-space warning.

(The whole path, a real disk filled under a real run, is tests/e2e/test_driver_faults.py.)
"""

import json
import pickle

import pytest

from search.disk_guard import (
    BACKUP_DIR,
    DiskGuard,
    estimated_bytes,
    repair_ray_state,
    warn_if_short,
    well_formed,
)
from search.storage import StorageError, StudyFolder


def ray_state(folder, session: str, trials: int) -> None:
    """A set of Ray's state files as one save writes them (the search state is a pickle despite its .json)."""
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": list(range(trials))}))
    (folder / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": trials}))
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"trials": trials}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps("tuner"))


def test_well_formed_tells_whole_files_from_empty_and_cut_off_ones():
    data = pickle.dumps({"a": list(range(100))})
    assert well_formed("searcher-state-x.pkl", data) and well_formed("search_gen_state-x.json", data)
    assert not well_formed("searcher-state-x.pkl", b"") and not well_formed("searcher-state-x.pkl", data[:-5])
    assert well_formed("experiment_state-x.json", b'{"a": 1}') and not well_formed("experiment_state-x.json", b'{"a"')


def test_an_empty_state_file_is_restored_from_the_last_good_copy(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    ray_state(folder, "s1", 2)
    guard = DiskGuard(StudyFolder(tmp_path, "tiny"))
    try:
        import os
        import time

        old = time.time() - 10  # settled: Ray is not writing them now
        for p in folder.iterdir():
            os.utime(p, (old, old))
        guard.back_up()
    finally:
        guard.release_reserve()
    good = (folder / "searcher-state-s1.pkl").read_bytes()
    (folder / "searcher-state-s1.pkl").write_bytes(b"")  # what Ray's sync onto a full disk left
    notes = []
    assert repair_ray_state(StudyFolder(tmp_path, "tiny"), say=notes.append) == ["searcher-state-s1.pkl"]
    assert (folder / "searcher-state-s1.pkl").read_bytes() == good
    assert "restored the last good copy" in notes[0]
    assert repair_ray_state(StudyFolder(tmp_path, "tiny"), say=notes.append) == []  # nothing left to repair


def test_a_damaged_resume_without_a_copy_falls_back_to_the_run_before_or_is_refused_by_name(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    ray_state(folder, "s1", 2)
    ray_state(folder, "s2", 3)  # a resume's own set, damaged before its first backup
    (folder / "experiment_state-s2.json").write_bytes(b"")
    notes = []
    repair_ray_state(StudyFolder(tmp_path, "tiny"), say=notes.append)
    assert not (folder / "experiment_state-s2.json").exists() and (folder / "experiment_state-s1.json").exists()
    assert (folder / BACKUP_DIR / "damaged-s2" / "searcher-state-s2.pkl").exists()
    assert "experiment_state-s1.json" in notes[0]

    (folder / "searcher-state-s1.pkl").write_bytes(b"")  # and now the only set left is damaged too
    with pytest.raises(StorageError, match=r"searcher-state-s1.pkl: empty or cut off.*another --name"):
        repair_ray_state(StudyFolder(tmp_path, "tiny"), say=notes.append)


def test_a_study_whose_checkpoints_may_not_fit_is_warned_about_at_start(tmp_path):
    from search.study import Dataset, Study

    def space(trial):
        return {"backbone": trial.suggest_categorical("backbone", ["mobilenet_v2", "resnet50"])}

    study = Study(name="big", dataset=Dataset(loader="embedded", image_size=32), space=space, num_samples=100_000)
    need, largest = estimated_bytes(study)
    assert largest == "resnet50" and need > 100_000 * 23_000_000 * 4
    folder = StudyFolder(tmp_path, "big")
    folder.mkdir()
    said = []
    warn_if_short(study, folder, say=said.append)
    assert len(said) == 1 and "resnet50" in said[0] and "MB free" in said[0] and "resumed" in said[0]
    warn_if_short(Study(name="small", dataset=study.dataset, space=space, num_samples=1), folder, say=said.append)
    assert len(said) == 1  # one trial fits
