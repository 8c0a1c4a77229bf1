"""A final refit: the final model's members trained again on train ∪ validation (``analysis.evaluate --refit``).

Why: once validation has chosen a configuration, its images can also teach the
model. nnU-Net's last stage trains on everything for the same reason. The refit
is the chosen model's last step, after every choice is made:

- what is kept from the validation fit: the members (which trials), the views
  (TTA), the temperature and the threshold. None of them can be fitted again:
  the refit models have seen the validation images, so validation can no longer
  judge or calibrate them. The threshold and temperature are those of the model
  before the refit, which is why the record says so;
- what is trained again: each member's configuration, with the hyperparameters
  it trained with (its ``trial.json``), the study's seed and settings, for as
  many epochs as its checkpoint had (its best epoch), on train ∪ validation,
  outside Ray Tune (no ASHA: the epoch count is the trial's own);
- a cross-validated study is not refitted: its model already is the fold
  ensemble, whose k models together trained on all of train ∪ validation (as
  nnU-Net keeps its folds), and the record says so.

The refit models are written to ``RUN_DIR/refit/<trial>/`` (``analysis.files.REFIT_DIR``), and
``final_model.json`` names them as the members, so predict, export and the API
serve the refit model; the model before the refit is scored on the test split
beside it (the measurement of whether refitting helped), and named in the
record (``refit.before``). The selection-corrected estimate describes the model
before the refit: nothing is left to estimate the refit model on but the test split.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings

import numpy as np

from analysis.errors import EvaluateError
from analysis.files import REFIT_DIR, SPLITS, write_file
from analysis.reader import Loaded
from analysis.selection import Candidate
from analysis.splits import label_indices, located, read_splits

__all__ = ["REFIT_SUFFIX", "CV_NOT_REFIT", "check_refit", "refit_name", "refit_final"]

REFIT_SUFFIX = "+refit"  # a refit member's name: its trial's, marked
CV_NOT_REFIT = ("not refitted: a cross-validated study's model is its fold ensemble, whose models together trained "
                "on all of train + val (kept, as nnU-Net keeps its folds)")


def check_refit(split: str) -> None:
    """``--refit`` with ``--split val`` is refused: a refit model has trained on the images it would be scored on."""
    if split == "val":
        raise EvaluateError("--refit: the refit model trains on the validation images, so it cannot be scored on "
                            "them (--split val); score it on the test split, or leave --refit out")


def refit_name(trial: str) -> str:
    return trial + REFIT_SUFFIX


@dataclasses.dataclass(frozen=True)
class _Member:
    loaded: Loaded
    hparams: dict
    epochs: int


def refit_final(ev, final: Candidate, record: dict) -> tuple[Candidate | None, list[Loaded], dict]:
    """Train ``final``'s members again on train ∪ val; returns the refit candidate (None for a cross-validated
    study), the refit models (as ``Loaded``, named ``<trial>+refit``) and the ``refit`` entry of the record.

    ``record`` (``final_model.json`` as fitted on validation) is updated to name the refit members."""
    if "fold" in ev.val_rows.columns:
        ev.log(f"note: --refit: {CV_NOT_REFIT}")
        return None, [], {"done": False, "why": CV_NOT_REFIT}
    members = [_member(ev, name) for name in final.members]
    rows = _train_and_val(ev)
    y = label_indices(rows, ev.classes)
    images = {size: _decode(rows, size) for size in sorted({m.loaded.size for m in members})}  # once per size
    refitted, entries = [], {}
    for member in members:
        loaded, entry = _refit(ev, member, images[member.loaded.size], rows, y)
        refitted.append(loaded)
        entries[member.loaded.trial.name] = entry
    label = f"{final.label}, refit on train+val"
    candidate = Candidate(label, tuple(m.trial.name for m in refitted), final.tta)
    before = {"model": final.label, "trials": list(record["trials"]), "checkpoints": list(record["checkpoints"])}
    if record.get("selection_corrected"):
        record["selection_corrected"]["describes"] = "the model before its refit on train + val"
    record.update(model=label, trials=list(candidate.members),
                  checkpoints=[m.trial.checkpoint.relative_to(ev.run_dir).as_posix() for m in refitted])
    refit = {"done": True, "before": before, "members": entries, "n_train": len(rows),
             "kept_from_validation_fit": "the members, the test-time views, the temperature and the threshold, as "
                                         "fitted on validation for the model before the refit (validation cannot "
                                         "judge a model trained on it)",
             "selection_corrected_describes": "the model before the refit"}
    return candidate, refitted, refit


def _member(ev, name: str) -> _Member:
    loaded = next(m for m in ev.models if m.trial.name == name)
    path = loaded.trial.checkpoint / "trial.json"
    try:
        saved = json.loads(path.read_text())
        hparams, epochs = dict(saved["hparams"]), int(saved["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"--refit: cannot read the hyperparameters and epoch of {name} from {str(path)!r} "
                            f"({exc}); a refit needs the trial.json its checkpoint was saved with") from None
    if epochs < 1:
        raise EvaluateError(f"--refit: {name}'s checkpoint records epoch {epochs}; nothing to train for")
    return _Member(loaded, hparams, epochs)


def _train_and_val(ev):
    """The rows of train ∪ val, located on this machine, in file order."""
    table = read_splits(ev.run_dir / SPLITS)
    rows = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    return located(ev.run_dir, rows, ev.data_dir)


def _decode(rows, size: int) -> np.ndarray:
    """Train ∪ val at ``size``, decoded like training; the validation pixels stay in memory (no disk cache)."""
    from trainables.data import decode_images

    is_val = (rows["split"] == "val").to_numpy()
    paths = rows["path"].astype(str).tolist()
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    images[~is_val] = decode_images([p for p, v in zip(paths, is_val) if not v], size)
    images[is_val] = decode_images([p for p, v in zip(paths, is_val) if v], size, use_cache=False)
    return images


def _refit(ev, member: _Member, images: np.ndarray, rows, y) -> tuple[Loaded, dict]:
    from trainables.checkpoint import save_classifier
    from trainables.train import TrialSettings, fit_classifier

    name, study = member.loaded.trial.name, ev.study
    started = time.monotonic()
    is_val = (rows["split"] == "val").to_numpy()
    size = member.loaded.size
    positive = ev.positive_for_auc
    settings = TrialSettings(max_epochs=member.epochs, metric=study.get("metric", "val_balanced_accuracy"),
                             mode=study.get("mode", "max"), class_names=tuple(ev.classes), positive=positive,
                             seed=int(study.get("seed") or 0), cpus=float(study.get("cpus_per_trial") or 1),
                             weights_dir=study.get("weights_dir"), activation_cache=bool(study.get("activation_cache", True)),
                             augment_views=int(study.get("augment_views") or 0),
                             mixed_precision=study.get("mixed_precision", "auto"))  # as search.run's, from study.json
    ev.log(f"refit: {name} ({member.hparams.get('backbone')}) on {len(rows)} train + val images, "
           f"{member.epochs} epoch(s) ...")
    # Epoch reports go to Ray Tune, which is not running; the validation rows are trained on, so they only fill
    # the epoch report's arguments (its numbers would be training scores).
    data = {"x_train": images, "y_train": y, "x_val": images[is_val], "y_val": y[is_val]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tune.report outside a Tuner" warns once per epoch
        model = fit_classifier(member.hparams, data, settings)
    folder = ev.run_dir / REFIT_DIR / name
    if folder.exists():
        shutil.rmtree(folder)  # an earlier refit's; the record names only this one
    folder.mkdir(parents=True)
    save_classifier(folder, model)
    seconds = round(time.monotonic() - started, 1)
    entry = {"epochs": member.epochs, "n_train": len(rows), "seconds": seconds,
             "from_checkpoint": member.loaded.trial.checkpoint.relative_to(ev.run_dir).as_posix()}
    trial_json = {"epoch": member.epochs, "class_names": list(ev.classes), "hparams": member.hparams,
                  "refit": {"of": name, **entry}}
    write_file(folder / "trial.json", (json.dumps(trial_json, indent=1) + "\n").encode())
    ev.log(f"refit: {name} done in {seconds:.0f} s -> {folder.relative_to(ev.run_dir).as_posix()}")
    trial = dataclasses.replace(member.loaded.trial, name=refit_name(name), checkpoint=folder)
    return Loaded(member.loaded.row, trial, model, list(ev.classes), size), entry
