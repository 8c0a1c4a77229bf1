"""The command line: flags, and errors raised before Ray starts."""

import re

import pytest
import ray

from search.run import given_flags, main, parse_args, resume_command, with_recorded_flags


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--num-samples", "--max-epochs", "--storage", "--address", "--data-dir", "--seed", "--resume", "--smoke"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["spaces/quickstart.py", "--num-sample", "3"], "unrecognized arguments"),
        (["spaces/quickstart.py", "--num-samples", "-2"], "must not be negative, got '-2'"),
        (["spaces/quickstart.py", "--num-samples", "0"], "must be a positive integer"),
        (["spaces/quickstart.py", "--max-epochs", "three"], "must be an integer, got 'three'"),
        # float() reads these; NaN was called negative and inf reached Ray before it was refused.
        (["spaces/quickstart.py", "--gpus-per-trial", "nan"], "argument --gpus-per-trial: must be a finite number, got 'nan'"),
        (["spaces/quickstart.py", "--cpus-per-trial", "inf"], "argument --cpus-per-trial: must be a finite number, got 'inf'"),
        (["spaces/quickstart.py", "--gpus-per-trial=-inf"], "argument --gpus-per-trial: must be a finite number"),
        # An empty path was the current folder (--storage) or the study's own setting (--data-dir, --weights-dir).
        (["spaces/quickstart.py", "--storage", ""], "argument --storage: must not be empty, got ''"),
        (["spaces/quickstart.py", "--data-dir", " "], "argument --data-dir: must not be empty"),
        (["spaces/quickstart.py", "--weights-dir", ""], "argument --weights-dir: must not be empty"),
        (["spaces/quickstart.py", "--name", ""], "argument --name: must not be empty"),
        (["spaces/quickstart.py", "--address", ""], "argument --address: must not be empty"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_study_fails_before_ray_starts(write_study, tmp_path, capsys):
    path = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'resnet'})\n")
    assert main([str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'resnet'" in err and "did you mean 'resnet50'" in err
    assert not ray.is_initialized()


def test_a_folder_as_the_study_file_fails_before_ray_starts_naming_it(tmp_path, capsys):
    assert main([str(tmp_path), "--storage", str(tmp_path / "runs")]) == 2
    assert f"study file {str(tmp_path)!r} is a folder" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_missing_data_fails_before_ray_starts(write_study, tmp_path, capsys):
    path = write_study(
        "STUDY = Study(name='x', dataset=Dataset(loader='folder', path='/no/such/folder'),"
        " space=lambda trial: {'backbone': 'cnn_s3'})\n"
    )
    assert main([str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "'/no/such/folder' does not exist" in err and "<class A>/" in err
    assert not ray.is_initialized()


def test_metric_never_reported_is_refused(write_study, tmp_path, capsys):
    path = write_study(
        "STUDY = Study(name='x', metric='val_recall_melanoma', dataset=Dataset(options={'n_per_class': 10}),"
        " space=lambda trial: {'backbone': 'cnn_s3'})\n"
    )
    assert main([str(path), "--storage", str(tmp_path / "runs")]) == 2
    assert "trials never report it" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_resume_command_gives_where_the_study_runs_and_study_json_the_rest():
    args = parse_args(["spaces/quickstart.py", "--storage", "out dir", "--data-dir", "/data", "--smoke",
                       "--num-samples", "3", "--address", "auto"])
    assert resume_command(args) == ("python -m search.run spaces/quickstart.py --storage 'out dir' --resume "
                                    "--address auto --data-dir /data")
    assert given_flags(args) == {"num_samples": 3, "data_dir": "/data", "smoke": True}


def test_resume_reapplies_the_recorded_flags_and_refuses_a_changed_search():
    from search.study import StudyError

    record = {"flags": {"num_samples": 3, "max_epochs": 2, "smoke": True, "max_concurrent": 2}}
    resumed = with_recorded_flags(parse_args(["s.py", "--resume", "--max-concurrent", "1"]), record)
    assert (resumed.num_samples, resumed.max_epochs, resumed.smoke) == (3, 2, True)
    assert resumed.max_concurrent == 1  # resources may change on resume
    again = with_recorded_flags(parse_args(["s.py", "--resume", "--num-samples", "3"]), record)
    assert again.num_samples == 3  # the same value is fine
    for argv, said in ((["--num-samples", "5"], "--num-samples: the study started with 3, this command gives 5"),
                       (["--seed", "1"], "--seed: the study started with no such flag, this command gives 1"),
                       (["--no-activation-cache"], "--no-activation-cache: the study started with no such flag")):
        with pytest.raises(StudyError, match=re.escape(said)):
            with_recorded_flags(parse_args(["s.py", "--resume", *argv]), record)
    old_folder = parse_args(["s.py", "--resume", "--num-samples", "9"])
    assert with_recorded_flags(old_folder, {}) is old_folder  # written before flags were recorded


def test_a_request_no_node_can_meet_is_refused():
    from search.run import fit_resources
    from search.study import StudyError

    study = load_study_text("STUDY = Study(name='x', gpus_per_trial=0.25, cpus_per_trial=2, "
                            "space=lambda trial: {'backbone': 'cnn_s3'})\n")
    with pytest.raises(StudyError, match=r"0.25 GPUs per trial but Ray has 0 \(--gpus-per-trial 0\)"):
        fit_resources(study, {"CPU": 2.0}, local=True, smoke=False)
    shrunk = fit_resources(study, {"CPU": 1.0}, local=True, smoke=True)
    assert (shrunk.cpus_per_trial, shrunk.gpus_per_trial) == (1.0, 0)
    assert fit_resources(study, {"CPU": 1.0}, local=False, smoke=False) is study  # an autoscaler may add nodes
    assert fit_resources(study, {"CPU": 4.0, "GPU": 1.0}, local=True, smoke=False) is study


def test_resource_flags_override_the_study(write_study):
    from search.run import apply_overrides
    from search.study import load_study

    path = write_study("STUDY = Study(name='x', gpus_per_trial=0.5, space=lambda trial: {'backbone': 'cnn_s3'})\n")
    args = parse_args([str(path), "--gpus-per-trial", "0", "--cpus-per-trial", "1.5", "--max-concurrent", "3"])
    study = apply_overrides(load_study(path), args)
    assert (study.gpus_per_trial, study.cpus_per_trial, study.max_concurrent) == (0, 1.5, 3)
    assert given_flags(args) == {"gpus_per_trial": 0.0, "cpus_per_trial": 1.5, "max_concurrent": 3}  # in study.json


def load_study_text(body):
    from search.study import Study, Dataset  # noqa: F401  (used by the exec'd body)

    scope = {"Study": Study, "Dataset": Dataset}
    exec(body, scope)
    return scope["STUDY"]


def test_unreachable_address_fails_fast_naming_it(write_study, tmp_path, capsys):
    import time

    path = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'cnn_s3'})\n")
    started = time.monotonic()
    assert main([str(path), "--storage", str(tmp_path / "runs"), "--address", "ray://127.0.0.1:9"]) == 2
    assert time.monotonic() - started < 30
    assert "cannot reach the Ray cluster at --address 'ray://127.0.0.1:9'" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_storage_that_cannot_be_written_is_refused(write_study, tmp_path, capsys):
    path = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'cnn_s3'})\n")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([str(path), "--storage", str(blocker)]) == 2
    assert "cannot write results to" in capsys.readouterr().err


