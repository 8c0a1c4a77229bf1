"""The dashboards' plumbing without a Ray run: optuna.db's copy of the search, the MLflow flag, the hint line.

``OptunaMirror`` is driven here as Ray Tune drives it: a searcher holding an
in-memory Optuna study, and trials whose config carries Optuna's trial number.
The real run, with Ray, TensorBoard's event files and MLflow, is tests/e2e/test_dashboards.py.
"""

import json
import pickle
import sys
from types import SimpleNamespace

import optuna
import pytest

from search.dashboards import MLflowUnavailableError, check_mlflow, dashboards_line, mlflow_callback, optuna_db_url
from search.optuna_mirror import OptunaMirror
from search.run import RESOURCE_FLAGS, given_flags, main, parse_args, with_recorded_flags
from search.storage import StudyFolder

optuna.logging.set_verbosity(optuna.logging.WARNING)
METRIC = "val_balanced_accuracy"


class Search:
    """What the mirror reads of Ray's ``OptunaSearch`` (inside a ``ConcurrencyLimiter``): its study."""

    def __init__(self, seed=0, direction="maximize"):
        self.searcher = SimpleNamespace(_ot_study=optuna.create_study(direction=direction,
                                                                      sampler=optuna.samplers.RandomSampler(seed=seed)))
        self.running = {}

    @property
    def study(self):
        return self.searcher._ot_study

    def ask(self):
        trial = self.study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("backbone", ["cnn_s3", "cnn_s2"])
        self.running[trial.number] = trial
        return trial

    def report(self, number, epoch, value):
        self.running[number].report(value, epoch)

    def tell(self, number, value):
        self.study.tell(self.running.pop(number), value)


def ray_trial(number, last_result=None):
    return SimpleNamespace(config={"trial_number": number}, trial_id=f"id{number:03d}", last_result=last_result or {})


def loaded(path, name="s"):
    return optuna.load_study(study_name=name, storage=optuna_db_url(path))


def test_the_copy_follows_the_search_epoch_by_epoch_and_loads_with_optuna(tmp_path):
    search, db = Search(), tmp_path / "optuna.db"
    mirror = OptunaMirror(search, str(db), "s", metric=METRIC,
                          name_of=lambda t: f"trial_{t.config['trial_number']:03d}")
    first, second = search.ask(), search.ask()
    mirror.sync([ray_trial(0), ray_trial(1)])
    running = loaded(db)
    assert [t.state for t in running.trials] == [optuna.trial.TrialState.RUNNING] * 2
    assert running.trials[0].params == first.params and running.trials[1].params == second.params
    assert running.trials[0].user_attrs == {"ray_trial_id": "id000", "trial_name": "trial_000"}
    assert running.metric_names == [METRIC] and running.direction == optuna.study.StudyDirection.MAXIMIZE

    search.report(0, 1, 0.6)
    mirror.sync([ray_trial(0, {"training_iteration": 1, METRIC: 0.6})])
    assert loaded(db).trials[0].intermediate_values == {1: 0.6}
    # Ray hands the last epoch to the searcher as the final value only; the copy keeps it as an epoch too.
    search.tell(0, 0.7)
    mirror.sync([ray_trial(0, {"training_iteration": 2, METRIC: 0.7}), ray_trial(1)])
    search.study.tell(search.running.pop(1), state=optuna.trial.TrialState.FAIL)  # errored before any epoch
    mirror.on_experiment_end(trials=[ray_trial(1)])
    done = loaded(db).trials
    assert [(t.state.name, t.value) for t in done] == [("COMPLETE", 0.7), ("FAIL", None)]
    assert done[0].intermediate_values == {1: 0.6, 2: 0.7}
    assert len(optuna.get_all_study_summaries(optuna_db_url(db))) == 1


def test_a_resume_continues_the_same_study_in_the_file(tmp_path):
    search, db = Search(), tmp_path / "optuna.db"
    OptunaMirror(search, str(db), "s", metric=METRIC).sync()
    search.ask()
    search.report(0, 1, 0.5)
    first = OptunaMirror(search, str(db), "s", metric=METRIC)
    first.sync([ray_trial(0)])
    study_id = loaded(db)._study_id
    first.close()

    # A new driver restores the searcher (here: the same state plus an epoch) and makes a new mirror.
    search.report(0, 2, 0.55)
    search.tell(0, 0.6)
    search.ask()
    OptunaMirror(search, str(db), "s", metric=METRIC).sync([ray_trial(0, {"training_iteration": 3, METRIC: 0.6})])
    again = loaded(db)
    assert again._study_id == study_id  # the same study, not a new one: an open dashboard keeps showing it
    assert [t.state.name for t in again.trials] == ["COMPLETE", "RUNNING"]
    assert again.trials[0].intermediate_values == {1: 0.5, 2: 0.55, 3: 0.6}


