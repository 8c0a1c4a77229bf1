"""Cheap first: a study's first trials are drawn from the configurations that train a head on cached features.

Trials differ in cost by orders of magnitude: a frozen pretrained backbone whose
features the activation cache holds trains its head in seconds, while a trial
that fine-tunes the whole network, or trains a CNN from scratch, runs the network
over every image every epoch. TPE's first trials are random (its start-up); drawn
from the whole space, most of them are expensive, and the search waits minutes
for its first few measurements. Drawn from the cheap part, the same start-up
costs seconds a trial: the study has results, and TPE a model, while one
expensive trial would still be training. TPE then samples the whole space.

The cheap trials are ordinary trials of the study: each is one of the space's
own configurations, found by sampling ``space(trial)`` at random (seeded by the
study, on a stream of its own: ``search.distinct.stream_seed``) and kept when ``is_head_only`` says so, then queued in the searcher's
Optuna study (Ray's ``OptunaSearch(points_to_evaluate=...)``, i.e.
``enqueue_trial``). Nothing else changes: the same trainable, ASHA, results.
"""

from __future__ import annotations

from search.study import Study

__all__ = ["CHEAP_FIRST_MAX", "cheap_first_count", "cheap_first_points", "is_head_only"]

CHEAP_FIRST_MAX = 10  # TPE's n_startup_trials: the random trials it runs before it models
_DRAWS_PER_POINT = 50  # random draws of the space per cheap trial wanted, before giving up on finding more


def cheap_first_count(study: Study) -> int:
    """How many of the study's first trials are drawn cheap: ``study.cheap_first``, or with "auto" a quarter
    of ``num_samples`` up to ``CHEAP_FIRST_MAX`` (``CHEAP_FIRST_MAX`` when trials run until the time limit);
    0 without the activation cache (nothing is cheap then)."""
    if not study.activation_cache:
        return 0
    if study.cheap_first == "auto":
        return CHEAP_FIRST_MAX if study.num_samples is None else min(CHEAP_FIRST_MAX, study.num_samples // 4)
    return int(study.cheap_first) if study.num_samples is None else min(int(study.cheap_first), study.num_samples)


def is_head_only(hparams: dict, augment_views: int = 0) -> bool:
    """Whether a trial with these hyperparameters trains only a head, on features the activation cache serves."""
    from trainables.activation_cache import can_use_cache
    from trainables.hparams import resolve_hparams

    hp = resolve_hparams(hparams)
    return hp["unfreeze"] in (0, "0") and can_use_cache(hp, augment_views)


def cheap_first_points(study: Study, n: int | None = None) -> list[dict]:
    """Optuna parameters of up to ``n`` (default ``cheap_first_count``) different head-only configurations of
    the study's space, in the order they were drawn; fewer when the space has fewer, none when it has none."""
    import optuna

    from search.distinct import stream_seed, trained_config  # imports Ray: only when drawing

    n = cheap_first_count(study) if n is None else n
    if n <= 0:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Its own stream: with the study's seed itself, TPE's random start-up (a RandomSampler of the sampler's
    # seed) replayed these draws, and trained the cheap configurations again (search.distinct).
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=stream_seed(study.seed, "cheap_first")))
    points: dict[tuple, dict] = {}  # trained configuration -> its Optuna parameters
    for _ in range(n * _DRAWS_PER_POINT):
        trial = draws.ask()
        hparams = {**study.fixed, **study.space(trial)}
        draws.tell(trial, 0.0)
        key = trained_config(hparams, study.max_epochs)
        if key not in points and is_head_only(hparams, study.augment_views):
            points[key] = dict(trial.params)
            if len(points) == n:
                break
    return list(points.values())
