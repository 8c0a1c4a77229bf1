"""``Study`` and ``Dataset``: what a study file declares, validated before Ray starts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from trainables.backbones import get_backbone_spec
from trainables.checks import is_int, is_number, is_one_of, unknown_name_message
from trainables.hparams import DEFAULTS, hparam_problem

# Sampling the space this many times at load time catches bad values and typos.
_DRY_RUN_SAMPLES = 32
_SPACE_TIME_LIMIT_S = 1.0  # Ray warns past this; OptunaSearch calls space() on the driver
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A sanity bound, far above the 224-600 px ImageNet backbones train at; search.prepare also
# refuses, before decoding, train and val images that would not fit in memory at the size asked.
MAX_IMAGE_SIZE = 4096


class StudyError(ValueError):
    """A study file is wrong. The message names the field, the bad value and the fix."""


def _named_fields(cls):
    """Class decorator: a misspelt or missing field is a ``StudyError`` with a did-you-mean,
    like every other bad field, instead of Python's ``TypeError`` from the dataclass ``__init__``."""
    init = cls.__init__
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        for key in kwargs:
            if key not in fields:
                raise StudyError(f"{cls.__name__}(...): " + unknown_name_message("field", key, fields))
        given = set(fields[:len(args)]) | set(kwargs)
        missing = [name for name in required if name not in given]
        if missing:
            raise StudyError(f"{cls.__name__}(...): missing required field(s) {', '.join(missing)}; "
                             f"give them, e.g. {cls.__name__}({', '.join(f'{m}=...' for m in missing)}, ...)")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


@_named_fields
@dataclasses.dataclass
class Dataset:
    """Which images, at what size, split how."""

    loader: str = "embedded"  # a name from trainables.datasets.list_loaders()
    path: str | None = None  # dataset root; --data-dir overrides it
    image_size: int = 64  # images are resized to image_size x image_size
    classes: list[str] | None = None  # class order; None keeps the loader's
    positive_class: str | None = None  # the "malignant" class of a binary task
    split: str = "stratified"  # a name from trainables.splits.list_protocols()
    split_options: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)  # passed to the loader
    seed: int = 0  # the split's seed
    # The leakage audit before every study: True (default thresholds), False (off), or a dict of
    # thresholds and options (trainables.near_duplicates.Settings), e.g. {"hash_distance": 30}.
    near_duplicates: bool | dict = True

    def __post_init__(self):
        # Class names in the form the loaders' labels take (trainables.datasets._registry.class_name): 'bénin'
        # typed in NFC names the folder a Mac stored in NFD. Wrong types are left for _check_dataset to name.
        from trainables.datasets._registry import class_name

        if isinstance(self.classes, (list, tuple)):
            self.classes = [class_name(c) if isinstance(c, str) else c for c in self.classes]
        if isinstance(self.positive_class, str):
            self.positive_class = class_name(self.positive_class)


@_named_fields
@dataclasses.dataclass
class Study:
    """One hyperparameter search. A study file defines exactly one, named ``STUDY``."""

    name: str
    space: Callable[[Any], dict]  # define-by-run: space(optuna_trial) -> hyperparameters
    dataset: Dataset = dataclasses.field(default_factory=Dataset)
    description: str = ""
    # What the model is for, shown first in the model card and the report (TRIPOD+AI, CLAIM): who uses it, on whom,
    # where it must not be used, and the positive class's share where it will be used (for PPV and NPV).
    intended_use: str = ""  # e.g. "triage of dermoscopy images of pigmented lesions in a referral clinic"
    intended_users: str = ""  # e.g. "dermatologists, as a second reader"
    not_for: str = ""  # e.g. "diagnosis without a clinician; images other than dermoscopy; children"
    prevalence: float | None = None  # e.g. 0.02: the positive class's share in the intended setting
    fixed: dict = dataclasses.field(default_factory=dict)  # hyperparameters every trial shares
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    num_samples: int | None = 16  # trials; None: as many as time_limit_s allows (search.budget)
    max_epochs: int = 10
    time_limit_s: float | None = None  # stop launching and end the study after this long
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent: int = 2
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0  # a fraction such as 0.25 lets four trials share a GPU
    seed: int = 0  # seeds the sampler and the trials
    weights_dir: str | None = None  # folder of official Keras weight files (offline clusters)
    activation_cache: bool = True  # frozen pretrained backbones: compute features once, train only the head
    # The first trials are drawn from the configurations that train a head on cached features (seconds each), so
    # TPE's random start-up is cheap (search.cheap_first); "auto": num_samples // 4, at most 10; 0: off.
    cheap_first: int | str = "auto"
    max_failures: int = 1  # retries of a trial that raised (Ray's FailureConfig); then it is recorded as errored
    augment_views: int = 0  # augmented trials: cache this many augmented views per image (0: run the network)
    mixed_precision: bool | str = "auto"  # mixed_float16; "auto": on GPUs with float16 tensor cores (compute >= 7.0)
    # k-fold cross-validation on train ∪ val: each trial trains k models (one per fold) and reports their mean
    # metrics per epoch; its fold models are its ensemble. None (or 1): one validation split.
    cv_folds: int | None = None
    # A finished study's results folder, e.g. "runs/first": its trials that fit this study seed the searcher
    # (search.warm_start); None: a cold start.
    warm_start: str | None = None
    source: str | None = None  # the study file, set by load_study

    def __post_init__(self):
        validate(self)