def run_as_ray_does(search, mirror, epochs: dict, diverged=()):
    """Trials of ``epochs`` ({number: [value per epoch]}) reported and ended as Ray drives a search and its
    callbacks: each epoch reaches the searcher as an intermediate value but the last, which it hears only
    as the trial's final value, while the callbacks see every result (``diverged``: a NaN loss at the last)."""
    for number, values in epochs.items():
        search.ask()
        for epoch, value in enumerate(values[:-1], start=1):
            search.report(number, epoch, value)
        search.tell(number, values[-1])
    mirror.sync([ray_trial(n, {"training_iteration": len(v), METRIC: v[-1], "diverged": int(n in diverged)})
                 for n, v in epochs.items()])


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_trials_value_is_its_best_epoch_and_asha_stopped_trials_are_pruned(tmp_path, direction):
    """As the leaderboard ranks them: best_<metric> over the epochs, by the study's mode, and status
    stopped (fewer epochs than max_epochs, not diverged) is Optuna's PRUNED; best_trial is the leaderboard's best."""
    search, db = Search(direction=direction), tmp_path / "optuna.db"
    mirror = OptunaMirror(search, str(db), "s", metric=METRIC, max_epochs=3)
    sign = 1 if direction == "maximize" else -1
    epochs = {0: [0.7, 0.9, 0.6], 1: [0.8], 2: [0.5, 0.85], 3: [0.6, 0.65, 0.8]}  # 1: stopped; 2: diverged
    run_as_ray_does(search, mirror, {n: [sign * v for v in values] for n, values in epochs.items()}, diverged={2})
    trials = loaded(db).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"]
    assert [t.value for t in trials] == pytest.approx([sign * 0.9, sign * 0.8, sign * 0.85, sign * 0.8])
    assert trials[0].intermediate_values == pytest.approx({1: sign * 0.7, 2: sign * 0.9, 3: sign * 0.6})
    assert loaded(db).best_trial.number == 0  # Ray's last values would name trial 3
    # The searcher keeps what Ray told it: TPE's history is Ray's to decide.
    assert [t.state.name for t in search.study.trials] == ["COMPLETE"] * 4
    assert search.study.trials[0].value == pytest.approx(sign * 0.6)


def test_a_resume_keeps_a_file_with_best_values_and_pruned_trials(tmp_path):
    """The copy records other values and states than the searcher holds; a new driver's mirror still
    finds the file a prefix of the searcher's study, and goes on with it."""
    search, db = Search(), tmp_path / "optuna.db"
    first = OptunaMirror(search, str(db), "s", metric=METRIC, max_epochs=3)
    run_as_ray_does(search, first, {0: [0.7, 0.9, 0.6], 1: [0.8]})
    study_id = loaded(db)._study_id
    first.close()
    search.ask()
    again = OptunaMirror(search, str(db), "s", metric=METRIC, max_epochs=3)
    again.sync([ray_trial(0, {"training_iteration": 3, METRIC: 0.6}), ray_trial(1, {"training_iteration": 1, METRIC: 0.8}),
                ray_trial(2)])
    trials = loaded(db)
    assert trials._study_id == study_id
    assert [(t.state.name, t.value) for t in trials.trials] == [("COMPLETE", 0.9), ("PRUNED", 0.8), ("RUNNING", None)]


def test_a_file_ahead_of_the_restored_search_is_rebuilt_from_it(tmp_path):
    """A driver killed after its searcher's checkpoint: the file holds trials the restored searcher never asked."""
    db = tmp_path / "optuna.db"
    ahead = Search(seed=1)
    for _ in range(3):
        ahead.ask()
    ahead.tell(0, 0.9)
    OptunaMirror(ahead, str(db), "s").sync()
    optuna.create_study(study_name="copied-from-elsewhere", storage=optuna_db_url(db))

    restored = Search(seed=2)  # the checkpoint: one trial, still running, other parameters
    restored.ask()
    OptunaMirror(restored, str(db), "s").sync()
    summaries = optuna.get_all_study_summaries(optuna_db_url(db))
    assert [s.study_name for s in summaries] == ["s"]  # the folder's file holds its own study alone
    trials = loaded(db).trials
    assert [(t.number, t.state.name, t.params) for t in trials] == [(0, "RUNNING", restored.study.trials[0].params)]


