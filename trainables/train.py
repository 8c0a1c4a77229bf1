"""``train_trial(config, data, settings)``: one Ray Tune trial trains one Keras model.

Every epoch it reports real validation metrics through ``ray.tune.report``,
with a checkpoint whenever the study's metric improves (``trainables.checkpoint``).

With ``cv_folds=k`` (``Study(cv_folds=k)``) a trial trains k models, one per
fold of train ∪ val, *sequentially in its own process*: every epoch each fold
model trains one epoch on the other folds and is scored on its own, and the
trial reports the mean of the k fold metrics (``val_<m>``) and their spread
(``val_<m>_std``). One Ray trial stays one configuration, so ASHA still rungs
on epochs, TPE sees the less noisy mean, and the leaderboard, checkpoints and
--resume work unchanged; k parallel Ray tasks would compete for the same CPUs
and split one configuration's state across processes. The checkpoint holds
all k models (``fold_<i>/``), the trial's ensemble (``load_classifier``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from trainables.activation_cache import (
    FINE_TUNE_DTYPE,
    HEAD_ONLY_DTYPE,
    cached_features,
    cached_views,
    can_use_cache,
    frozen_part,
    pooled,
    shared_backbone,
    split_backbone,
)
from trainables.augment import make_augmentation
from trainables.checkpoint import MODEL_FILE, TOP_FILE, fold_folders, save_classifier, save_folds
from trainables.data import DIGEST_PREFIX
from trainables.hparams import PLACEMENT, resolve_hparams
from trainables.losses import loss_for
from trainables.metrics import is_better
from trainables.weights import unpack_weights


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares; it is not searched."""

    max_epochs: int
    metric: str
    mode: str
    class_names: tuple[str, ...]
    positive: int | None = None  # index of the malignant class for binary AUC
    seed: int = 0
    cpus: float = 1
    weights_dir: str | None = None
    random_init: tuple[str, ...] = ()  # smoke runs: backbones whose ImageNet weights were unavailable
    activation_cache: bool = True  # frozen pretrained backbones: train the head on cached features
    augment_views: int = 0  # with augmentation: a cached bank of this many views per image (0: run the network)
    mixed_precision: bool | str = "auto"  # "auto": mixed_float16 on a GPU with compute capability >= 7.0
    cv_folds: int | None = None  # k-fold cross-validation on train ∪ val (data holds fold_train, fold_val)


def phases(hp: dict, max_epochs: int) -> list[tuple[int, int, float, object]]:
    """``(first_epoch, end_epoch, learning_rate, unfreeze)`` for each training phase.

    With a warm-up and something to unfreeze, the head first trains alone at
    ``learning_rate``, then the unfrozen layers join at ``fine_tune_lr``.
    """
    warmup = min(int(hp["warmup_epochs"]), max_epochs)
    if not warmup or hp["unfreeze"] in (0, "0"):
        return [(0, max_epochs, hp["learning_rate"], hp["unfreeze"])]
    return [(0, warmup, hp["learning_rate"], 0), (warmup, max_epochs, hp["fine_tune_lr"], hp["unfreeze"])]


def train_trial(config: dict, data: dict, settings: TrialSettings, weights_files: dict | None = None) -> None:
    """Ray Tune function trainable. ``data`` holds uint8 ``x_train``, ``x_val`` and int ``y_train``, ``y_val``.

    ``weights_files`` are ImageNet weight files shipped from the driver (see
    ``trainables.weights.pack_weights``), so worker nodes need no copy of their own.
    """
    weights_dir = unpack_weights(weights_files) if weights_files else settings.weights_dir
    fit_classifier(config, data, settings, weights_dir=weights_dir)


