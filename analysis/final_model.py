"""``FinalModel``: the one model a study ships, which every consumer serves.

``python -m analysis.evaluate`` chooses and fits it on the validation split and
writes ``final_model.json``: its member trials and their checkpoints, the
test-time views (TTA), the temperature, the decision rule (a threshold for a
positive class, or the argmax), the class names and how it was chosen.
Everything that predicts loads it here: ``search.predict``, ``analysis.export``
(the ensemble, views and temperature inside the exported graph),
``Results.final_model`` / ``Results.predict`` and the report, so the numbers a
reader sees describe the model that is deployed.

Where no ``final_model.json`` exists, the final model is the best trial on
validation, uncalibrated, deciding by the argmax, and every consumer says so in
one sentence (``FinalModel.provenance``).

The arithmetic is one function each: a member's probabilities are the mean over
its views (``member_probabilities``), the model's the mean over its members,
then ``softmax(log p / T)`` (``analysis.calibration.apply_temperature``), then
the decision (``analysis.operating_point.decide``). ``analysis.evaluate`` scores
the test split through the same functions, so ``test_predictions.parquet`` and
``FinalModel.predict`` agree to float rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from analysis.calibration import FINAL_MODEL, CalibrationError, apply_temperature, read_final_model, trial_calibration
from analysis.operating_point import decide
from analysis.reader import ResultsFolderError, choose_trial, locate_checkpoint, read_class_names, read_study

__all__ = ["TTA_MODES", "VIEWS", "FinalModel", "Member", "Prediction", "load_final_model", "tta_views",
           "member_probabilities", "combine"]

TTA_MODES = ("flips", "dihedral")
# Each test-time view as (quarter turns, mirrored left-right): flips = the image, mirrored left-right, up-down,
# and both; dihedral = every symmetry of a square (for images with no up, such as dermoscopy).
VIEWS = {
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "dihedral": tuple((k, False) for k in range(4)) + tuple((k, True) for k in range(4)),
}
BATCH_SIZE = 64


class FinalModelError(ResultsFolderError):
    """``final_model.json`` does not describe this folder's models. The message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Member:
    trial: str
    checkpoint: str  # relative to the results folder


@dataclasses.dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # (N, classes), calibrated when the model has a temperature
    decisions: np.ndarray  # (N,) class indices under the model's decision rule
    class_names: tuple[str, ...]
    # Per image, from analysis.ood (Results.predict fills them; None: not checked): whether it looks unlike the
    # training images, and every reason in words ("" when there is none), as search.predict's CSV has them.
    ood: np.ndarray | None = None
    warnings: tuple[str, ...] | None = None

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.decisions]