def test_what_ray_pickles_of_the_mirror_holds_no_path_and_writes_nothing(tmp_path):
    """Ray pickles the run's callbacks into tuner.pkl: a resume must not find the folder's old path there."""
    search, db = Search(), tmp_path / "original" / "optuna.db"
    db.parent.mkdir()
    mirror = OptunaMirror(search, str(db), "s")
    search.ask()
    mirror.sync([ray_trial(0)])
    data = pickle.dumps(mirror)
    assert b"original" not in data and b"optuna.db" not in data
    before = db.read_bytes()
    copy = pickle.loads(data)
    copy.sync([ray_trial(0)])
    copy.on_experiment_end(trials=[])
    assert db.read_bytes() == before


def test_a_failing_write_never_stops_the_search(tmp_path, capsys):
    search = Search()
    search.ask()
    mirror = OptunaMirror(search, str(tmp_path / "no such folder" / "optuna.db"), "s")
    mirror.sync([ray_trial(0)])
    mirror.sync([ray_trial(0)])
    err = capsys.readouterr().err
    assert err.count("could not update") == 1 and "the study goes on" in err


def test_the_hint_line_names_the_commands_and_says_a_bucket_has_no_optuna_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = StudyFolder("runs", "quickstart")
    line = dashboards_line(local, mlflow_uri="file:///tmp/mlruns")
    assert line.startswith("dashboards: optuna-dashboard sqlite:///runs/quickstart/optuna.db")
    assert "tensorboard --logdir runs/quickstart" in line
    assert "MLflow experiment 'quickstart' at file:///tmp/mlruns" in line
    bucket = SimpleNamespace(is_local=False, name="q", uri=lambda *parts: "s3://bucket/runs/q")
    line = dashboards_line(bucket)
    assert "tensorboard --logdir s3://bucket/runs/q" in line and "no optuna.db" in line
    assert "optuna-dashboard sqlite" not in line


def test_the_hint_line_says_how_to_install_a_missing_dashboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = StudyFolder("runs", "quickstart")
    missing = dashboards_line(local, have=lambda module: False)
    assert missing.endswith("(optuna-dashboard and tensorboard not installed here: "
                            "pip install 'medsearch[dashboards]')")
    assert "not installed" not in dashboards_line(local, have=lambda module: True)
    only_tb = dashboards_line(local, have=lambda module: module != "tensorboard")
    assert only_tb.endswith("(tensorboard not installed here: pip install 'medsearch[dashboards]')")
    bucket = SimpleNamespace(is_local=False, name="q", uri=lambda *parts: "s3://bucket/runs/q")
    assert "(tensorboard not installed here" in dashboards_line(bucket, have=lambda module: False)  # no optuna.db


def test_mlflow_uri_is_a_resource_flag_that_a_resume_re_applies():
    assert "mlflow_uri" in RESOURCE_FLAGS
    args = parse_args(["spaces/quickstart.py", "--mlflow-uri", "file:///tmp/mlruns"])
    assert given_flags(args) == {"mlflow_uri": "file:///tmp/mlruns"}
    record = {"flags": json.loads(json.dumps(given_flags(args)))}
    resumed = with_recorded_flags(parse_args(["spaces/quickstart.py", "--resume"]), record)
    assert resumed.mlflow_uri == "file:///tmp/mlruns"
    again = parse_args(["spaces/quickstart.py", "--resume", "--mlflow-uri", "http://h:5000"])
    moved = with_recorded_flags(again, record)
    assert moved.mlflow_uri == "http://h:5000"  # where it runs may change on resume


def test_mlflow_uri_without_mlflow_is_a_named_error_before_ray_starts(write_study, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(MLflowUnavailableError, match=r"pip install 'medsearch\[mlflow\]'"):
        check_mlflow("file:///x")
    path = write_study("STUDY = Study(name='x', space=lambda trial: {'backbone': 'cnn_s3'}, num_samples=1)\n")
    assert main([str(path), "--storage", str(tmp_path / "runs"), "--mlflow-uri", "file:///x"]) == 2
    err = capsys.readouterr().err
    assert "--mlflow-uri 'file:///x'" in err and "pip install 'medsearch[mlflow]'" in err
    assert not ray.is_initialized()


def test_a_file_store_uri_opts_in_to_mlflows_file_store(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")  # recorded, so the test leaves the variable as it was
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    callback = mlflow_callback("file:///tmp/mlruns", "s")
    assert callback.tracking_uri == "file:///tmp/mlruns" and callback.experiment_name == "s"
    import os

    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
