"""``make_tuner``: a Study becomes a Ray Tune ``Tuner`` (Optuna TPE + ASHA).

What to search lives in ``TuneConfig``, how to run it in ``RunConfig``, as in Ray.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import optuna
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search.accounting import TrialAccountant
from search.distinct import DistinctSearch, searcher_exhausted, stream_seed
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


def make_searcher(study: Study, warm=None) -> ConcurrencyLimiter:
    from search.cheap_first import cheap_first_points

    # Its own stream: TPE's random start-up draws with a RandomSampler of this seed, which must not replay
    # the cheap-first draws (search.distinct).
    sampler = optuna.samplers.TPESampler(seed=stream_seed(study.seed, "sampler"))
    warmed = warm is not None and len(warm.trials) > 0
    # TPE's start-up is what cheap first makes cheap; a warm start's trials are that start-up already.
    cheap = [] if warmed and study.cheap_first == "auto" else cheap_first_points(study)
    if cheap:
        print(f"Cheap first: the first {len(cheap)} trials train heads on cached features (cheap_first="
              f"{study.cheap_first!r}); then TPE samples the whole space", flush=True)
    searcher = DistinctSearch(seed=study.seed, max_epochs=study.max_epochs, space=StudySpace(study),
                              metric=study.metric, mode=study.mode, sampler=sampler, points_to_evaluate=cheap or None,
                              warm_trials=warm.trials if warm is not None else None)
    return ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent)


class StudyScheduler(ASHAScheduler):
    """ASHA, which on a resume also keeps ended the trials whose end the driver recorded after Ray's last state save.

    Ray saves its experiment state every 10 s or so (and after each trial checkpoint), not when a trial ends.
    A driver killed in between leaves a trial that the leaderboard records as finished (or stopped, diverged)
    still running in Ray's state; ``resume_unfinished`` then trains it again from its last checkpoint, under
    the same trial id, and its row mixed the two trainings (issue 27.3). ``ended`` holds, for each such trial
    the leaderboard recorded as ended, its recorded epochs: Ray's restored trial is told them and is ended
    before it is queued, as if Ray's state had seen its end (``keep_ended``).
    """

    def __init__(self, *, ended: dict[str, list[dict]] | None = None, **asha):
        super().__init__(**asha)
        self.ended = dict(ended or {})  # trial_id -> its recorded epochs, oldest first

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        epochs = self.ended.pop(trial.trial_id, None)
        if epochs and trial.status == Trial.PENDING:  # restored as unfinished (TERMINATED ones need nothing)
            keep_ended(tune_controller, trial, epochs)

    def __getstate__(self):  # tuner.pkl: a later resume reads the leaderboard afresh
        return {**self.__dict__, "ended": {}}


def keep_ended(tune_controller, trial, epochs: list[dict]) -> None:
    """End a restored ``trial`` the way Ray ends a trial, with the results the driver recorded after Ray's last save.

    Called from ``StudyScheduler.on_trial_add``, while Ray's ``TuneController.add_trial`` restores it:
    there the trial is already among the live trials but not yet filed by status, so setting it
    TERMINATED here makes it what a trial restored TERMINATED is (never started; the callbacks'
    resume baselines count it as done). The searcher hears the missing epochs and the end, as it
    would have (TPE learns the trial's value and its ``ConcurrencyLimiter`` slot is given back).
    """
    searcher = tune_controller.search_alg
    seen = int((trial.last_result or {}).get("epoch") or 0)  # Ray's last result of it, at its last state save
    for row in epochs:
        if int(row["epoch"]) <= seen:
            continue
        result = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        result["training_iteration"] = int(row["epoch"])  # one report per epoch
        trial.update_last_result(result)
        searcher.on_trial_result(trial.trial_id, result)
    searcher.on_trial_complete(trial.trial_id, result=trial.last_result)
    tune_controller.get_live_trials().discard(trial)
    trial.set_status(Trial.TERMINATED)


def space_exhausted(tuner: tune.Tuner | None) -> bool:
    """Whether ``tuner``'s searcher ended the study because every configuration of its space had run."""
    local = getattr(tuner, "_local_tuner", None)  # noqa: SLF001 (the searcher Tune ran, as make_tuner reaches it)
    return local is not None and searcher_exhausted(local._tune_config.search_alg)  # noqa: SLF001


def make_scheduler(study: Study, ended: dict[str, list[dict]] | None = None) -> StudyScheduler:
    """ASHA for ``study``; ``ended``: on a resume, the trials to keep ended (see ``StudyScheduler``)."""
    return StudyScheduler(
        time_attr="training_iteration",  # one report per epoch, so rungs are epochs
        max_t=study.max_epochs,
        grace_period=study.grace_period,
        reduction_factor=study.reduction_factor,
        ended=ended,
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
               mlflow_uri: str | None = None, warm=None) -> tune.Tuner:
    """A Tuner for ``study`` writing to ``folder`` (local or a bucket); ``resume`` restores it from there.

    ``callbacks``: more Ray Tune callbacks, after the study's own. ``mlflow_uri``: log the trials to
    MLflow there too (see ``search.dashboards``). ``warm``: a ``search.warm_start.WarmStart`` whose trials seed
    a new searcher.
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
        # tuner.pkl holds the scheduler as it was before the first run's fit: this one is the same, and it keeps
        # the trials whose end the leaderboard recorded ended even where Ray's state had them still running.
        tuner._local_tuner._tune_config.scheduler = make_scheduler(  # noqa: SLF001
            study, ended=reporters[0].ended_epochs())
        searcher = tuner._local_tuner._tune_config.search_alg  # noqa: SLF001 (the restored one, which Tune runs)
        run_config = tuner._local_tuner._run_config  # noqa: SLF001 (storage_path and name: the folder resumed)
        tuner._local_tuner._tune_config.search_alg = ResumedSearch(  # noqa: SLF001
            searcher, storage_path=run_config.storage_path, name=run_config.name)
        dashboards = dashboard_callbacks(study, folder, searcher, mlflow_uri)
        tuner._local_tuner._run_config.callbacks = [*with_accountant(reporters, searcher, study),  # noqa: SLF001
                                                    *dashboards, *callbacks]
        return tuner
    searcher = make_searcher(study, warm)
    dashboards = dashboard_callbacks(study, folder, searcher, mlflow_uri)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=study.metric,
            mode=study.mode,
            search_alg=searcher,
            scheduler=make_scheduler(study),
            num_samples=-1 if study.num_samples is None else study.num_samples,  # -1: until time_budget_s
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