def test_resume_refuses_an_edited_study_file_and_shows_the_edit(write_study, tmp_path, capsys):
    import json

    from search.run import check_study_unchanged
    from search.storage import StudyFolder
    from search.study import StudyError, file_hash

    path = write_study("STUDY = Study(name='x', num_samples=4, space=lambda trial: {'backbone': 'cnn_s3'})\n")
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "study_file.py").write_text(path.read_text())
    (folder / "study.json").write_text(json.dumps({"study_file_sha256": file_hash(path)}))
    check_study_unchanged(StudyFolder(tmp_path / "runs", "x"), path)  # unchanged: fine
    path.write_text(path.read_text().replace("num_samples=4", "num_samples=40"))
    with pytest.raises(StudyError, match=r"(?s)changed since this study started.*-STUDY.*num_samples=4,.*"
                                         r"\+STUDY.*num_samples=40.*--force"):
        check_study_unchanged(StudyFolder(tmp_path / "runs", "x"), path)
    assert parse_args([str(path), "--resume", "--force"]).force


def test_a_completed_study_folder_is_kept_and_a_new_run_gets_the_next_number(tmp_path, capsys):
    import json

    from search.run import check_folder
    from search.storage import StudyFolder
    from search.study import StudyError

    def folder(name, outcome):
        (tmp_path / name).mkdir()
        (tmp_path / name / "study.json").write_text(json.dumps({"outcome": outcome} if outcome else {}))

    folder("q", "completed")
    folder("q-2", "completed")
    fresh, args = check_folder(StudyFolder(str(tmp_path), "q"), parse_args(["s.py"]))
    assert fresh.name == "q-3" and args.name == "q-3" and "this run writes" in capsys.readouterr().out
    for name, outcome in (("r", "interrupted"), ("s", None)):  # unfinished: meant to be resumed
        folder(name, outcome)
        with pytest.raises(StudyError, match="add --resume"):
            check_folder(StudyFolder(str(tmp_path), name), parse_args(["s.py"]))
    with pytest.raises(StudyError, match="already holds"):  # an explicit --name is never renumbered
        check_folder(StudyFolder(str(tmp_path), "q"), parse_args(["s.py", "--name", "q"]))


def test_no_near_duplicates_turns_the_audit_off_is_recorded_and_kept_on_resume(write_study):
    from search.run import apply_overrides
    from search.study import StudyError, load_study

    path = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'cnn_s3'})\n")
    args = parse_args([str(path), "--no-near-duplicates"])
    assert load_study(path).dataset.near_duplicates is True  # on by default
    assert apply_overrides(load_study(path), args).dataset.near_duplicates is False
    assert given_flags(args) == {"near_duplicates": False}  # in study.json, so --resume re-applies it
    resumed = with_recorded_flags(parse_args([str(path), "--resume"]), {"flags": given_flags(args)})
    assert apply_overrides(load_study(path), resumed).dataset.near_duplicates is False
    with pytest.raises(StudyError, match=re.escape("--no-near-duplicates: the study started with no such flag")):
        with_recorded_flags(parse_args([str(path), "--resume", "--no-near-duplicates"]), {"flags": {}})
    grouped = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'cnn_s3'}, dataset=Dataset("
                          "split='grouped', split_options={'by': 'near_duplicates'}))\n", name="grouped.py")
    with pytest.raises(StudyError, match="groups by the audit's clusters; turn the audit on"):
        apply_overrides(load_study(grouped), parse_args([str(grouped), "--no-near-duplicates"]))
