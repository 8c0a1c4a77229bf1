"""``OptunaMirror``: the search's Optuna study, copied as it runs into the results folder's ``optuna.db``.

The study itself lives in memory inside Ray's ``OptunaSearch``, and Ray checkpoints
it with the searcher; a resume restores the searcher as it was at its last
checkpoint. This callback copies that study, trial by trial, into an SQLite
database in the results folder, so ``optuna-dashboard sqlite:///runs/<study>/optuna.db``
and ``optuna.load_study`` see it live and after the run: the same trial numbers,
parameters (with their distributions), per-epoch values (as intermediate values,
step = epoch), final values and states, plus each trial's Ray ``trial_id`` and
``trial_name`` as user attributes. The searcher hears a trial's last epoch only as
its final value; the copy adds that epoch to the intermediate values too (from the
trial's last result), so every epoch shows in the dashboard's curves.

Two things the copy records as the leaderboard does, not as the searcher holds them.
A finished trial's value is its *best* epoch's (by the study's direction): the
leaderboard's ``best_<metric>``, the epoch its checkpoint holds; Ray tells the
searcher the last epoch's. And a trial that ASHA stopped (the leaderboard's status
``stopped``: it ended before ``max_epochs`` without diverging, ``search.results.trial_status``)
is ``PRUNED``, where the searcher has it ``COMPLETE``; it keeps its epochs and its best
value. The searcher itself is left as Ray made it.

So ``optuna.load_study(...).best_trial``, which Optuna takes among ``COMPLETE`` trials
only, is the leaderboard's best trial whenever that one ran every epoch or diverged.
The leaderboard ranks stopped trials too, but ASHA stops a trial only when its value
at a rung is below another trial's value there, so a stopped trial is the
leaderboard's best only if an epoch before the one it was stopped at scored higher
than every other trial's best (never in a study of ``max_epochs <= 2``, whose trials
can only be stopped after their first epoch). Then, and while the leaderboard's best
is still running or was interrupted (``RUNNING`` here), ``best_trial`` is the best of
the trials that ran to their end, and the leaderboard's best is the trial of best
value among the ``COMPLETE`` and ``PRUNED`` ones.

Why a copy, and not ``OptunaSearch(storage=RDBStorage(...))``: the database would
then *be* the searcher's study, and it cannot be rolled back to the searcher's
checkpoint. After a killed driver it would hold trials the restored searcher never
asked (their numbers skipped for good) and results reported after the checkpoint;
and the pickled searcher would carry the database's absolute path, so a copied
results folder would write to the original's ``optuna.db``. A copy has neither
problem: on every (re)start the mirror compares ``optuna.db`` with the searcher's
study, keeps it if it is a prefix of it (the usual case: a Ctrl+C and ``--resume``
just continue it), and rebuilds it otherwise. Nothing of it is pickled: each run
makes a new mirror for the folder it writes, so the folder stays sealed.

Only the driver writes ``optuna.db``, and never stops the study: a failed write is
reported once and retried at the next event.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState
from ray import tune

from search.dashboards import optuna_db_url
from search.results import trial_status

__all__ = ["OptunaMirror", "open_storage"]

SQLITE_TIMEOUT_S = 30  # a dashboard reading the file holds it briefly; wait for it rather than fail


def open_storage(path: str) -> RDBStorage:
    """An ``RDBStorage`` on the SQLite file ``path`` (created with Optuna's tables if missing)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return RDBStorage(optuna_db_url(path), engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


class OptunaMirror(tune.Callback):
    """Copies ``searcher``'s Optuna study into the SQLite file ``path`` as study ``study_name``.

    ``searcher`` is the study's ``ConcurrencyLimiter`` (or the ``OptunaSearch`` itself);
    its study is read at each event, so a searcher that Ray restores in place is followed.
    ``metric`` names the objective in the dashboard; ``name_of(trial)`` gives a Ray trial's name.
    ``max_epochs`` is the study's: a trial that ended before it (and did not diverge) was stopped
    by ASHA and is copied as ``PRUNED``; without it, no trial is.
    """

    def __init__(self, searcher, path: str, study_name: str, *, metric: str | None = None, name_of=str,
                 min_interval_s: float = 1.0, max_epochs: int | None = None):
        self.searcher, self.path, self.study_name, self.metric = searcher, path, study_name, metric
        self.name_of, self.min_interval_s, self.max_epochs = name_of, min_interval_s, max_epochs
        self._reset()

    def _reset(self) -> None:
        self._storage: RDBStorage | None = None
        self._study_id: int | None = None
        self._source = None  # the in-memory study that optuna.db copies
        self._copied: dict[int, dict] = {}  # trial number -> what optuna.db holds of it
        self._ray: dict[int, dict] = {}  # trial number -> {"ray_trial_id", "trial_name"}
        self._epochs: dict[int, dict] = {}  # trial number -> {epoch: metric} from Ray's results
        self._diverged: dict[int, bool] = {}  # trial number -> whether its last result had a NaN or inf loss
        self._last_sync = 0.0
        self._failing = False

    # Ray pickles the run's callbacks into tuner.pkl; a resume builds a new mirror for the folder it
    # writes, so what is pickled is an inert one: no path (the folder stays sealed), no connection.
    def __getstate__(self) -> dict:
        return {"path": None, "study_name": self.study_name}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(searcher=None, metric=None, name_of=str, min_interval_s=1.0, max_epochs=None, **state)
        self._reset()

    # --- Ray Tune's hooks: every event that can change the study (the searcher hears of it first) ---

    def on_trial_start(self, iteration, trials, trial, **info):
        self.sync(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.sync(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.sync(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.sync(trials)

    def on_step_end(self, iteration, trials, **info):  # e.g. a slot the accountant gave back as failed
        if time.monotonic() - self._last_sync >= self.min_interval_s:
            self.sync(trials)

    def on_experiment_end(self, trials, **info):
        self.sync(trials)
        self.close()

    # --- the copy ---

    def sync(self, trials=()) -> None:
        """Bring ``optuna.db`` up to the searcher's study; never raises (the study goes on without it)."""
        if self.path is None:
            return
        self._last_sync = time.monotonic()
        study = self._memory_study()
        if study is None:
            return
        try:
            self._learn(trials)
            if study is not self._source:
                self._attach(study)
            self._copy(study)
        except Exception as exc:  # noqa: BLE001 (a dashboard file must never end the search)
            self._source = None  # compare again from scratch at the next event
            if not self._failing:
                print(f"warning: could not update {self.path} for optuna-dashboard ({type(exc).__name__}: {exc}); "
                      "the study goes on, and the file is retried at the next trial event", file=sys.stderr, flush=True)
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        """Let go of the file (the next ``sync`` opens it again)."""
        if self._storage is not None:
            self._storage.engine.dispose()
        self._storage, self._source = None, None

    def _memory_study(self):
        optuna_search = getattr(self.searcher, "searcher", self.searcher)  # inside the ConcurrencyLimiter
        return getattr(optuna_search, "_ot_study", None)

    def _learn(self, trials) -> None:
        """Each Ray trial's id and name, its last result's epoch and metric, and whether it diverged, by Optuna
        trial number."""
        for trial in trials or ():
            number = trial.config.get("trial_number")
            if not isinstance(number, int):
                continue
            if number not in self._ray:
                self._ray[number] = {"ray_trial_id": trial.trial_id, "trial_name": self.name_of(trial)}
            result = trial.last_result or {}
            step, value = result.get("training_iteration"), result.get(self.metric)
            if isinstance(step, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._epochs.setdefault(number, {})[step] = float(value)
            if result:
                self._diverged[number] = bool(result.get("diverged"))  # trainables.train reports it every epoch

    def _intermediate(self, trial) -> dict:
        """The searcher's intermediate values of ``trial``, and, once it is finished, its last epoch's."""
        values = dict(trial.intermediate_values)
        if trial.state.is_finished():
            for step, value in self._epochs.get(trial.number, {}).items():
                values.setdefault(step, value)
        return values

    def _ending(self, trial, study) -> tuple[TrialState, list | None]:
        """The state and values the copy records of the searcher's ``trial`` (see the module's docstring).

        A ``COMPLETE`` trial gets its best epoch's value, and becomes ``PRUNED`` if ASHA stopped it;
        a ``PRUNED`` one (Ray's when the last result lacked the metric) gets its best epoch's value too.
        Others (running, failed), and multi-objective studies, are copied as they are.
        """
        state, values = trial.state, trial.values
        if state not in (TrialState.COMPLETE, TrialState.PRUNED) or len(study.directions) != 1:
            return state, values
        epochs = self._intermediate(trial)
        scores = [v for v in epochs.values() if math.isfinite(v)]
        if scores:
            values = [max(scores) if study.direction == StudyDirection.MAXIMIZE else min(scores)]
        if state == TrialState.COMPLETE and epochs and self.max_epochs is not None:
            status = trial_status(max(epochs), self.max_epochs, diverged=self._diverged.get(trial.number, False))
            if status == "stopped":
                state = TrialState.PRUNED
        return state, values

    def _attach(self, study) -> None:
        """Point the copy at ``study``: keep ``optuna.db`` if it is a prefix of it, else rebuild it."""
        if self._storage is None:
            self._storage = self._open()
        storage, memory = self._storage, study.get_trials(deepcopy=False)
        studies = {s.study_name: s._study_id for s in storage.get_all_studies()}
        study_id = studies.pop(self.study_name, None)
        for other in studies.values():  # the file is this folder's study alone (a folder copied under a new name)
            storage.delete_study(other)
        ending = functools.partial(self._ending, study=study)
        if study_id is not None and not _is_prefix(storage.get_all_trials(study_id, deepcopy=False), memory, ending):
            storage.delete_study(study_id)  # ahead of the restored searcher, or another search's: start again
            study_id = None
        if study_id is None:
            study_id = storage.create_new_study(study.directions, self.study_name)
            if self.metric:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # set_metric_names is experimental in some Optuna versions
                    optuna.load_study(study_name=self.study_name, storage=storage).set_metric_names([self.metric])
        self._study_id, self._source = study_id, study
        self._copied = {t.number: _copied(t) for t in storage.get_all_trials(study_id, deepcopy=False)}

    def _open(self) -> RDBStorage:
        try:
            return open_storage(self.path)
        except Exception as exc:  # noqa: BLE001 (not an Optuna database, or one of another schema: it is only a copy)
            if not os.path.exists(self.path):
                raise
            print(f"note: {self.path} could not be opened ({type(exc).__name__}); writing it anew", flush=True)
            os.replace(self.path, f"{self.path}.unreadable")
            return open_storage(self.path)

    def _copy(self, study) -> None:
        storage = self._storage
        for trial in study.get_trials(deepcopy=False):
            copied = self._copied.get(trial.number)
            extra = self._ray.get(trial.number, {})
            if copied is None:
                state, values = self._ending(trial, study)
                template = optuna.trial.FrozenTrial(
                    number=trial.number, state=state, value=None, values=values,
                    datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                    params=trial.params, distributions=trial.distributions,
                    user_attrs={**trial.user_attrs, **extra}, system_attrs=trial.system_attrs,
                    intermediate_values=self._intermediate(trial), trial_id=-1)
                made = storage.create_new_trial(self._study_id, template_trial=template)
                made_number = storage.get_trial_number_from_id(made)
                if made_number != trial.number:  # someone else wrote the file: rebuild it at the next event
                    raise RuntimeError(f"{self.path} numbered trial {trial.number} as {made_number}")
                self._copied[trial.number] = {**_copied(trial), "id": made, "user_attrs": {**trial.user_attrs, **extra},
                                              "steps": set(template.intermediate_values)}
                continue
            if copied["state"].is_finished():
                continue
            trial_id = copied["id"]
            for name in trial.params.keys() - copied["params"]:
                storage.set_trial_param(trial_id, name, trial.distributions[name].to_internal_repr(trial.params[name]),
                                        trial.distributions[name])
                copied["params"].add(name)
            intermediate = self._intermediate(trial)
            for step in sorted(intermediate.keys() - copied["steps"]):
                storage.set_trial_intermediate_value(trial_id, step, intermediate[step])
                copied["steps"].add(step)
            for key, value in {**trial.user_attrs, **extra}.items():
                if copied["user_attrs"].get(key, _MISSING) != value:
                    storage.set_trial_user_attr(trial_id, key, value)
                    copied["user_attrs"][key] = value
            for key, value in trial.system_attrs.items():
                if copied["system_attrs"].get(key, _MISSING) != value:
                    storage.set_trial_system_attr(trial_id, key, value)
                    copied["system_attrs"][key] = value
            if trial.state != copied["state"] and trial.state.is_finished():
                storage.set_trial_state_values(trial_id, *self._ending(trial, study))
                copied["state"] = trial.state


_MISSING = object()


def _copied(trial) -> dict:
    """What a copy of ``trial`` holds, to compare with the searcher's trial at the next event."""
    return {"id": trial._trial_id, "state": trial.state, "params": set(trial.params),
            "steps": set(trial.intermediate_values), "user_attrs": dict(trial.user_attrs),
            "system_attrs": dict(trial.system_attrs)}


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _is_prefix(copied: list, memory: list, ending) -> bool:
    """Whether the trials in ``optuna.db`` are an earlier state of the searcher's (so the copy just goes on).

    Not so when the file has a trial the searcher does not, a trial the file calls finished
    but the searcher does not (or with another result than the copy would record, ``ending(trial)``:
    its state and values), other parameters, or an epoch's value the searcher lacks (but for a
    finished trial's last epoch, which the copy adds): a driver that died after its last
    checkpoint, or another search.
    """
    if len(copied) > len(memory):
        return False
    for old, new in zip(sorted(copied, key=lambda t: t.number), memory):
        if old.number != new.number or old.params != new.params:
            return False
        if old.state.is_finished():
            state, values = ending(new)
            if old.state != state or len(old.values or ()) != len(values or ()) or not all(
                    map(_same, old.values or (), values or ())):
                return False
        if any(not _same(value, new.intermediate_values[step]) if step in new.intermediate_values
               else not new.state.is_finished() for step, value in old.intermediate_values.items()):
            return False
    return True
