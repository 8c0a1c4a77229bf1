"""The contenders of ``benchmarks/search_bench.py``; each runs alone, in a fresh process.

    python -m benchmarks._contenders SPEC.json

``SPEC.json`` names the contender, the seed, the budget, the contender's start
time ``t0`` (taken by the harness just before it started this process, so
Python, TensorFlow and Ray start-up count against the budget), the dataset
(a ``search.Dataset``'s fields) and where to write events.

Every contender gets its data from ``search.prepare.prepare_data`` on the same
``Dataset``: the same uint8 arrays, byte for byte. Every contender appends one
JSON line per event to the events file, stamped with ``time.time()`` when the
event happened:

- ``{"kind": "epoch", "t", "trial", "epoch", "value"}``: a validation balanced accuracy;
- ``{"kind": "trial_end", "t", "trial", "status"}``: a trial (Hyperband: one round of a
  configuration) ended, finished or stopped early (ASHA, pruning) or errored;
- ``{"kind": "note", "t", "text"}``.

The harness keeps only events with ``t - t0 <= budget_s``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # as search.run
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRIC = "val_balanced_accuracy"
MAX_CONCURRENT = 2  # Ray contenders: two trials at once, one CPU (one TF thread) each
IN_PROCESS_THREADS = 2  # keras-tuner and Optuna: one trial at a time with two TF threads
ENDLESS = 100_000  # num_samples / hyperband_iterations: the wall-clock budget ends every search

# --- The search space, the same for every contender --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Space:
    """A benchmark search space: the same names, ranges and choices for every contender."""

    backbones: tuple
    unfreeze: tuple  # pretrained backbones only; 0 = frozen (the activation cache serves it)
    head_units: tuple  # pretrained backbones only
    learning_rate: tuple = (3e-4, 1e-2)  # log-uniform
    dropout: tuple = (0.0, 0.5)  # uniform
    augment: tuple = ("none",)  # searched when there are several
    class_weight: tuple = (False,)  # balanced class weights or none; searched when there are both
    augment_views: int = 0  # ours: a cached bank of this many augmented views per image
    warmup: tuple = ()  # fine-tuned configurations: head-only warm-up epochs, then fine_tune_lr (searched when given)
    fine_tune_lr: tuple = (1e-5, 1e-3)  # log-uniform


SPACES = {
    # The small setting: one pretrained backbone, frozen or its top 20 layers unfrozen, or the small CNN.
    "small": Space(backbones=("efficientnet_lite0", "cnn_s3"), unfreeze=(0, 20), head_units=(0, 128)),
    # The realistic setting (issue 18): cheap and expensive configurations mixed, as in a real study. Frozen
    # (seconds on cached features), cut at cacheable depths 21 and 41 (cached, a top fine-tuned), or wholly
    # fine-tuned (the full network every epoch); light augmentation (ours: a bank of 2 cached views); class
    # weights; and the small CNN from scratch.
    "realistic": Space(backbones=("efficientnet_lite0", "efficientnet_lite1", "cnn_s3"), unfreeze=(0, 21, 41, "all"),
                       head_units=(0, 128), augment=("none", "light"), class_weight=(False, True), augment_views=2,
                       warmup=(1, 2), fine_tune_lr=(1e-5, 3e-4)),
}
# fine_tune_lr stops at 3e-4: lite0 cut at 41 on HAM10000 at 96 px (3,000 training images, 2 warm-up epochs, then 2
# fine-tuning, Adam) went from 0.44 after the warm-up to a constant prediction (0.17) at 1e-3, with class weights or
# without; at 3e-4 it held at 0.37, at 1e-4 it rose to 0.39 (unweighted; 0.35 after the warm-up). Real studies
# (S2, S5) fine-tune at 1e-5 to 1e-4.
# The small setting's ranges, named (the cache speed-up measurement samples its lite0 branch).
BACKBONES, UNFREEZE, HEAD_UNITS = SPACES["small"].backbones, SPACES["small"].unfreeze, SPACES["small"].head_units
LEARNING_RATE, DROPOUT = SPACES["small"].learning_rate, SPACES["small"].dropout
# Shared by every trial unless the space searches it: augment "none" (so the cache applies), no class weights,
# no warm-up (one phase at learning_rate).
FIXED = {"augment": "none", "batch_size": 32, "pooling": "avg", "class_weight": False, "warmup_epochs": 0}
PER_BACKBONE = {
    "efficientnet_lite0": {"weights": "imagenet"},  # ImageNet weights ship with pip
    "efficientnet_lite1": {"weights": "imagenet"},
    "cnn_s3": {"weights": None, "unfreeze": "all", "head_units": 0},  # the small CNN, from scratch
}


def space_of(spec: dict) -> Space:
    return SPACES[spec.get("space", "small")]


def sample(trial, setting: str) -> dict:
    """A benchmark space as an Optuna define-by-run function (ours, random_fifo, optuna_hyperband).

    ``learning_rate`` and ``dropout`` have the same range for every backbone, so
    they are one parameter each; ``unfreeze`` and ``head_units`` exist only for
    pretrained backbones.
    """
    s = SPACES[setting]
    backbone = trial.suggest_categorical("backbone", list(s.backbones))
    hp = {
        "backbone": backbone,
        **PER_BACKBONE[backbone],
        "learning_rate": trial.suggest_float("learning_rate", *s.learning_rate, log=True),
        "dropout": trial.suggest_float("dropout", *s.dropout),
    }
    if PER_BACKBONE[backbone]["weights"] is not None:
        hp["unfreeze"] = trial.suggest_categorical("unfreeze", list(s.unfreeze))
        hp["head_units"] = trial.suggest_categorical("head_units", list(s.head_units))
        if s.warmup and hp["unfreeze"] != 0:  # as real studies fine-tune: the head first, then a small rate
            hp["warmup_epochs"] = trial.suggest_categorical("warmup_epochs", list(s.warmup))
            hp["fine_tune_lr"] = trial.suggest_float("fine_tune_lr", *s.fine_tune_lr, log=True)
    if len(s.augment) > 1:
        hp["augment"] = trial.suggest_categorical("augment", list(s.augment))
    if len(s.class_weight) > 1:
        hp["class_weight"] = trial.suggest_categorical("class_weight", list(s.class_weight))
    return hp


def space(trial) -> dict:
    """The small space as a study's ``space(trial)``."""
    return sample(trial, "small")