def validate(study: Study) -> None:
    """Raise ``StudyError`` on the first thing wrong with ``study``."""
    from trainables.datasets import list_loaders
    from trainables.metrics import BASE_METRICS
    from trainables.splits import list_protocols

    if not isinstance(study.name, str) or not _NAME.match(study.name):
        _fail("name", study.name, "use letters, digits, '_', '-' or '.' (it names the results folder)")
    if not isinstance(study.dataset, Dataset):
        _fail("dataset", study.dataset, "use Dataset(...) from search")
    _check_dataset(study.dataset, loaders=list_loaders(), protocols=list_protocols())

    _check_metric(study.metric, BASE_METRICS)
    _choice("mode", study.mode, ["max", "min"])
    if study.num_samples is not None:
        _int("num_samples", study.num_samples, low=1, fix="use an integer >= 1, or None with time_limit_s to run "
                                                          "trials until the time limit is spent")
    elif study.time_limit_s is None:
        _fail("num_samples", None, "None runs trials until the time limit is spent, and this study has none: set "
                                   "time_limit_s (seconds), or give num_samples")
    _int("max_epochs", study.max_epochs, low=1)
    _int("grace_period", study.grace_period, low=1)
    if study.grace_period > study.max_epochs:
        _fail("grace_period", study.grace_period, f"it must be <= max_epochs ({study.max_epochs})")
    _int("reduction_factor", study.reduction_factor, low=2)
    _int("max_concurrent", study.max_concurrent, low=1)
    _check_resource("cpus_per_trial", study.cpus_per_trial, zero_ok=False, fix="use a positive number")
    _check_resource("gpus_per_trial", study.gpus_per_trial, zero_ok=True,
                    fix="use 0, a fraction such as 0.25, or a whole number")
    if study.time_limit_s is not None and not (_is_finite(study.time_limit_s) and study.time_limit_s > 0):
        _fail("time_limit_s", study.time_limit_s, "use a positive number of seconds, or None for no limit")
    _int("seed", study.seed, low=0)
    _int("augment_views", study.augment_views, low=0)
    _int("max_failures", study.max_failures, low=0)
    if study.cv_folds is not None and not (is_int(study.cv_folds, low=1) and study.cv_folds == 1):
        _int("cv_folds", study.cv_folds, low=2, fix="use an integer >= 2 for k-fold cross-validation "
             "on train ∪ val (e.g. 5), or None for one validation split")
    if study.cheap_first != "auto":
        _int("cheap_first", study.cheap_first, low=0, fix="use 'auto', 0 (off), or how many first trials to draw "
             "from head-only configurations on cached features")
    if not isinstance(study.activation_cache, bool):
        _fail("activation_cache", study.activation_cache, "use True or False")
    if not is_one_of(study.mixed_precision, (True, False, "auto")):
        _fail("mixed_precision", study.mixed_precision, "use True, False or 'auto'")
    _check_path("weights_dir", study.weights_dir)
    _check_path("warm_start", study.warm_start)
    _check_intended_use(study)
    if not isinstance(study.fixed, dict):
        _fail("fixed", study.fixed, "use a dict of hyperparameters, e.g. {'batch_size': 16}")
    _check_hparams("fixed", study.fixed)
    dry_run_space(study)


def _check_intended_use(study: Study) -> None:
    for field in ("description", "intended_use", "intended_users", "not_for"):
        if not isinstance(getattr(study, field), str):
            _fail(field, getattr(study, field), "use a sentence in quotes, or leave it out")
    p = study.prevalence
    if p is not None:
        if isinstance(p, bool) or not is_number(p) or not 0 < p < 1:
            _fail("prevalence", p, "give the positive class's share in the intended setting, strictly between 0 "
                  "and 1 (e.g. 0.02 for 2%), or None")
        if study.dataset.positive_class is None:
            _fail("prevalence", p, "a prevalence is of the positive class: set dataset.positive_class too "
                  "(e.g. Dataset(..., positive_class='malignant'))")