def fit_classifier(config: dict, data: dict, settings: TrialSettings, *, weights_dir=None) -> keras.Model:
    """Build and train one trial's classifier, reporting every epoch to Tune; returns the classifier.

    A trial whose whole pretrained backbone stays frozen, with the activation
    cache on, trains only its head on cached features, and its backbone is the
    one this process built for an earlier such trial (``shared_backbone``): the
    returned classifier shares it, so it must not be trained further.

    A trial that fine-tunes after a warm-up trains its head alone first, so its warm-up epochs train on
    the cached features of the whole frozen backbone (``cached_warmup``): seconds, not a pass of the network
    per epoch. ASHA judges those epochs like any other, so only configurations whose head is promising
    go on to the expensive phase, which continues from the head the warm-up trained (the same layers).
    """
    if settings.cv_folds:
        return fit_cross_validated(config, data, settings, weights_dir=weights_dir)
    from ray import tune

    started = time.monotonic()
    hp = resolve_hparams(config, settings.max_epochs, settings.random_init)
    seed = (settings.seed * 100_003 + int(config.get("trial_number", 0))) % (2**31 - 1)
    device = setup_tensorflow(settings.cpus, seed, mixed_precision=settings.mixed_precision)
    from trainables.model import apply_unfreeze, build_model

    cacheable = settings.activation_cache and can_use_cache(hp, settings.augment_views)
    shared = None  # nothing trains the backbone: this process's copy serves
    if cacheable and str(hp["unfreeze"]) == "0":
        shared = shared_backbone(hp["backbone"], weights=hp["weights"], input_shape=data["x_train"].shape[1:],
                                 weights_dir=weights_dir)
    model, backbone = build_model(
        hp,
        input_shape=data["x_train"].shape[1:],
        num_classes=len(settings.class_names),
        weights_dir=weights_dir,
        seed=seed,
        backbone=shared.model if shared is not None else None,
    )
    plan = phases(hp, settings.max_epochs)
    warmup = cached_warmup(hp, settings, plan)
    checkpoint = tune.get_checkpoint()
    main = None  # how the trial's last phase fits; made when that phase starts, or now to restore into it
    if warmup is None or holds_top(checkpoint):
        main = prepare_fit(model, backbone, hp, hp["unfreeze"] if cacheable else None, data, settings, shared)
    start_epoch = restore(model, checkpoint, top=main.top if main is not None else None)
    report = ReportEpoch(None, data["y_val"], settings, hp, started, model=model, device=device)
    report.best = checkpointed_best(checkpoint, settings.metric)
    class_weight = balanced_class_weight(data["y_train"]) if hp["class_weight"] else None
    for number, (first, end, lr, unfreeze) in enumerate(plan):
        if end <= start_epoch:
            continue  # resumed past this phase
        if number == 0 and warmup is not None:
            fit = prepare_fit(model, backbone, hp, 0, data, settings, frozen_part(backbone), light=False)
        else:
            main = main or prepare_fit(model, backbone, hp, hp["unfreeze"] if cacheable else None, data, settings,
                                       shared)
            fit = main
        report.x_val, report.frozen, report.top = fit.x_val, fit.frozen if fit.light else None, fit.top
        apply_unfreeze(backbone, unfreeze, pretrained=hp["weights"] is not None)
        fit.model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss_for(hp["label_smoothing"]),
                          steps_per_execution=steps_per_execution(fit.top))
        # Its slots now, not in the first training step: variables made while tracing make TF trace it twice.
        fit.model.optimizer.build(fit.model.trainable_variables)
        # With a bank of views, each epoch is its own fit() on view (epoch % views).
        spans = [(e, e + 1) for e in range(max(first, start_epoch), end)] if fit.views is not None else \
            [(max(first, start_epoch), end)]
        for begin, stop in spans:
            if report.stopped:
                return model
            fit.model.fit(
                fit.views[begin % len(fit.views)] if fit.views is not None else fit.x_train,
                data["y_train"],
                batch_size=int(hp["batch_size"]),
                epochs=stop,
                initial_epoch=begin,
                class_weight=class_weight,
                callbacks=[report],
                shuffle=True,
                verbose=0,
            )
    return model


def cached_warmup(hp: dict, settings: TrialSettings, plan: list) -> bool | None:
    """True when the trial's first phase is a warm-up whose head can train on the cached features of the
    whole frozen backbone (a pretrained backbone; no augmentation, or a bank of augmented views); else None."""
    if len(plan) < 2 or not settings.activation_cache:
        return None
    return True if can_use_cache({**hp, "unfreeze": 0}, settings.augment_views) else None


