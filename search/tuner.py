"""``make_tuner``: a Study becomes a Ray Tune ``Tuner`` (Optuna TPE + ASHA).

What to search lives in ``TuneConfig``, how to run it in ``RunConfig``, as in Ray.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search.accounting import TrialAccountant
from search.progress import ProgressPrinter
from search.results import LeaderboardWriter
from search.storage import StudyFolder
from search.study import Study
from trainables.train import TrialSettings, train_trial


class StudySpace:
    """The study's space plus its fixed values: what OptunaSearch calls for each trial.

    Ray pickles the searcher to checkpoint the experiment, and a function from a
    study file cannot be pickled by reference, so this pickles the file's path
    and loads the function again when unpickled. A resumed run first binds the
    study it loaded and checked (``bind_resumed``): the restored searcher then
    calls that, not whatever the recorded path holds by now.
    """

    def __init__(self, study: Study):
        self.name, self.source, self.fixed, self._space = study.name, study.source, dict(study.fixed), study.space

    def __call__(self, trial) -> dict:
        if self._space is None:
            study = _RESUMED.get(getattr(self, "name", None))
            if study is None:
                from search.study import load_study

                study = load_study(self.source)
            self.fixed, self._space = dict(study.fixed), study.space
        # Optuna's trial number names the trial and seeds it, reproducibly.
        return {**self.fixed, **self._space(trial), "trial_number": trial.number}

    def __getstate__(self):
        if self.source is None:
            return self.__dict__  # built in code, not from a file: pickle the function itself
        return {**self.__dict__, "_space": None}


_RESUMED: dict[str, Study] = {}  # study name -> the study a resume in this process loaded and checked


def bind_resumed(study: Study) -> None:
    """The study that restored searchers in this process call (see ``StudySpace``)."""
    _RESUMED[study.name] = study


# How long a reused actor waits for its stopped trial's thread to unwind. Ray's default, 2 s, is shorter
# than a large model's unwind on a busy machine, and a reset that gives up loses the next trial.
REUSE_WAIT_S = 300


def worker_env() -> dict:
    """Environment variables of every trial process (``ray.init(runtime_env={"env_vars": ...})``)."""
    return {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONWARNINGS": "ignore",
        # Ray reads it in the trial's process; a value the user set in Ray's own variable wins.
        "TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_WAIT_S)),
    }


class ResumedSearch(SearchGenerator):
    """Ray's wrapper of a restored searcher (as ``tune.run`` makes it), whose new trials write to the folder resumed.

    Restoring the wrapper brings back the ``Experiment`` pickled by the run that
    started (``SearchGenerator.set_state``), and with it that run's
    ``StorageContext``: trials it creates after the resume would write their
    checkpoints where the folder was, not into a moved or copied folder resumed
    from another ``--storage``. Ray re-roots only the trials it restores
    (``TuneController._restore_trials``); this re-roots the experiment the same way.
    """

    def __init__(self, searcher, *, storage_path: str, name: str):
        super().__init__(searcher)
        self._storage_path, self._name = storage_path, name

    def set_state(self, state: dict):
        super().set_state(state)
        from ray.train._internal.storage import get_fs_and_path

        storage = copy.copy(self._experiment.storage)
        storage.storage_filesystem, fs_path = get_fs_and_path(self._storage_path, None)
        storage.storage_fs_path = Path(fs_path).as_posix()
        storage.experiment_dir_name = self._name
        self._experiment.storage = self._experiment.spec["storage"] = storage


def make_searcher(study: Study) -> ConcurrencyLimiter:
    from search.cheap_first import cheap_first_points

    sampler = optuna.samplers.TPESampler(seed=study.seed)
    cheap = cheap_first_points(study)
    if cheap:
        print(f"Cheap first: the first {len(cheap)} trials train heads on cached features (cheap_first="
              f"{study.cheap_first!r}); then TPE samples the whole space", flush=True)
    searcher = OptunaSearch(space=StudySpace(study), metric=study.metric, mode=study.mode, sampler=sampler,
                            points_to_evaluate=cheap or None)
    return ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent)


def make_scheduler(study: Study) -> ASHAScheduler:
    return ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch, so rungs are epochs
        max_t=study.max_epochs,
        grace_period=study.grace_period,
        reduction_factor=study.reduction_factor,
    )


def make_trainable(study: Study, data: dict, settings: TrialSettings, weights_files: dict | None = None):
    """``train_trial`` with its resources; the data and weight files go once into Ray's object store."""
    resources = {"cpu": study.cpus_per_trial, "gpu": study.gpus_per_trial}
    trainable = tune.with_parameters(train_trial, data=data, settings=settings, weights_files=weights_files or {})
    return tune.with_resources(trainable, resources)