def realistic_space(trial) -> dict:
    """The realistic space as a study's ``space(trial)``."""
    return sample(trial, "realistic")


STUDY_SPACES = {"small": space, "realistic": realistic_space}  # what a Study takes: one argument, the trial


def kt_space(hp, setting: str = "small") -> dict:
    """The same space in keras-tuner: same names, ranges and choices; the pretrained-only ones in a conditional
    scope. keras-tuner's choices must share a type, so ``unfreeze`` is chosen as text and read back."""
    s = SPACES[setting]
    backbone = hp.Choice("backbone", list(s.backbones))
    out = {
        "backbone": backbone,
        **PER_BACKBONE[backbone],
        "learning_rate": hp.Float("learning_rate", *s.learning_rate, sampling="log"),
        "dropout": hp.Float("dropout", *s.dropout),
    }
    pretrained = [b for b in s.backbones if PER_BACKBONE[b]["weights"] is not None]
    warmup = fine_tune_lr = None
    with hp.conditional_scope("backbone", pretrained):
        unfreeze = hp.Choice("unfreeze", [str(u) for u in s.unfreeze])
        head_units = hp.Choice("head_units", list(s.head_units))
        if s.warmup:
            with hp.conditional_scope("unfreeze", [str(u) for u in s.unfreeze if u != 0]):
                warmup = hp.Choice("warmup_epochs", list(s.warmup))
                fine_tune_lr = hp.Float("fine_tune_lr", *s.fine_tune_lr, sampling="log")
    if backbone in pretrained:
        out.update(unfreeze=unfreeze if unfreeze == "all" else int(unfreeze), head_units=int(head_units))
        if warmup is not None and out["unfreeze"] != 0:
            out.update(warmup_epochs=int(warmup), fine_tune_lr=float(fine_tune_lr))
    if len(s.augment) > 1:
        out["augment"] = hp.Choice("augment", list(s.augment))
    if len(s.class_weight) > 1:
        out["class_weight"] = hp.Choice("class_weight", list(s.class_weight))
    return out