@dataclasses.dataclass
class Fit:
    """What one phase of a trial fits, and on what."""

    model: keras.Model  # the classifier, or a top on cached features sharing its layers
    top: keras.Model | None  # the top, when the phase trains on cached features
    frozen: object  # the frozen part whose cached output it trains on (trainables.activation_cache.Frozen)
    x_train: np.ndarray
    x_val: np.ndarray
    views: list | None  # a bank of augmented views of x_train, one per epoch in turn
    light: bool  # its checkpoints hold only the top (the frozen part is rebuilt from the pretrained weights)


def prepare_fit(model, backbone, hp: dict, unfreeze, data: dict, settings: TrialSettings, frozen=None, *,
                light: bool = True) -> Fit:
    """The phase's fit: the whole ``model`` on images when ``unfreeze`` is None or leaves no clean cut, else a top
    trained on the cached output of the frozen part below the top ``unfreeze`` layers (``frozen``: that part,
    if known). ``light=False``: checkpoints hold the whole classifier (a warm-up, whose next phase restores it)."""
    x_train, x_val = data["x_train"], data["x_val"]
    split = split_backbone(backbone, unfreeze) if unfreeze is not None else None
    if split is None:
        return Fit(model, None, None, x_train, x_val, None, False)
    # The frozen part's output is the same every epoch: compute it once (per node), train the rest on it.
    prefix, suffix, _ = split
    frozen = frozen if frozen is not None else frozen_part(prefix)
    fit_model = top = cached_top(suffix, model.get_layer("head"), prefix.output.shape[1:])
    dtype = HEAD_ONLY_DTYPE if suffix is None else FINE_TUNE_DTYPE
    views = None
    if hp["augment"] != "none":
        augmentation = make_augmentation(hp["augment"], seed=settings.seed)
        views = cached_views(prefix, x_train, augmentation, views=settings.augment_views, policy=hp["augment"],
                             seed=settings.seed, dtype=dtype, identity=frozen.identity,
                             digest=shipped_digest(data, "x_train"))
    pool = suffix is None and hp["pooling"] == "avg"  # a head alone that averages first: average once
    x_train, x_val = (cached_features(prefix, x, dtype=dtype, identity=frozen.identity, pool=pool,
                                      digest=shipped_digest(data, name))
                      for name, x in (("x_train", x_train), ("x_val", x_val)))
    if pool:
        fit_model = pooled_head(top)
        views = [pooled(v) for v in views] if views is not None else None
    return Fit(fit_model, top, frozen, x_train, x_val, views, light)


def holds_top(checkpoint) -> bool:
    """Whether a Tune checkpoint holds only a top trained on cached features (``save_classifier``)."""
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        return (Path(folder) / TOP_FILE).is_file() and not (Path(folder) / MODEL_FILE).is_file()


# Training steps per call into TensorFlow for a trial on cached features. Such a step is a few small matrix
# products, so Keras's per-step Python and dispatch cost (~2 ms) is most of a head-only trial; running many steps
# per call takes it out. The batches, their order and the updates are the same.
CACHED_STEPS_PER_EXECUTION = 64


def shipped_digest(data: dict, name: str) -> str | None:
    """``data[name]``'s ``data_digest`` as the driver computed it (``search.prepare``), or None: then the cache
    hashes the images itself."""
    return data.get(DIGEST_PREFIX + name)


def steps_per_execution(top) -> int:
    """Steps per ``fit`` call into TensorFlow: many on cached features (``top``), one for a whole network."""
    return CACHED_STEPS_PER_EXECUTION if top is not None else 1


def pooled_head(head: keras.Model) -> keras.Model:
    """``head`` after its pooling layer, for pooled features; its layers (and so its weights) are ``head``'s."""
    pool = head.layers[1]
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        raise ValueError(f"pooled_head: the head's first layer is {type(pool).__name__}, not average pooling")
    vectors = keras.Input(shape=(pool.output.shape[-1],), name="pooled_features")
    x = vectors
    for layer in head.layers[2:]:
        x = layer(x)
    return keras.Model(vectors, x, name="pooled_head")


