"""Distinct trials: a study never trains the same configuration twice.

Two things made trials repeat. The study's random streams were one stream:
cheap first (``search.cheap_first``) drew its configurations with
``RandomSampler(seed=study.seed)``, and TPE's random start-up draws with a
``RandomSampler`` of the same seed inside ``TPESampler(seed=study.seed)``, so
the first start-up trials replayed the cheap draws, and every cheap one among
them trained again (a 20-trial melanoma study trained 3 configurations twice).
Each stream now has its own seed, derived from the study's (``stream_seed``).

And nothing refused a repeat: TPE (or chance, in a small discrete space) can
propose a configuration that has run or is running. ``DistinctSearch`` is
Ray's ``OptunaSearch`` that compares each proposal's *trained* configuration
(the space's values over the study's fixed ones and the defaults, as
``trainables.hparams.effective_hparams`` resolves them; not ``trial_number``,
which only names and seeds the trial) with every earlier trial's. A repeat is
told to Optuna as failed (it never ran, so TPE learns nothing from it) with
the user attribute ``repeats_trial``, and a configuration not yet trained is
drawn at random from the space and queued in its place, with the user
attribute ``resampled``; the driver's log says so, and ``optuna.db`` shows both.
When ``RESAMPLE_DRAWS`` draws find none, every configuration of the space has
run or is running: the searcher says it has finished, and the study ends with
the trials it has (``searcher_exhausted``).
"""

from __future__ import annotations

import hashlib

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from trainables.hparams import HPARAM_NAMES, effective_hparams

__all__ = ["RESAMPLE_DRAWS", "DistinctSearch", "searcher_exhausted", "stream_seed", "trained_config"]

# Random draws of the space looking for a configuration not trained yet, before calling the space exhausted:
# a space with one untried configuration in 20 is still found with probability 1 - (19/20)**200 > 0.9999.
RESAMPLE_DRAWS = 200


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one of a study's random streams ("sampler", "cheap_first", "resample"): fixed by the study's
    seed, so a re-run draws the same, and unrelated between streams, so no stream replays another."""
    digest = hashlib.sha256(f"medsearch/{stream}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")  # numpy's RandomState takes seeds below 2**32


def trained_config(config: dict, max_epochs: int | None = None) -> tuple:
    """What a trial given ``config`` trains with, hashable: every hyperparameter after the defaults and the
    adjustments (Optuna's own parameter names, and ``trial_number``, left out: they change nothing trained)."""
    hp = effective_hparams(config, max_epochs)[0]
    return tuple((name, repr(hp[name])) for name in HPARAM_NAMES)


class DistinctSearch(OptunaSearch):
    """``OptunaSearch`` that re-samples a proposal whose trained configuration an earlier trial has (see above).

    ``seed``: the study's, for the re-sampling stream; ``max_epochs``: the study's, which
    ``effective_hparams`` needs. Pickled with Ray's experiment state like ``OptunaSearch``, so a
    resumed study remembers what it trained.
    """

    def __init__(self, *, seed: int, max_epochs: int | None = None, warm_trials: list | None = None, **kwargs):
        self._warm = list(warm_trials or [])  # an earlier study's trials (search.warm_start), added once, below
        super().__init__(**kwargs)
        self._max_epochs = max_epochs
        self._trial_of: dict[tuple, int] = {}  # trained configuration -> the Optuna number of the trial that has it
        self._drawn = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=stream_seed(seed, "resample")))
        self.exhausted = False

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._warm:  # before the first proposal; a resumed searcher is restored with them, not set up again
            self._ot_study.add_trials(self._warm)
            self._warm = []

    def suggest(self, trial_id: str):
        if self.exhausted:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        key = trained_config(config, self._max_epochs)
        earlier = self._trial_of.get(key)
        if earlier is None or earlier == config["trial_number"]:  # new, or Ray asking again for the same trial
            self._trial_of[key] = config["trial_number"]
            return config
        refused = self._ot_trials.pop(trial_id)
        refused.set_user_attr("repeats_trial", earlier)
        self._ot_study.tell(refused, state=optuna.trial.TrialState.FAIL)
        params = self._untrained_params()
        if params is None:
            self.exhausted = True
            print(f"Distinct trials: trial {refused.number} would repeat trial {earlier}, and {RESAMPLE_DRAWS} random "
                  f"draws of the space found no configuration that has not run: every one of the space's "
                  f"{len(self._trial_of)} configurations has run or is running, so the study ends with them",
                  flush=True)
            return Searcher.FINISHED
        why = f"trial {refused.number} would have repeated trial {earlier}"
        self._ot_study.enqueue_trial(params, user_attrs={"resampled": why})
        config = super().suggest(trial_id)
        self._trial_of[trained_config(config, self._max_epochs)] = config["trial_number"]
        print(f"Distinct trials: {why} (the same configuration); re-sampled at random as trial "
              f"{config['trial_number']}", flush=True)
        return config

    def _untrained_params(self) -> dict | None:
        """Optuna parameters of a configuration of the space that no trial has, drawn at random; None if none is
        found in ``RESAMPLE_DRAWS`` draws."""
        for _ in range(RESAMPLE_DRAWS):
            trial = self._drawn.ask()
            config = self._suggest_from_define_by_run_func(self._space, trial)
            self._drawn.tell(trial, 0.0)
            if trained_config(config, self._max_epochs) not in self._trial_of:
                return dict(trial.params)
        return None


def searcher_exhausted(searcher) -> bool:
    """Whether ``searcher`` (a ``DistinctSearch``, or a wrapper of one) ended the study for want of new
    configurations: then fewer trials than ``num_samples`` is the study's end, not an interruption."""
    while searcher is not None and not isinstance(searcher, DistinctSearch):
        searcher = getattr(searcher, "searcher", None)
    return bool(searcher is not None and searcher.exhausted)