def trial_name(trial) -> str:
    """Readable in logs and the dashboard, e.g. ``trial_007_mobilenet_v2``."""
    return f"trial_{trial.config.get('trial_number', 0):03d}_{trial.config.get('backbone', 'model')}"


def make_tuner(study: Study, *, folder: StudyFolder, data: dict, settings: TrialSettings,
               weights_files: dict | None = None, resume: bool = False, callbacks=(),
               mlflow_uri: str | None = None) -> tune.Tuner:
    """A Tuner for ``study`` writing to ``folder`` (local or a bucket); ``resume`` restores it from there.

    ``callbacks``: more Ray Tune callbacks, after the study's own. ``mlflow_uri``: log the trials to
    MLflow there too (see ``search.dashboards``).
    """
    reporters = [
        LeaderboardWriter(folder, metric=study.metric, mode=study.mode, max_epochs=study.max_epochs,
                          random_init=settings.random_init),
        ProgressPrinter(metric=study.metric, mode=study.mode, max_epochs=study.max_epochs, num_samples=study.num_samples,
                        time_limit_s=study.time_limit_s, max_concurrent=study.max_concurrent),
    ]
    trainable = make_trainable(study, data, settings, weights_files)
    if resume:
        bind_resumed(study)
        # Restoring brings back the searcher, scheduler and trials; callbacks are not saved.
        tuner = tune.Tuner.restore(folder.uri(), trainable=trainable, resume_unfinished=True, resume_errored=True)
        searcher = tuner._local_tuner._tune_config.search_alg  # noqa: SLF001 (the restored one, which Tune runs)
        run_config = tuner._local_tuner._run_config  # noqa: SLF001 (storage_path and name: the folder resumed)
        tuner._local_tuner._tune_config.search_alg = ResumedSearch(  # noqa: SLF001
            searcher, storage_path=run_config.storage_path, name=run_config.name)
        dashboards = dashboard_callbacks(study, folder, searcher, mlflow_uri)
        tuner._local_tuner._run_config.callbacks = [*with_accountant(reporters, searcher, study),  # noqa: SLF001
                                                    *dashboards, *callbacks]
        return tuner
    searcher = make_searcher(study)
    dashboards = dashboard_callbacks(study, folder, searcher, mlflow_uri)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=study.metric,
            mode=study.mode,
            search_alg=searcher,
            scheduler=make_scheduler(study),
            num_samples=study.num_samples,
            time_budget_s=study.time_limit_s,
            reuse_actors=True,  # skips a TensorFlow import per trial
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=make_run_config(study, folder.storage,
                                   [*with_accountant(reporters, searcher, study), *dashboards, *callbacks]),
    )


def dashboard_callbacks(study: Study, folder: StudyFolder, searcher, mlflow_uri: str | None = None) -> list:
    """The callbacks that feed the dashboards users run (``search.dashboards``), and one line saying how.

    A local results folder gets ``optuna.db``, a copy of ``searcher``'s Optuna study kept up to date
    (a bucket cannot hold SQLite: the line says so); ``mlflow_uri`` adds Ray's MLflow logger.
    TensorBoard needs nothing: Ray Tune writes event files into each trial's folder.
    """
    from search.dashboards import OPTUNA_DB, dashboards_line, mlflow_callback

    callbacks = []
    if folder.is_local:
        from search.optuna_mirror import OptunaMirror

        callbacks.append(OptunaMirror(searcher, f"{folder.path}/{OPTUNA_DB}", study.name, metric=study.metric,
                                      name_of=trial_name, max_epochs=study.max_epochs))
    if mlflow_uri:
        callbacks.append(mlflow_callback(mlflow_uri, study.name))
    print(dashboards_line(folder, mlflow_uri=mlflow_uri), flush=True)
    return callbacks


def with_accountant(reporters: list, searcher, study: Study) -> list:
    """The reporters, and last the accountant that tells them of trials Ray ended without a word."""
    return [*reporters, TrialAccountant(searcher, reporters, num_samples=study.num_samples)]


def make_run_config(study: Study, storage: str, callbacks: list) -> tune.RunConfig:
    """``storage``: a local path or a pyarrow URI; Ray Tune writes the trials' checkpoints there from each node."""
    return tune.RunConfig(
        name=study.name,
        storage_path=storage,
        callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1,  # trials checkpoint only on improvement, so the newest is the best
            checkpoint_score_attribute=study.metric,
            checkpoint_score_order=study.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        verbose=0,  # ProgressPrinter speaks instead
    )