def cached_top(suffix, head, feature_shape) -> keras.Model:
    """Cached features -> probabilities, sharing layers (and so weights) with the whole classifier."""
    if suffix is None:
        return head
    features = keras.Input(shape=tuple(feature_shape), name="cached_features")
    return keras.Model(features, head(suffix(features)), name="cached_top")


def setup_tensorflow(cpus: float, seed: int, *, mixed_precision: bool | str = "auto") -> dict:
    """GPU memory growth, mixed precision, a thread count that matches the trial's CPUs, seeds.

    Returns where the trial runs: Ray node, GPU (``"none"`` on CPU) and dtype policy, which every epoch reports.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    for gpu in gpus:
        try:
            # Grow on demand instead of taking the whole card, so fractional-GPU trials can share it.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised by an earlier trial in this reused worker
    device = describe_device(gpus)
    if mixed_precision == "auto":
        mixed_precision = device["compute_capability"] >= 7.0
    device["precision"] = "mixed_float16" if mixed_precision else "float32"
    threads = max(1, int(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass
    keras.backend.clear_session()
    _freeze_long_lived_objects()
    keras.mixed_precision.set_global_policy(device["precision"])  # after clear_session, which resets it
    keras.utils.set_random_seed(seed)
    return device


@functools.cache
def _freeze_long_lived_objects() -> None:
    """Once per process: leave the objects alive now out of later garbage collections.

    clear_session's gc.collect() walks every object, TensorFlow's, Keras's and
    Ray's included: ~0.3 s, as long as a cached trial's training. Those live as
    long as the worker, so later collections need only walk what trials made.
    (Reference counting still frees a frozen object that is no longer used.)
    """
    gc.freeze()


def describe_device(gpus) -> dict:
    """The Ray node and GPU a trial runs on, for the leaderboard and the logs."""
    import os

    import ray
    import tensorflow as tf

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if not gpus:
        return {"node_id": node, "gpu": "none", "compute_capability": 0.0}
    details = tf.config.experimental.get_device_details(gpus[0])
    major, minor = details.get("compute_capability", (0, 0))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "?")
    return {"node_id": node, "gpu": f"{visible}: {details.get('device_name', 'GPU')}",
            "compute_capability": float(f"{major}.{minor}")}


def balanced_class_weight(y: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(y)
    weights = compute_class_weight("balanced", classes=classes, y=y)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def restore(model, checkpoint, *, top=None) -> int:
    """Load weights from a Tune checkpoint; return the epoch to continue from.

    A whole classifier's weights go into ``model``. A cached trial's checkpoint
    holds only what trains (``top.keras``, see ``trainables.checkpoint``): that
    goes into ``top``, the part the resumed trial fits, while its frozen part
    comes from the same pretrained weights as before.
    """
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if (folder / MODEL_FILE).is_file():
            target, saved = model, folder / MODEL_FILE
        elif top is not None:
            target, saved = top, folder / TOP_FILE
        else:
            raise ValueError(f"checkpoint {folder} holds a model trained on cached features; "
                             "resume it with the activation cache on")
        target.set_weights(keras.saving.load_model(saved, compile=False).get_weights())
        return int(json.loads((folder / "trial.json").read_text())["epoch"])


def checkpointed_best(checkpoint, metric: str) -> float | None:
    """The score the restored ``checkpoint`` was saved with (its ``trial.json``), or None without one.

    A resumed trial checkpoints again only when it beats that score: else its first epoch after the
    restore would always checkpoint (nothing to beat), and the trial's checkpoint, the newest, would
    hold a worse epoch than the best one the leaderboard names.
    """
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        value = json.loads((Path(folder) / "trial.json").read_text()).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def predict_in_batches(model, x, batch_size: int) -> np.ndarray:
    """``model.predict(x)``, the same outputs, without its set-up on every call (a tf.data pipeline:
    ~0.1 s, more than a whole epoch of a head on cached features)."""
    return np.concatenate([model.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


class ReportEpoch(keras.callbacks.Callback):
    """Once per epoch: validation metrics to Tune, plus a checkpoint when the metric improves.

    The checkpoint holds the whole classifier, or for a trial on cached
    features its ``frozen`` part and the ``top`` it fits (``save_classifier``).
    """

    def __init__(self, x_val, y_val, settings: TrialSettings, hp: dict, started: float, model, device=None,
                 frozen=None, top=None):
        super().__init__()
        self.device = {k: v for k, v in (device or {}).items() if k in PLACEMENT}
        self.x_val, self.y_val, self.settings, self.hp, self.started = x_val, y_val, settings, hp, started
        self.classifier = model  # the whole classifier, even when only its head is being fit
        self.frozen, self.top = frozen, top
        self.best: float | None = None
        self.setup_s = self.epoch_started = None
        self.stopped = False  # the loss diverged

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()
        if self.setup_s is None:  # TF set-up, model build, weights, restore, activation cache: before epoch 1
            self.setup_s = self.epoch_started - self.started

    def on_epoch_end(self, epoch, logs=None):
        from ray import tune

        from trainables.metrics import classification_metrics

        s = self.settings
        probs = predict_in_batches(self.model, self.x_val, max(64, int(self.hp["batch_size"])))
        scores = classification_metrics(self.y_val, probs, list(s.class_names), positive=s.positive)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float((logs or {}).get("loss", math.nan)),
            **{f"val_{k}": v for k, v in scores.items()},
            "elapsed_s": time.monotonic() - self.started,
            "trainable_params": int(sum(np.prod(w.shape) for w in self.classifier.trainable_weights)),
            "total_params": int(self.classifier.count_params()),
            # Where the time goes: set-up before epoch 1, this epoch (fit + validation), saving a checkpoint.
            "setup_s": self.setup_s,
            "epoch_s": time.monotonic() - self.epoch_started,
            "checkpoint_s": 0.0,
            "diverged": int(not math.isfinite(float((logs or {}).get("loss", 0.0)))),
            **self.device,  # node_id, gpu, precision: where this epoch ran
        }
        if metrics["diverged"]:  # a NaN or inf loss never recovers: end the trial now
            self.model.stop_training = self.stopped = True
        if not is_better(metrics.get(s.metric), self.best, s.mode):
            tune.report(metrics)
            return
        self.best = metrics[s.metric]
        with tempfile.TemporaryDirectory(prefix="medsearch-ckpt-") as folder:
            saving = time.monotonic()
            save_classifier(Path(folder), self.classifier, frozen=self.frozen, top=self.top)
            state = {"epoch": epoch + 1, s.metric: self.best, "class_names": list(s.class_names), "hparams": self.hp}
            (Path(folder) / "trial.json").write_text(json.dumps(state, default=str))
            metrics["checkpoint_s"] = time.monotonic() - saving
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# --- cross-validated trials (Study(cv_folds=k)) -------------------------------------------------------------


@dataclasses.dataclass
class Fold:
    """One fold's model and data in a cross-validated trial."""

    model: keras.Model  # the whole classifier (raw RGB -> probabilities)
    backbone: object
    fit_model: keras.Model  # what trains: the classifier, or the top on cached features
    top: keras.Model | None
    train_index: np.ndarray  # rows of train ∪ val it trains on (every other fold)
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray  # its own fold, which it never trains on
    y_val: np.ndarray