def make_study(spec: dict, *, name: str | None = None):
    """The ``Study`` ours runs; its dataset is also what every other contender loads."""
    from search import Dataset, Study

    setting = spec.get("space", "small")
    return Study(
        name=name or f"{spec['contender']}_s{spec['seed']}",
        description=f"search_bench ({setting} space): " + ", ".join(SPACES[setting].backbones),
        dataset=Dataset(**spec["dataset"]),
        space=STUDY_SPACES[setting],
        fixed=dict(FIXED),
        metric=METRIC,
        mode="max",
        num_samples=ENDLESS,
        max_epochs=int(spec["max_epochs"]),
        time_limit_s=float(spec["budget_s"]),  # reset to what is left of the budget when the Tuner is made
        grace_period=1,
        reduction_factor=2,  # the Study default: ours as shipped
        max_concurrent=MAX_CONCURRENT,
        cpus_per_trial=1,
        augment_views=SPACES[setting].augment_views,
        seed=int(spec["seed"]),
    )


# --- Events --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EventLog:
    """Appends one JSON line per event (opened per write: picklable, and nothing is lost if the process dies)."""

    path: str

    def write(self, kind: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "t": time.time(), **fields}, default=str) + "\n")


def ray_recorder(log: EventLog):
    """A Ray Tune callback on the driver: each reported epoch and each trial's end, as the driver sees them."""
    from ray import tune

    class Recorder(tune.Callback):  # cloudpickle pickles a local class by value
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC in result:
                log.write("epoch", trial=trial.trial_id, epoch=int(result.get("epoch", result["training_iteration"])),
                          value=float(result[METRIC]))

        def on_trial_start(self, iteration, trials, trial, **info):
            log.write("trial_start", trial=trial.trial_id, config=_described(trial.config))

        def on_trial_complete(self, iteration, trials, trial, **info):
            log.write("trial_end", trial=trial.trial_id, status="completed")

        def on_trial_error(self, iteration, trials, trial, **info):
            log.write("trial_end", trial=trial.trial_id, status="errored")

    return Recorder()


def _described(config: dict) -> dict:
    """What a trial's cost depends on, for the benchmark's per-kind trial times."""
    return {k: config.get(k) for k in ("backbone", "unfreeze", "augment", "class_weight", "head_units")}


def remaining(spec: dict) -> float:
    return float(spec["budget_s"]) - (time.time() - float(spec["t0"]))


def load_arrays(spec: dict):
    """The benchmark's train and validation arrays, through the system's own data path."""
    from search.prepare import prepare_data

    prepared = prepare_data(make_study(spec))
    return prepared.arrays, prepared.class_names, prepared.positive


# --- (a), (b) ours: python -m search.run ---------------------------------------------------------------------------