def _check_dataset(ds: Dataset, *, loaders: list[str], protocols: list[str]) -> None:
    _choice("dataset.loader", ds.loader, loaders)
    _check_path("dataset.path", ds.path)
    _choice("dataset.split", ds.split, protocols)
    _int("dataset.image_size", ds.image_size, low=16, high=MAX_IMAGE_SIZE)
    if ds.classes is not None:
        if not isinstance(ds.classes, (list, tuple)) or not all(isinstance(c, str) for c in ds.classes):
            _fail("dataset.classes", ds.classes, "use a list of class names, e.g. ['benign', 'malignant'], or None")
        if len(ds.classes) < 2:
            _fail("dataset.classes", ds.classes, "list at least two classes")
        repeated = sorted({c for c in ds.classes if ds.classes.count(c) > 1})
        if repeated:
            _fail("dataset.classes", ds.classes, f"list each class once (repeated: {', '.join(repeated)})")
        from trainables.datasets import DatasetError
        from trainables.datasets._registry import check_distinct_names

        try:  # ['benign', 'Benign']: two classes no reader tells apart
            check_distinct_names(ds.classes, "dataset.classes: names", "List each class once, spelt as its folder is.")
        except DatasetError as exc:
            raise StudyError(str(exc)) from None
    # Without classes, the loader's class names are known only once the data is listed: search.prepare checks then.
    if ds.positive_class is not None and ds.classes is not None and ds.positive_class not in ds.classes:
        raise StudyError("dataset.positive_class: " + unknown_name_message("class", ds.positive_class, ds.classes))
    for field in ("split_options", "options"):
        if not isinstance(getattr(ds, field), dict):
            _fail(f"dataset.{field}", getattr(ds, field), "use a dict of keyword arguments, or leave it out")
    _int("dataset.seed", ds.seed, low=0)
    _check_near_duplicates(ds)


def _check_near_duplicates(ds: Dataset) -> None:
    """The audit's thresholds, and a split grouped by near-duplicate clusters only while the audit is on."""
    from trainables.near_duplicates import settings_from
    from trainables.splits import group_by

    try:
        settings = settings_from(ds.near_duplicates)
    except ValueError as exc:
        raise StudyError(f"dataset.near_duplicates: {exc}") from None
    if ds.split != "grouped":
        return
    try:
        by = group_by(ds.split_options.get("by", "group"))
    except ValueError as exc:
        raise StudyError(f"dataset.split_options: {exc}") from None
    if "near_duplicates" in by and not settings.enabled:
        _fail("dataset.near_duplicates", ds.near_duplicates,
              "split_options by='near_duplicates' groups by the audit's clusters; turn the audit on (True or a dict)")


def dry_run_space(study: Study) -> None:
    """Sample ``space`` with real Optuna trials and check what it returns."""
    sample_space(study)


def sample_space(study: Study) -> list[dict]:
    """Hyperparameters from ``_DRY_RUN_SAMPLES`` random trials, then one trial per categorical choice.

    Each sample is checked; the per-choice trials reach branches of a
    conditional space that random draws may miss.
    """
    import optuna

    if not callable(study.space) or len(inspect.signature(study.space).parameters) != 1:
        _fail("space", study.space, "define `def space(trial): return {...}` taking one Optuna trial")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dry = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=study.seed))
    samples = [_sample_once(study, dry) for _ in range(_DRY_RUN_SAMPLES)]
    choices = {(name, value) for trial in dry.trials for name, dist in trial.distributions.items()
               if isinstance(dist, optuna.distributions.CategoricalDistribution) for value in dist.choices}
    for name, value in sorted(choices, key=repr):
        dry.enqueue_trial({name: value}, skip_if_exists=True)
        samples.append(_sample_once(study, dry))
    return samples


def _sample_once(study: Study, dry) -> dict:
    trial = dry.ask()
    started = time.perf_counter()
    try:
        hparams = study.space(trial)
    except StudyError:
        raise
    except Exception as exc:
        raise StudyError(f"space(trial) raised {type(exc).__name__}: {exc}") from exc
    took = time.perf_counter() - started
    if took > _SPACE_TIME_LIMIT_S:
        _fail("space", f"{took:.2f} s per call", "a space only suggests values; load data and models in trainables/")
    if not isinstance(hparams, dict):
        _fail("space", f"returned {type(hparams).__name__}", "return a dict of hyperparameters")
    from_space = hparams
    hparams = {**study.fixed, **hparams}
    _check_hparams("space", hparams)
    _check_unfreeze_depth("space" if "unfreeze" in from_space else "fixed", hparams)
    dry.tell(trial, 0.0)
    return hparams