@dataclasses.dataclass(frozen=True)
class FinalModel:
    """The model a study ships: members, views, temperature and decision rule, fitted on validation."""

    run_dir: Path
    label: str  # e.g. "trial_003_cnn_s3", "ensemble of top 3 + TTA flips"
    members: tuple[Member, ...]
    tta: str | None
    temperature: float | None  # None: the models' own probabilities
    threshold: float | None  # None: the argmax
    positive: int | None  # the class the threshold is for
    class_names: tuple[str, ...]
    source: str  # FINAL_MODEL, or "best trial" when none was fitted
    chosen_by: str
    notes: tuple[str, ...] = ()
    rule: str | None = None  # how the threshold was chosen, in words
    _models: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # ---- what it is, in words

    @property
    def fitted(self) -> bool:
        return self.source == FINAL_MODEL

    @property
    def trials(self) -> list[str]:
        return [m.trial for m in self.members]

    def decision_text(self) -> str:
        """The decision rule in words."""
        which = "calibrated probability" if self.temperature is not None else "probability"
        if self.threshold is None:
            return f"the class with the highest {which} (argmax)"
        others = [c for i, c in enumerate(self.class_names) if i != self.positive]
        otherwise = repr(others[0]) if len(others) == 1 else "the most probable other class"
        return f"{self.class_names[self.positive]!r} when its {which} >= {self.threshold:.4f}, else {otherwise}"

    def provenance(self) -> str:
        """One sentence every consumer prints: which model this is and where it came from."""
        if not self.fitted:
            if self.chosen_by == "--trial":
                return (f"trial {self.label} alone (--trial), uncalibrated, deciding by the argmax (no {FINAL_MODEL} "
                        "in the results folder)")
            return (f"no {FINAL_MODEL} in the results folder: the final model is the best trial on validation, "
                    f"{self.label}, uncalibrated, deciding by the argmax (python -m analysis.evaluate RUN_DIR fits "
                    "an ensemble, TTA, a temperature and a threshold on validation)")
        if self.chosen_by == "--trial":
            calibrated = f"temperature {self.temperature:.4f}" if self.temperature is not None else "uncalibrated"
            return (f"trial {self.label} alone (--trial), with what {FINAL_MODEL} fitted for it: {calibrated}; "
                    "decides " + self.decision_text())
        parts = [f"final model {self.label!r}"]
        if len(self.members) > 1 or self.tta:
            parts.append(f"({', '.join(self.trials)}" + (f"; TTA {self.tta}" if self.tta else "") + ")")
        calibrated = (f"temperature {self.temperature:.4f}" if self.temperature is not None else "uncalibrated")
        return (" ".join(parts) + f" from {FINAL_MODEL}, {self.chosen_by}; {calibrated}; decides "
                + self.decision_text())

    # ---- the models

    def models(self) -> list:
        """The members' Keras classifiers (raw RGB in [0, 255] -> probabilities), loaded once."""
        if not self._models:
            from trainables.checkpoint import load_classifier

            for member in self.members:
                path = self.run_dir / member.checkpoint
                try:
                    model = load_classifier(path)
                except Exception as exc:  # a truncated or foreign file raises many types
                    raise FinalModelError(f"cannot load the model of {member.trial} in {str(path)!r}: "
                                          f"{type(exc).__name__}: {exc}") from None
                if model.output_shape[-1] != len(self.class_names):
                    raise FinalModelError(f"the model of {member.trial} outputs {model.output_shape[-1]} "
                                          f"probabilities but the final model has {len(self.class_names)} classes "
                                          f"{list(self.class_names)}; run python -m analysis.evaluate again")
                self._models[member.trial] = model
        return [self._models[m.trial] for m in self.members]

    @property
    def image_size(self) -> int:
        """The input size (pixels per side) every member takes."""
        sizes = {m.input_shape[1] for m in self.models()}
        if len(sizes) != 1 or None in sizes:
            raise FinalModelError(f"the members of {self.label!r} take different image sizes {sorted(map(str, sizes))}; "
                                  "predict with one of them (--trial) or evaluate an ensemble of one backbone size")
        return int(sizes.pop())

    # ---- predicting

    def raw_probabilities(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """The mean over members of each member's mean over its views; before the temperature."""
        return np.mean([member_probabilities(m, images, self.tta, batch_size) for m in self.models()], axis=0)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` with the temperature applied; rows of unreadable images (NaN) stay NaN."""
        out = np.array(raw, dtype=np.float64)
        if self.temperature is None:
            return out
        good = ~np.isnan(out).any(axis=1)
        out[good] = apply_temperature(out[good], self.temperature)
        return out

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Class index per row under the decision rule."""
        probabilities = np.nan_to_num(np.asarray(probabilities, dtype=np.float64), nan=0.0)
        if self.threshold is None:
            return probabilities.argmax(axis=1)
        return decide(probabilities, self.positive, self.threshold)

    def predict(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> Prediction:
        """Probabilities (calibrated) and decisions for decoded images (N, size, size, 3), raw RGB in [0, 255]."""
        probabilities = self.calibrate(self.raw_probabilities(np.asarray(images, dtype=np.float32), batch_size))
        return Prediction(probabilities, self.decide(probabilities), self.class_names)

    def predict_paths(self, paths, batch_size: int = BATCH_SIZE) -> Prediction:
        """``predict`` on image files, decoded like training (``trainables.data.decode_images``)."""
        from trainables.data import decode_images

        images = decode_images([str(p) for p in paths], self.image_size, use_cache=False)
        return self.predict(images, batch_size)

    def keras_model(self, *, calibrated: bool = True):
        """One Keras model computing ``predict``'s probabilities: each view of the input through each member,
        averaged, then the temperature (``trainables.calibrated``'s registered layers), for export."""
        import keras

        from trainables.calibrated import DihedralView, TemperatureScaling

        models, size = self.models(), self.image_size
        image = keras.Input(shape=(size, size, 3), name="image", dtype="float32")
        views = [image] if not self.tta else [DihedralView(k, m, name=f"view_{i}")(image)
                                              for i, (k, m) in enumerate(VIEWS[self.tta])]
        per_member = []
        for i, model in enumerate(models):
            if len(models) > 1:  # one name per operation: members of one backbone share theirs
                model = keras.Model(model.inputs[0], model.outputs[0], name=f"member_{i}")
            outs = [model(v) for v in views]
            per_member.append(outs[0] if len(outs) == 1 else keras.layers.Average()(outs))
        out = per_member[0] if len(per_member) == 1 else keras.layers.Average(name="ensemble")(per_member)
        if calibrated and self.temperature is not None:
            out = TemperatureScaling(self.temperature, name="temperature_scaling", dtype="float32")(out)
        if len(models) == 1 and not self.tta and not (calibrated and self.temperature is not None):
            return models[0]
        return keras.Model(image, out, name="final_model")

    def replace(self, **changes) -> FinalModel:
        return dataclasses.replace(self, _models=self._models, **changes)


# --------------------------------------------------------------------------
# the arithmetic, shared with analysis.evaluate
# --------------------------------------------------------------------------


def tta_views(images: np.ndarray, mode: str | None) -> list[np.ndarray]:
    """The test-time views of a batch (N, H, W, C) for ``mode`` (``VIEWS``); None or "none": the image alone."""
    if mode is None or mode == "none":
        return [images]
    if mode not in VIEWS:
        raise ValueError(f"TTA mode must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    out = []
    for turns, mirror in VIEWS[mode]:
        view = np.rot90(images, turns, axes=(1, 2)) if turns else images
        out.append(view[:, :, ::-1] if mirror else view)
    return out


def member_probabilities(model, images: np.ndarray, mode: str | None, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The mean of one model's probabilities over the views of ``mode`` (its plain probabilities for None)."""
    views = tta_views(images, mode)
    total = sum(model.predict(np.ascontiguousarray(v), batch_size=batch_size, verbose=0).astype(np.float64)
                for v in views)
    return total / len(views)


def combine(member_probs: list[np.ndarray], temperature: float | None) -> np.ndarray:
    """The model's probabilities from its members' (each already averaged over views): mean, then temperature."""
    raw = np.mean(member_probs, axis=0)
    return raw if temperature is None else apply_temperature(raw, temperature)


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def load_final_model(run_dir: str | Path, *, trial: str | None = None, threshold: float | None = None) -> FinalModel:
    """The final model of a results folder; ``trial``: that trial alone instead, with what was fitted for it;
    ``threshold``: a decision threshold for the positive class replacing the fitted one."""
    run_dir = Path(run_dir).expanduser().resolve()
    study = read_study(run_dir)
    try:
        record = read_final_model(run_dir)
    except CalibrationError as exc:
        raise FinalModelError(str(exc)) from None
    if trial is None and record is not None:
        model = _from_record(run_dir, study, record)
    else:
        model = _one_trial(run_dir, study, record, trial)
    return model if threshold is None else _with_threshold(model, study, threshold)


def _from_record(run_dir: Path, study: dict, record: dict) -> FinalModel:
    where = f"{FINAL_MODEL} in {str(run_dir)!r}"
    trials, checkpoints = record.get("trials"), record.get("checkpoints")
    if not trials or not isinstance(trials, list) or not isinstance(checkpoints, list) or len(checkpoints) != len(trials):
        raise FinalModelError(f"{where} lists no members (trials and checkpoints); run python -m analysis.evaluate "
                              f"{run_dir} again to rewrite it")
    class_names = tuple(str(c) for c in record.get("class_names") or ())
    members, notes = [], []
    for name, recorded in zip(trials, checkpoints):
        path, moved = locate_checkpoint(run_dir, str(recorded), str(name), study.get("name"))
        members.append(Member(str(name), path.relative_to(run_dir).as_posix()))
        if moved:
            notes.append(f"checkpoint of {name} found in the moved run folder, not at {recorded}")
    trained = read_class_names(run_dir / members[0].checkpoint, run_dir, study)
    if list(class_names) != list(trained):
        raise FinalModelError(f"{FINAL_MODEL} was fitted for classes {list(class_names)} but the model has "
                              f"{trained}; run python -m analysis.evaluate on this results folder again")
    tta = record.get("tta")
    if tta is not None and tta not in VIEWS:
        raise FinalModelError(f"{where}: tta is {tta!r}, not one of {', '.join(TTA_MODES)} or null; run "
                              "python -m analysis.evaluate again to rewrite it")
    temperature = record.get("temperature")
    if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise FinalModelError(f"{where}: temperature is {temperature!r}, not a positive number; run "
                              "python -m analysis.evaluate again to rewrite it")
    value, positive = record.get("threshold"), record.get("positive_class")
    if value is not None and positive not in class_names:
        raise FinalModelError(f"{where}: positive_class {positive!r} is not one of {list(class_names)}; run "
                              "python -m analysis.evaluate again to rewrite it")
    return FinalModel(run_dir, str(record.get("model") or trials[0]), tuple(members), tta,
                      None if temperature is None else float(temperature),
                      None if value is None else float(value),
                      None if value is None else class_names.index(positive), class_names, FINAL_MODEL,
                      str(record.get("chosen_by") or "fitted on validation"), tuple(notes),
                      rule=record.get("threshold_rule"))


def _one_trial(run_dir: Path, study: dict, record: dict | None, name: str | None) -> FinalModel:
    chosen = choose_trial(run_dir, study, name)
    class_names = tuple(read_class_names(chosen.checkpoint, run_dir, study))
    try:
        fitted = trial_calibration(record, chosen.name, list(class_names))
    except CalibrationError as exc:
        raise FinalModelError(str(exc)) from None
    member = Member(chosen.name, chosen.checkpoint.relative_to(run_dir).as_posix())
    notes = [] if not chosen.relocated_from else [
        f"checkpoint found in the moved run folder, not at {chosen.relocated_from}"]
    if record is None:
        return FinalModel(run_dir, chosen.name, (member,), None, None, None, None, class_names, "best trial",
                          "the best trial on validation" if name is None else "--trial", tuple(notes))
    if record.get("trials") != [chosen.name] or record.get("tta"):
        notes.append(f"{FINAL_MODEL}'s final model is {record.get('model')!r}; this uses {chosen.name} alone, "
                     "with the temperature and threshold fitted on validation for it")
    if fitted is None:
        notes.append(f"uncalibrated: {FINAL_MODEL} fitted nothing for {chosen.name} (it covers "
                     f"{', '.join(record.get('per_trial') or {}) or 'no trial'})")
        return FinalModel(run_dir, chosen.name, (member,), None, None, None, None, class_names, FINAL_MODEL,
                          "--trial", tuple(notes))
    stored = fitted.get("threshold") or None
    positive = None
    if stored is not None:
        if stored.get("class") not in class_names:
            raise FinalModelError(f"{FINAL_MODEL}: per_trial.{chosen.name}.threshold.class is {stored.get('class')!r}, "
                                  f"not one of {list(class_names)}; run python -m analysis.evaluate again")
        positive = class_names.index(stored["class"])
    return FinalModel(run_dir, chosen.name, (member,), None, fitted["temperature"],
                      None if stored is None else float(stored["value"]), positive, class_names, FINAL_MODEL,
                      "--trial", tuple(notes), rule=None if stored is None else stored.get("rule"))


def _with_threshold(model: FinalModel, study: dict, threshold: float) -> FinalModel:
    """``model`` deciding with ``threshold`` (``--threshold``) for its positive class."""
    names = model.class_names
    positive = model.positive
    if positive is None:
        name = study.get("dataset", {}).get("positive_class") if len(names) == 2 else None
        positive = names.index(name) if name in names else (1 if len(names) == 2 else None)
    if positive is None:
        raise FinalModelError(f"--threshold {threshold}: no positive class to apply it to among the {len(names)} "
                              f"classes {list(names)}; run python -m analysis.evaluate RUN_DIR --positive-class NAME "
                              "first, which records one")
    replaced = f" (replaces {model.threshold:.4f} fitted on validation)" if model.threshold is not None else ""
    return model.replace(threshold=float(threshold), positive=positive, rule="--threshold",
                         notes=model.notes + (f"threshold {threshold} from --threshold{replaced}",))
