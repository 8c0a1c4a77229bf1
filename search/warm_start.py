"""Warm start: a finished study's trials, where they fit this study, seed its searcher.

Why: every study used to start cold, and a second study on the same data learned
nothing from the first (Ray Tune's open request #42221; Optuna users call
``add_trials`` by hand). ``Study(warm_start="runs/first")`` or
``search.run ... --warm-start runs/first`` gives the earlier study's trials to
this one's TPE as if this study had run them.

What is taken: every trial in the earlier folder's ``optuna.db`` that ended with a
value (finished, or stopped by ASHA: its value is its best epoch's, as the
leaderboard ranks it) and fits this study:

- its parameters are exactly those this study's space asks for, each within the
  space's range or choices (the space run on them as an ``optuna.trial.FixedTrial``);
- everything else it trained with (fixed hyperparameters, defaults: its checkpoint's
  ``trial.json``, through ``analysis.results``) equals what this study would train it with.

The two studies must also score the same thing on the same images: the same
metric and mode, the same dataset (loader and its options, classes, image size,
split protocol and options), else a named error before Ray starts. Taken trials are added to the searcher's Optuna study
with this space's distributions (``DistinctSearch``), marked with the user
attribute ``warm_start_from``; they are not trained again and are not in this
study's leaderboard. Optuna numbers them first, so this study's first trial is
``trial_<N>`` after N taken trials, and ``optuna.db``'s best may be one of them.
A resumed study restores its searcher with them and does not take them again.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from search.study import StudyError
from trainables.hparams import HPARAM_NAMES, effective_hparams

__all__ = ["WarmStartError", "WarmStart", "warm_trials"]

# What makes two studies' scores comparable: the same images (loader, its options, classes), seen at the same size,
# split the same way. Not the path (a dataset may move) nor the split's seed (another draw of the same protocol).
DATASET_KEYS = ("loader", "options", "classes", "positive_class", "image_size", "split", "split_options")


class WarmStartError(StudyError):
    """The warm-start folder cannot seed this study. The message names the folder, what differs, and the fix."""


@dataclasses.dataclass(frozen=True)
class WarmStart:
    source: str  # the folder, as given
    trials: list  # optuna FrozenTrials, with this study's distributions
    left_out: dict[str, list[str]]  # reason -> trial names
    examples: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> the first trial's detail

    def summary(self) -> str:
        total = len(self.trials) + sum(map(len, self.left_out.values()))
        line = f"Warm start: {len(self.trials)} of {total} trial(s) of {self.source} seed the searcher"
        if self.left_out:
            line += "; left out: " + "; ".join(
                f"{len(names)} {why} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                + (f": e.g. {self.examples[why]}" if self.examples.get(why) else "") + ")"
                for why, names in self.left_out.items())
        return line


def warm_trials(folder: str, study) -> WarmStart:
    """The trials of the finished study in ``folder`` that fit ``study`` (a ``search.Study``), as above."""
    import optuna

    from analysis.results import load_results

    path = Path(folder).expanduser()
    record = _record(path, folder)
    _same_scores(record.get("study") or {}, study, folder)
    db = path / "optuna.db"
    if not db.is_file():
        raise WarmStartError(f"warm_start: {folder!r} has no optuna.db (a study run with --storage on a local disk "
                             "writes one); give the results folder of such a study")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    old = optuna.load_study(study_name=record["study"]["name"], storage=f"sqlite:///{db.resolve()}")
    results = load_results(path)
    recorded = set(results.leaderboard["trial_name"].astype(str))
    trials, left_out, examples = [], {}, {}
    for trial in old.trials:
        if trial.value is None or trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        name = str(trial.user_attrs.get("trial_name") or f"trial {trial.number}")
        made, why, detail = _fitted(trial, name, study, results, recorded)
        if made is None:
            left_out.setdefault(why, []).append(name)
            examples.setdefault(why, detail)
        else:
            trials.append(made)
    return WarmStart(folder, trials, left_out, examples)


def _record(path: Path, folder: str) -> dict:
    try:
        record = json.loads((path / "study.json").read_text())
    except (OSError, ValueError) as exc:
        raise WarmStartError(f"warm_start: {folder!r} is not a readable results folder ({exc}); give the folder "
                             "search.run wrote, e.g. runs/<study name>") from None
    if not (record.get("study") or {}).get("name"):
        raise WarmStartError(f"warm_start: {folder!r}'s study.json names no study; give a folder search.run wrote")
    return record


def _same_scores(old: dict, study, folder: str) -> None:
    """Refuse a folder whose values mean something else: another metric or mode, another dataset."""
    for field in ("metric", "mode"):
        if old.get(field) != getattr(study, field):
            raise WarmStartError(f"warm_start: {folder!r} ranked its trials by {field} {old.get(field)!r}, this study "
                                 f"by {getattr(study, field)!r}; a warm start needs the same {field}")
    old_data = old.get("dataset") or {}
    new_data = json.loads(json.dumps(dataclasses.asdict(study.dataset), default=str))  # as study.json holds it
    for key in DATASET_KEYS:
        if old_data.get(key) != new_data.get(key):
            raise WarmStartError(f"warm_start: {folder!r} scored its trials on dataset.{key} {old_data.get(key)!r}, "
                                 f"this study on {new_data.get(key)!r}; its values say nothing about this study's "
                                 "trials: warm-start from a study on the same data")


def _fitted(trial, name: str, study, results, recorded: set[str]):
    """``(the trial with this study's distributions, None, None)`` when it fits, else ``(None, why, detail)``.
    ``recorded``: the trial names the earlier leaderboard holds."""
    import optuna

    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FixedTrial only warns of a value outside a range
            config = study.space(fixed)
    except (ValueError, UserWarning, KeyError, TypeError) as exc:
        return None, "outside this space", str(exc).splitlines()[0][:100]
    extra = sorted(set(trial.params) - set(fixed.params))
    if extra:
        return None, "searching parameters this space does not", ", ".join(extra)
    try:
        trained = results.trial(name).config if name in recorded else None
    except (OSError, ValueError):  # ResultsFolderError: a lost checkpoint, its trained values cannot be compared
        trained = None
    if trained is None:
        return None, "without a record of what it trained with", None
    old_max = (results.study or {}).get("max_epochs")
    was, new = effective_hparams(trained, old_max)[0], effective_hparams({**study.fixed, **config}, study.max_epochs)[0]
    differs = [k for k in HPARAM_NAMES if was[k] != new[k]]
    if differs:
        return None, "trained otherwise", ", ".join(f"{k} {was[k]!r} -> {new[k]!r}" for k in differs[:2])
    made = optuna.trial.create_trial(params=trial.params, distributions=fixed.distributions, value=trial.value,
                                     state=trial.state, intermediate_values=trial.intermediate_values,
                                     user_attrs={"warm_start_from": str(results.path.name), "trial_name": name})
    return made, None, None