def fold_indices(folds: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train rows, held-out rows)`` of each fold 0..k-1 of train ∪ val."""
    if set(np.unique(folds)) != set(range(k)):
        raise ValueError(f"cv_folds={k}, but the data's folds are {sorted(set(np.unique(folds)))}")
    return [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(k)]


def fit_cross_validated(config: dict, data: dict, settings: TrialSettings, *, weights_dir=None) -> list[keras.Model]:
    """A cross-validated trial: k fold models trained epoch by epoch in turn; reports the fold means. Returns
    the k classifiers.

    Train ∪ val is ``x_train`` then ``x_val``, with ``fold_train`` and ``fold_val``. A frozen backbone's
    cached features are computed (or found) for ``x_train`` and ``x_val`` exactly as a one-split trial
    does, so the same cache entries serve every fold and every trial; each fold indexes their concatenation.
    """
    from ray import tune

    from trainables.metrics import classification_metrics
    from trainables.model import apply_unfreeze, build_model

    started = time.monotonic()
    k = int(settings.cv_folds)
    hp = resolve_hparams(config, settings.max_epochs, settings.random_init)
    seed = (settings.seed * 100_003 + int(config.get("trial_number", 0))) % (2**31 - 1)
    device = setup_tensorflow(settings.cpus, seed, mixed_precision=settings.mixed_precision)
    placement = {key: v for key, v in device.items() if key in PLACEMENT}
    names = ("x_train", "x_val")
    parts = tuple(data[name] for name in names)
    y_all = np.concatenate([data["y_train"], data["y_val"]])
    index = fold_indices(np.concatenate([data["fold_train"], data["fold_val"]]), k)
    input_shape = parts[0].shape[1:]
    cacheable = settings.activation_cache and can_use_cache(hp, settings.augment_views)
    shared = None  # a whole frozen backbone, shared by every fold's classifier (unfreeze 0)
    if cacheable and str(hp["unfreeze"]) == "0":
        shared = shared_backbone(hp["backbone"], weights=hp["weights"], input_shape=input_shape, weights_dir=weights_dir)
    frozen = shared  # the frozen part whose cached output the folds train on; with unfreeze > 0, fold 0's prefix
    x_all = views = None
    built = []
    for f in range(k):
        model, backbone = build_model(hp, input_shape=input_shape, num_classes=len(settings.class_names),
                                      weights_dir=weights_dir, seed=seed + f,
                                      backbone=shared.model if shared is not None else None)
        fit_model, top = model, None
        split = split_backbone(backbone, hp["unfreeze"]) if cacheable else None
        if split is not None:
            prefix, suffix, _ = split
            frozen = frozen if frozen is not None else frozen_part(prefix)  # pretrained and frozen: one for all folds
            fit_model = top = cached_top(suffix, model.get_layer("head"), prefix.output.shape[1:])
            if x_all is None:
                dtype = HEAD_ONLY_DTYPE if suffix is None else FINE_TUNE_DTYPE
                if hp["augment"] != "none":
                    augmentation = make_augmentation(hp["augment"], seed=settings.seed)
                    views = np.concatenate([cached_views(prefix, x, augmentation, views=settings.augment_views,
                                                         policy=hp["augment"], seed=settings.seed, dtype=dtype,
                                                         identity=frozen.identity, digest=shipped_digest(data, name))
                                            for name, x in zip(names, parts)], axis=1)
                x_all = np.concatenate([cached_features(prefix, x, dtype=dtype, identity=frozen.identity,
                                                        digest=shipped_digest(data, name))
                                        for name, x in zip(names, parts)])
        built.append((model, backbone, fit_model, top))
    if x_all is None:
        x_all = np.concatenate(parts)
    folds = [Fold(model, backbone, fit_model, top, tr, x_all[tr], y_all[tr], x_all[va], y_all[va])
             for (model, backbone, fit_model, top), (tr, va) in zip(built, index)]
    del x_all
    checkpoint = tune.get_checkpoint()
    start_epoch = restore_folds(folds, checkpoint)
    cached = frozen if any(f.top is not None for f in folds) else None
    batch = int(hp["batch_size"])
    best, setup_s = checkpointed_best(checkpoint, settings.metric), None
    for first, end, lr, unfreeze in phases(hp, settings.max_epochs):
        if end <= start_epoch:
            continue
        for fold in folds:
            apply_unfreeze(fold.backbone, unfreeze, pretrained=hp["weights"] is not None)
            fold.fit_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss_for(hp["label_smoothing"]),
                                   steps_per_execution=steps_per_execution(fold.top))
            fold.fit_model.optimizer.build(fold.fit_model.trainable_variables)
        for epoch in range(max(first, start_epoch), end):
            epoch_started = time.monotonic()
            setup_s = epoch_started - started if setup_s is None else setup_s
            losses, scores = [], []
            for fold in folds:
                x = views[epoch % len(views)][fold.train_index] if views is not None else fold.x_train
                history = fold.fit_model.fit(x, fold.y_train, batch_size=batch, epochs=epoch + 1, initial_epoch=epoch,
                                             class_weight=balanced_class_weight(fold.y_train) if hp["class_weight"]
                                             else None, shuffle=True, verbose=0)
                losses.append(float(history.history.get("loss", [math.nan])[-1]))
                probs = predict_in_batches(fold.fit_model, fold.x_val, max(64, batch))
                scores.append(classification_metrics(fold.y_val, probs, list(settings.class_names),
                                                     positive=settings.positive))
            metrics = {
                "epoch": epoch + 1,
                **fold_summary([{"loss": v} for v in losses], prefix="train_"),
                **fold_summary(scores, prefix="val_"),
                "elapsed_s": time.monotonic() - started,
                "trainable_params": int(sum(np.prod(w.shape) for w in folds[0].model.trainable_weights)),
                "total_params": int(folds[0].model.count_params()),
                "setup_s": setup_s,
                "epoch_s": time.monotonic() - epoch_started,  # all k folds
                "checkpoint_s": 0.0,
                "diverged": int(not all(math.isfinite(v) for v in losses)),
                **placement,
            }
            if not is_better(metrics.get(settings.metric), best, settings.mode):
                tune.report(metrics)
            else:
                best = metrics[settings.metric]
                with tempfile.TemporaryDirectory(prefix="medsearch-ckpt-") as folder:
                    saving = time.monotonic()
                    save_folds(Path(folder), [f.model for f in folds], frozen=cached,
                               tops=[f.top for f in folds] if cached is not None else None)
                    state = {"epoch": epoch + 1, settings.metric: best, "class_names": list(settings.class_names),
                             "hparams": hp, "cv_folds": k}
                    (Path(folder) / "trial.json").write_text(json.dumps(state, default=str))
                    metrics["checkpoint_s"] = time.monotonic() - saving
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            if metrics["diverged"]:  # a NaN or inf loss never recovers: end the trial now
                return [f.model for f in folds]
    return [f.model for f in folds]


def fold_summary(scores: list[dict], *, prefix: str) -> dict:
    """``<prefix><metric>``: the mean over folds (NaN folds left out), and ``<prefix><metric>_std``: their
    sample standard deviation (ddof=1), the spread the mean hides."""
    import warnings

    out = {}
    for key in scores[0]:
        values = np.array([s[key] for s in scores], dtype=np.float64)
        with warnings.catch_warnings():  # every fold NaN (AUC of a one-class fold): the mean is NaN too
            warnings.simplefilter("ignore", RuntimeWarning)
            out[f"{prefix}{key}"] = float(np.nanmean(values))
            out[f"{prefix}{key}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    return out


def restore_folds(folds: list[Fold], checkpoint) -> int:
    """``restore`` for a cross-validated trial: each fold's weights from ``fold_<i>/``; the epoch to continue from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        subs = fold_folders(folder)
        if len(subs) != len(folds):
            raise ValueError(f"checkpoint {folder} holds {len(subs)} fold model(s), this trial trains {len(folds)}")
        for fold, sub in zip(folds, subs):
            if (sub / MODEL_FILE).is_file():
                target, saved = fold.model, sub / MODEL_FILE
            elif fold.top is not None:
                target, saved = fold.top, sub / TOP_FILE
            else:
                raise ValueError(f"checkpoint {sub} holds a model trained on cached features; "
                                 "resume it with the activation cache on")
            target.set_weights(keras.saving.load_model(saved, compile=False).get_weights())
        return int(json.loads((folder / "trial.json").read_text())["epoch"])