def cv_folds(study: Study) -> int | None:
    """The study's number of cross-validation folds, or None for one validation split (``cv_folds`` None or 1)."""
    k = study.cv_folds
    return None if k is None or k == 1 else int(k)


def imagenet_backbones(study: Study) -> list[str]:
    """Backbones the study may train from ImageNet weights: the files the run must find first."""
    found = set()
    for hparams in sample_space(study):
        hp = {**DEFAULTS, **hparams}
        if hp["weights"] == "imagenet":
            found.add(hp["backbone"])
    return sorted(found)


def _check_hparams(where: str, hparams: dict) -> None:
    for key, value in hparams.items():
        problem = hparam_problem(key, value)
        if problem:
            raise StudyError(f"{where}: {problem}")


def _check_unfreeze_depth(where: str, hparams: dict) -> None:
    """An ``unfreeze`` depth the trial's backbone has: past its layer count, Keras
    would train every layer while the leaderboard recorded the depth asked for."""
    hp = {**DEFAULTS, **hparams}
    spec = get_backbone_spec(hp["backbone"])
    if hp["unfreeze"] != "all" and hp["unfreeze"] > spec.layers:
        _fail(f"{where}: unfreeze", hp["unfreeze"],
              f"backbone {spec.name!r} has {spec.layers} layers; use at most {spec.layers}, or 'all'")


def _check_metric(metric: str, base: tuple[str, ...]) -> None:
    known = [f"val_{m}" for m in base] + ["train_loss"]
    if metric in known or (isinstance(metric, str) and metric.startswith("val_recall_")):
        return
    raise StudyError("metric: " + unknown_name_message("metric", metric, known + ["val_recall_<class>"]))


def _choice(field: str, value, valid) -> None:
    if value not in valid:
        raise StudyError(f"{field}: " + unknown_name_message(field.rsplit(".", 1)[-1], value, valid))


def _int(field: str, value, *, low: int, high: int | None = None, fix: str | None = None) -> None:
    if not is_int(value, low=low) or (high is not None and value > high):
        _fail(field, value, fix or (f"use an integer >= {low}" if high is None else f"use an integer from {low} to {high}"))


def _is_finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


# Ray counts resources in steps of 1/10000 and refuses a request that rounds to none of them.
_RESOURCE_STEP = 0.0001


def _check_resource(field: str, value, *, zero_ok: bool, fix: str) -> None:
    """A per-trial CPU or GPU request Ray can schedule, refused here rather than after Ray starts."""
    if not _is_finite(value) or value < 0 or (value == 0 and not zero_ok):
        _fail(field, value, fix)
    if 0 < value < _RESOURCE_STEP:
        _fail(field, value, f"Ray cannot schedule less than {_RESOURCE_STEP} of a resource; {fix}")


def _check_path(field: str, value) -> None:
    if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value).strip()):
        _fail(field, value, "use a folder path (a string), or None")


def _fail(field: str, value, fix: str):
    raise StudyError(f"{field}: bad value {value!r}; {fix}")


def load_study(path: str | Path) -> Study:
    """Import a study file and return its ``STUDY``; errors become ``StudyError``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.py") if not p.name.startswith("_"))[:5]
        example = f"e.g. {path / files[0]} (it holds {', '.join(files)})" if files else "such as spaces/quickstart.py"
        raise StudyError(f"study file {str(path)!r} is a folder; pass one study file in it, {example}")
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} not found; pass a file such as spaces/quickstart.py")
    module_name = f"_study_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise StudyError(f"{path}:{exc.lineno}: syntax error in study file: {exc.msg}") from exc
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise StudyError(f"{path}: importing the study file raised {type(exc).__name__}: {exc}") from exc
    return dataclasses.replace(_the_study(module, path), source=str(path.resolve()))


def _the_study(module, path: Path) -> Study:
    """The file's one ``STUDY``; a second Study object would leave which one runs to a naming accident."""
    names = sorted(name for name, value in vars(module).items() if isinstance(value, Study))
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        found = f" (found a Study named {', '.join(names)}; rename it STUDY)" if names else ""
        raise StudyError(f"{path}: no study object; define `STUDY = Study(...)`{found}")
    others = [name for name in names if vars(module)[name] is not study]
    if others:
        raise StudyError(f"{path}: defines {len(others) + 1} Study objects ({', '.join(sorted(others + ['STUDY']))}); "
                         f"a study file defines exactly one, STUDY. Delete the others, or `del {others[0]}` "
                         "once STUDY is built from it")
    return study


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