def run_ours(spec: dict, log: EventLog, *, cache: bool) -> int:
    """``search.run_study`` on a study file, as ``python -m search.run`` runs it, through the API's seams.

    ``deadline``: the benchmark's budget counts from the process start, so the
    search gets what is left of it when the Tuner is made, and no trial starts
    after it. ``callbacks``: an observer records each epoch's result as the
    driver receives it. The exit code is the command line's (``search.run.main``).
    """
    from search import run_study
    from search.run import EXIT_FAILED, EXIT_USAGE, StudyFailed, StudyInterrupted, usage_errors

    work = Path(spec["workdir"])
    study_file = work / "study.py"
    study_file.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks._contenders import make_study\n"
        f"STUDY = make_study(json.loads({json.dumps(spec)!r}))\n"
    )
    deadline = float(spec["t0"]) + float(spec["budget_s"])
    log.write("note", text=f"command: run_study({str(study_file)!r}, storage={str(work / 'runs')!r}, "
                           f"activation_cache={cache}, deadline=<start + {float(spec['budget_s']):g} s>)")
    try:
        run_study(study_file, storage=str(work / "runs"), activation_cache=cache,
                  callbacks=[ray_recorder(log)], deadline=deadline)
    except usage_errors() as exc:
        log.write("note", text=f"error: {exc}")
        return EXIT_USAGE
    except StudyInterrupted:
        return 130
    except StudyFailed as exc:
        log.write("note", text=f"failed: {exc}")
        return EXIT_FAILED
    return 0


# --- (c) random_fifo: Ray Tune, random search, no early stopping ---------------------------------------------------


def run_random_fifo(spec: dict, log: EventLog) -> int:
    """The same trainable (``trainables.train.train_trial``) and resources as ours, on a plain Ray Tune search.

    Random search over the same define-by-run space: ``OptunaSearch`` with
    Optuna's ``RandomSampler`` (the space is conditional, which Ray's
    ``BasicVariantGenerator`` cannot express without ``sample_from`` tricks),
    ``FIFOScheduler`` (every trial runs all ``max_epochs``), no activation cache
    (a plain Ray Tune user has none), 2 concurrent trials x 1 CPU.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from search.tuner import StudySpace
    from trainables.train import TrialSettings, train_trial

    study = make_study(spec)
    data, classes, positive = load_arrays(spec)
    settings = TrialSettings(max_epochs=study.max_epochs, metric=METRIC, mode="max", class_names=tuple(classes),
                             positive=positive, seed=study.seed, cpus=1, activation_cache=False)
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}}
    ray.init(log_to_driver=False, runtime_env=env, configure_logging=False, logging_level="ERROR")
    try:
        searcher = OptunaSearch(space=StudySpace(study), metric=METRIC, mode="max",
                                sampler=optuna.samplers.RandomSampler(seed=study.seed))
        trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, settings=settings,
                                                             weights_files={}), {"cpu": 1})
        left = remaining(spec)
        log.write("note", text=f"Tuner made {float(spec['budget_s']) - left:.1f} s after the start")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max",
                                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=MAX_CONCURRENT),
                                        scheduler=FIFOScheduler(), num_samples=ENDLESS,
                                        time_budget_s=max(1.0, left), reuse_actors=True),
            run_config=tune.RunConfig(name="random_fifo", storage_path=str(Path(spec["workdir"]).resolve()),
                                      callbacks=[ray_recorder(log)], verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
        tuner.fit()
    finally:
        ray.shutdown()
    return 0


# --- (d), (e): keras-tuner Hyperband and Optuna Hyperband, in-process ------------------------------------------


def _keras_callbacks(spec: dict, log: EventLog, x_val, y_val, classes, positive, trial_id):
    """``val_balanced_accuracy`` (and the other validation metrics) into the epoch's logs, recorded; a budget stop."""
    import keras

    from trainables.metrics import classification_metrics

    class ValidationMetrics(keras.callbacks.Callback):
        """Adds ``val_*`` from predictions, as ``train_trial`` computes them; must come before anything reading them."""

        def on_epoch_end(self, epoch, logs=None):
            probs = self.model.predict(x_val, batch_size=64, verbose=0)
            scores = classification_metrics(y_val, probs, list(classes), positive=positive)
            if logs is not None:
                logs.update({f"val_{k}": v for k, v in scores.items()})
            log.write("epoch", trial=trial_id(), epoch=epoch + 1, value=float(scores["balanced_accuracy"]))

        def __deepcopy__(self, memo):  # keras-tuner deep-copies callbacks per trial; share the data and the log
            return ValidationMetrics()

    class BudgetStop(keras.callbacks.Callback):
        """Stop training at the budget (after the current batch); the trial then ends."""

        def on_train_batch_end(self, batch, logs=None):
            if remaining(spec) <= 0:
                self.model.stop_training = True

        def __deepcopy__(self, memo):
            return BudgetStop()

    return ValidationMetrics(), BudgetStop()


# model -> (its backbone, its hyperparameters), for fit_in_phases; weak, so models keras-tuner drops are freed
_BACKBONES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _build_compiled(hp: dict, input_shape, num_classes: int, seed: int):
    """Our model for these hyperparameters, trainable layers set and compiled for ``train_trial``'s first phase."""
    import keras

    from trainables.hparams import resolve_hparams
    from trainables.model import apply_unfreeze, build_model
    from trainables.train import phases

    hp = resolve_hparams({**FIXED, **hp})
    keras.utils.set_random_seed(seed)
    model, backbone = build_model(hp, input_shape=input_shape, num_classes=num_classes, seed=seed)
    _, _, lr, unfreeze = phases(hp, 10**6)[0]
    apply_unfreeze(backbone, unfreeze, pretrained=hp["weights"] is not None)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    _BACKBONES[model] = (backbone, hp)
    return model


def fit_in_phases(model, x, y, *, epochs: int, initial_epoch: int = 0, **fit_kwargs):
    """``model.fit`` as ``train_trial`` trains: with a warm-up, the head alone at learning_rate, then the unfrozen
    layers at fine_tune_lr (recompiled between); returns the last phase's History, holding every phase's epochs."""
    import keras

    from trainables.model import apply_unfreeze
    from trainables.train import phases

    backbone, hp = _BACKBONES[model]
    history, epochs_seen = None, {}
    for first, end, lr, unfreeze in phases(hp, epochs):
        if end <= initial_epoch:
            continue
        if first > 0:  # the first phase is how _build_compiled left the model
            apply_unfreeze(backbone, unfreeze, pretrained=hp["weights"] is not None)
            model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
        history = model.fit(x, y, epochs=end, initial_epoch=max(first, initial_epoch), **fit_kwargs)
        for key, values in history.history.items():
            epochs_seen.setdefault(key, []).extend(values)
        if model.stop_training:
            break
    if history is not None:
        history.history = epochs_seen
    return history


def _in_process_tensorflow() -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(IN_PROCESS_THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(IN_PROCESS_THREADS)


class _BudgetSpent(Exception):
    pass


def run_keras_tuner(spec: dict, log: EventLog) -> int:
    """keras-tuner's ``Hyperband``: ``max_epochs`` as ours, its default factor 3, objective val balanced accuracy."""
    _in_process_tensorflow()
    import keras_tuner as kt

    from trainables.train import balanced_class_weight

    data, classes, positive = load_arrays(spec)
    seed = int(spec["seed"])
    x_train, y_train, x_val, y_val = (data[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    current = {"trial": None, "builds": 0}
    validation, budget_stop = _keras_callbacks(spec, log, x_val, y_val, classes, positive, lambda: current["trial"])

    setting = spec.get("space", "small")

    class HyperModel(kt.HyperModel):
        def build(self, hp):
            current["builds"] += 1
            return _build_compiled(kt_space(hp, setting), x_train.shape[1:], len(classes),
                                   seed=(seed * 100_003 + current["builds"]) % (2**31 - 1))

        def fit(self, hp, model, x, y, epochs=1, initial_epoch=0, **kwargs):  # phases; class weights when asked
            weighted = kt_space(hp, setting).get("class_weight", FIXED["class_weight"])
            return fit_in_phases(model, x, y, epochs=epochs, initial_epoch=initial_epoch,
                                 class_weight=balanced_class_weight(y_train) if weighted else None, **kwargs)

    class BudgetHyperband(kt.Hyperband):
        def pre_create_trial(self):
            if remaining(spec) <= 0:
                raise _BudgetSpent  # launch nothing after the budget

        def on_trial_begin(self, trial):
            current["trial"] = trial.trial_id
            log.write("trial_start", trial=trial.trial_id, config=_described(kt_space(trial.hyperparameters, setting)))
            super().on_trial_begin(trial)

        def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
            pass  # keras-tuner imports tensorboard here for TensorBoard callbacks; there are none, and TF 2.21 lacks it

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            log.write("trial_end", trial=trial.trial_id, status=str(trial.status).lower())

    tuner = BudgetHyperband(
        HyperModel(), objective=kt.Objective(METRIC, direction="max"), max_epochs=int(spec["max_epochs"]),
        factor=3, hyperband_iterations=ENDLESS, seed=seed, directory=str(Path(spec["workdir"]) / "keras_tuner"),
        project_name="search_bench", overwrite=True
    )
    try:
        tuner.search(x_train, y_train, batch_size=FIXED["batch_size"], shuffle=True, verbose=0,
                     callbacks=[validation, budget_stop])
    except _BudgetSpent:
        pass
    return 0


def run_optuna_hyperband(spec: dict, log: EventLog) -> int:
    """Standalone Optuna: TPE (its default sampler), ``HyperbandPruner`` (defaults), ``KerasPruningCallback``."""
    _in_process_tensorflow()
    import optuna
    from optuna_integration import KerasPruningCallback

    from trainables.train import balanced_class_weight

    data, classes, positive = load_arrays(spec)
    seed = int(spec["seed"])
    x_train, y_train, x_val, y_val = (data[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    current = {"trial": None}
    validation, budget_stop = _keras_callbacks(spec, log, x_val, y_val, classes, positive, lambda: current["trial"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.HyperbandPruner())

    def objective(trial):
        current["trial"] = f"optuna_{trial.number:04d}"
        import keras

        keras.backend.clear_session()
        hp = sample(trial, spec.get("space", "small"))
        log.write("trial_start", trial=current["trial"], config=_described(hp))
        model = _build_compiled(hp, x_train.shape[1:], len(classes), seed=(seed * 100_003 + trial.number) % (2**31 - 1))
        status = "completed"
        weighted = hp.get("class_weight", FIXED["class_weight"])
        try:
            history = fit_in_phases(model, x_train, y_train, batch_size=FIXED["batch_size"], epochs=int(spec["max_epochs"]),
                                    shuffle=True, verbose=0, class_weight=balanced_class_weight(y_train) if weighted else None,
                                callbacks=[validation, KerasPruningCallback(trial, METRIC), budget_stop])
        except optuna.TrialPruned:
            status = "pruned"
            raise
        except Exception:
            status = "errored"
            raise
        finally:
            log.write("trial_end", trial=current["trial"], status=status)
        return max(history.history[METRIC])

    while remaining(spec) > 0:  # launch nothing after the budget
        study.optimize(objective, n_trials=1, catch=(Exception,))
    return 0


# --- The cache's speed-up, measured directly -------------------------------------------------------------------


def run_cache_speedup(spec: dict, log: EventLog) -> int:
    """The same frozen-lite0 trials with the activation cache on and off, through ``trainables.train.fit_classifier``.

    ``spec["configs"]`` frozen configurations (sampled from the space's lite0
    branch with ``unfreeze=0``), ``spec["epochs"]`` epochs each, one process,
    one CPU thread (as a Ray trial). First a warm-up trial with the cache on
    builds the cache entry (its extra set-up time is ``cache_build_s``); then
    for each configuration the trial runs uncached and cached, in alternating
    order. A trial's time is the wall time of ``fit_classifier`` (TF set-up,
    model build, weights, cache look-up, every epoch with its validation and
    checkpoint saves); ``tune.report`` is captured to get each epoch's ``epoch_s``.
    """
    import statistics

    import optuna
    import ray.tune

    from trainables.train import TrialSettings, fit_classifier

    data, classes, positive = load_arrays(spec)
    seed = int(spec["seed"])
    reports: list[dict] = []
    ray.tune.report = lambda metrics, checkpoint=None: reports.append(dict(metrics))  # no Tune session here
    ray.tune.get_checkpoint = lambda: None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for number in range(int(spec["configs"])):  # the space's lite0 branch, frozen
        t = sampler.ask()
        configs.append({**FIXED, "backbone": "efficientnet_lite0", **PER_BACKBONE["efficientnet_lite0"], "unfreeze": 0,
                        "learning_rate": t.suggest_float("learning_rate", *LEARNING_RATE, log=True),
                        "dropout": t.suggest_float("dropout", *DROPOUT),
                        "head_units": t.suggest_categorical("head_units", list(HEAD_UNITS)), "trial_number": number})

    def trial(config: dict, cache: bool) -> dict:
        settings = TrialSettings(max_epochs=int(spec["epochs"]), metric=METRIC, mode="max",
                                 class_names=tuple(classes), positive=positive, seed=seed, cpus=1,
                                 activation_cache=cache)
        reports.clear()
        started = time.perf_counter()
        fit_classifier(config, data, settings)
        out = {"trial_s": time.perf_counter() - started, "setup_s": reports[0]["setup_s"],
               "epoch_s": statistics.median(r["epoch_s"] for r in reports),
               "checkpoint_s": sum(r["checkpoint_s"] for r in reports),
               "best": max(r[METRIC] for r in reports), "last": reports[-1][METRIC]}
        log.write("speedup_trial", config=config["trial_number"], cache=cache, **out)
        return out

    warm = trial({**configs[0], "trial_number": 999}, cache=True)  # builds the entry; its set-up includes the build
    if spec.get("cached_only"):  # a frozen search's cost: cached head-only trials against the one pass that built them
        cached = [trial(config, True) for config in configs]
        log.write("speedup", cache_build_s=warm["setup_s"] - statistics.median(r["setup_s"] for r in cached),
                  trial_s_cached=statistics.median(r["trial_s"] for r in cached),
                  epoch_s_cached=statistics.median(r["epoch_s"] for r in cached),
                  speedup_configs=len(cached), speedup_epochs=int(spec["epochs"]))
        return 0
    rows = []
    for i, config in enumerate(configs):
        order = (False, True) if i % 2 == 0 else (True, False)
        result = {cache: trial(config, cache) for cache in order}
        rows.append(result)
    per_trial = [r[False]["trial_s"] / r[True]["trial_s"] for r in rows]
    per_epoch = [r[False]["epoch_s"] / r[True]["epoch_s"] for r in rows]
    summary = {
        "speedup": statistics.median(per_trial),
        "speedup_epoch": statistics.median(per_epoch),
        "cache_build_s": warm["setup_s"] - statistics.median(r[True]["setup_s"] for r in rows),
        "trial_s_cached": statistics.median(r[True]["trial_s"] for r in rows),
        "trial_s_uncached": statistics.median(r[False]["trial_s"] for r in rows),
        "epoch_s_cached": statistics.median(r[True]["epoch_s"] for r in rows),
        "epoch_s_uncached": statistics.median(r[False]["epoch_s"] for r in rows),
        "speedup_configs": len(rows), "speedup_epochs": int(spec["epochs"]),
    }
    log.write("speedup", **summary)
    return 0


RUNNERS = {
    "ours": lambda spec, log: run_ours(spec, log, cache=True),
    "ours_nocache": lambda spec, log: run_ours(spec, log, cache=False),
    "random_fifo": run_random_fifo,
    "keras_tuner_hyperband": run_keras_tuner,
    "optuna_hyperband": run_optuna_hyperband,
    "cache_speedup": run_cache_speedup,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    log = EventLog(spec["events"])
    log.write("start", contender=spec["contender"], seed=spec["seed"], pid=os.getpid())
    code = RUNNERS[spec["contender"]](spec, log)
    log.write("end", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
