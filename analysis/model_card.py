"""``python -m analysis.model_card RUN_DIR``: ``RUN_DIR/model_card.md``, from the results folder's files only.

The headings are those a reviewer looks for (CLAIM / TRIPOD+AI): intended
use, data, protocol, model, results at the operating point, calibration,
failure modes, limitations, software. Every value is read from a file of the
folder, named in the card: ``study.json``, ``splits.parquet``,
``duplicates.parquet``, ``leaderboard.parquet``, ``final_model.json``,
``test_evaluation.json`` (its latest evaluation), ``test_predictions.parquet``
and the export sidecars ``export/*.json``. What the folder does not hold is
said to be missing, never filled in. ``analysis.evaluate`` writes the card
after each test evaluation; this command rewrites it (e.g. after an export).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.calibration import ECE_BINS
from analysis.checklist import checklist, checklist_frame
from analysis.files import EXPORT_DIR, FINAL_MODEL, MODEL_CARD, TEST_LOG, predictions_file
from analysis.headline import headline, headline_text, selection_text
from analysis.intended_use import intended_use
from analysis.operating_point import rule_text
from analysis.prevalence import PREVALENCE_NOTE, prevalence_frame
from analysis.records import latest_evaluation, read_evaluations
from analysis.subgroups import subgroup_card
from analysis.errors import AnalysisError
from analysis.files import shown_path, write_file
from analysis.tables import decimals_for, format_value, hyperparameter_columns, to_markdown
from search.argtypes import ArgumentParser

__all__ = ["MODEL_CARD", "build_card", "write_model_card", "main"]

WORST_CLASSES = 3
WRONG_EXAMPLES = 10


class ModelCardError(ValueError):
    """The folder lacks what a card needs. The message names the file and the fix."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(value, interval, digits: int = 4) -> str:
    low, high = (interval or [None, None])[:2]
    if low is None or high is None:
        return _num(value, digits)
    return f"{_num(value, digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _digits(evaluation: dict) -> int:
    """The decimals one image of the evaluated split can move (``decimals_for``): 120 images, 3 decimals."""
    n = evaluation.get("n")
    return decimals_for(1 / n) if n else 4


def _table(frame: pd.DataFrame) -> str:
    return to_markdown(frame)


def latest_final(run_dir: Path) -> tuple[dict, dict]:
    """The latest test evaluation that scored a final model, and the test_evaluation.json record."""
    record = read_evaluations(run_dir)
    evaluation = latest_evaluation(record, final=True)
    if evaluation is None:
        raise ModelCardError(f"{str(run_dir / TEST_LOG)!r} holds no evaluation of a final model; run "
                             f"python -m analysis.evaluate {run_dir} first")
    return evaluation, record


def build_card(run_dir: str | Path) -> str:
    run_dir = Path(run_dir).expanduser().resolve()
    study_record = _read_json(run_dir / "study.json")
    if study_record is None:
        raise ModelCardError(f"{str(run_dir)!r} has no readable study.json; is it a results folder?")
    final_model = _read_json(run_dir / FINAL_MODEL)
    if final_model is None:
        raise ModelCardError(f"{str(run_dir / 'final_model.json')!r} is missing; run python -m analysis.evaluate "
                             f"{run_dir} first")
    evaluation, record = latest_final(run_dir)
    study = study_record.get("study") or {}
    final = evaluation["final"]
    models = {m["label"]: m for m in final["models"]}
    chosen = models[final["model"]]
    parts = [
        f"# Model card: {study.get('name', run_dir.name)}",
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `python -m analysis.model_card` "
        "from the files of this results folder; each section names the files it reads.",
        _in_short(study, evaluation, record),
        _intended_use(study, evaluation),
        _data(run_dir, study, study_record),
        _protocol(run_dir, study, record),
        _model(run_dir, final_model, study),
        _results(evaluation, chosen, models),
        _calibration(final, models, _digits(evaluation)),
        _failure_modes(run_dir, chosen, final_model, evaluation),
        subgroup_card(run_dir, evaluation),
        _limitations(evaluation, chosen, final_model, record),
        _export(run_dir),
        _software(study_record),
        _checklist(run_dir, study, evaluation, final_model),
    ]
    return "\n\n".join(parts) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir).expanduser().resolve()
    return write_file(run_dir / MODEL_CARD, build_card(run_dir).encode("utf-8"))


# --------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------


def _intended_use(study: dict, evaluation: dict) -> str:
    use = intended_use(study)
    stated = (evaluation.get("prevalence") or {})
    if stated.get("stated") is not None:  # --prevalence overrides the study's for this evaluation
        use["prevalence"] = stated["stated"]
    lines = ["## Intended use and users",
             "_From study.json (`Study(intended_use=..., intended_users=..., not_for=..., prevalence=...)`)._", ""]
    if use["warning"]:
        lines.append(f"- **{use['warning'].capitalize()}**: the images are generated by the "
                     f"`{(study.get('dataset') or {}).get('loader')}` loader")
    for field, label in (("intended_use", "intended use"), ("intended_users", "intended users"),
                         ("not_for", "not for")):
        lines.append(f"- {label}: {use[field]}" if use[field] else
                     f"- {label}: not recorded (set `Study({field}=...)`)")
    positive = (study.get("dataset") or {}).get("positive_class")
    if use["prevalence"] is not None:
        lines.append(f"- prevalence of {positive} in the intended setting: {100 * use['prevalence']:.1f}% "
                     "(PPV and NPV are reported at it)")
    elif positive:
        lines.append("- prevalence in the intended setting: not stated (PPV and NPV are shown at typical ones; set "
                     "`Study(prevalence=...)` or pass `--prevalence P`)")
    lines.append(f"- study description: {study.get('description') or 'not recorded'}")
    return "\n".join(lines)


def _in_short(study: dict, evaluation: dict, record: dict) -> str:
    facts = headline(study, evaluation, record)
    return "## In short\n_From test_evaluation.json: the same numbers as the results below._\n\n" + (
        headline_text(facts) if facts else "No final model has been evaluated.")


def _checklist(run_dir: Path, study: dict, evaluation: dict, final_model: dict) -> str:
    lines = ["## Reporting checklist (TRIPOD+AI, CLAIM)",
             "_What this folder records for the topics these guidelines ask about; \"not recorded\" says how to add it._",
             "", _table(checklist_frame(checklist(run_dir, study, evaluation, final_model)))]
    return "\n".join(lines)


def _data(run_dir: Path, study: dict, study_record: dict) -> str:
    ds = study.get("dataset") or {}
    lines = ["## Data", "_From study.json and splits.parquet._", "",
             f"- loader `{ds.get('loader')}`, path `{shown_path(ds.get('path'))}`, images resized to "
             f"{ds.get('image_size')} x {ds.get('image_size')} px",
             f"- positive class (study): {ds.get('positive_class') or 'none'}",
             f"- unreadable images left out (--skip-corrupt): {len(study_record.get('skipped_images') or [])}"]
    splits_path = run_dir / "splits.parquet"
    if splits_path.is_file():
        splits = pd.read_parquet(splits_path, columns=["label", "split"])
        counts = pd.crosstab(splits["label"], splits["split"], margins=True, margins_name="all")
        order = [c for c in ("train", "val", "test", "unused", "all") if c in counts.columns]
        counts = counts[order].reset_index().rename(columns={"label": "class"})
        lines += ["", "Images per class and split:", "", _table(counts.astype(str))]
    return "\n".join(lines)


def _near_duplicates_line(run_dir: Path) -> str:
    """The leakage audit's figures (near_duplicates.parquet over splits.parquet), or that it did not run."""
    pairs_path, splits_path = run_dir / "near_duplicates.parquet", run_dir / "splits.parquet"
    if not (pairs_path.is_file() and splits_path.is_file()):
        return "- near-duplicate images: no audit recorded (no near_duplicates.parquet)"
    from trainables.near_duplicates import contamination

    f = contamination(pd.read_parquet(pairs_path), pd.read_parquet(splits_path))
    shares = "; ".join(f"{f[f'{s}_share_with_train_near_duplicate']:.1%} of {s} images have a near-duplicate in train"
                       for s in ("val", "test") if f.get(f"{s}_images"))
    return (f"- near-duplicate images: {f['pairs']} pair(s) in {f['clusters']} cluster(s), {f['cross_split_pairs']} "
            f"across splits, {f['label_conflicts']} label conflict(s){'; ' + shares if shares else ''} "
            "(near_duplicates.parquet)")


def _protocol(run_dir: Path, study: dict, record: dict) -> str:
    ds = study.get("dataset") or {}
    lines = ["## Protocol", "_From study.json, splits.parquet, duplicates.parquet, near_duplicates.parquet, "
             "leaderboard.parquet and "
             "test_evaluation.json._", "",
             f"- split protocol `{ds.get('split')}` (options {ds.get('split_options') or {}}, seed {ds.get('seed')})"]
    splits_path = run_dir / "splits.parquet"
    if splits_path.is_file():
        splits = pd.read_parquet(splits_path)
        if "group" in splits.columns and splits["group"].notna().any():
            used = splits[splits["split"].isin(["train", "val", "test"]) & splits["group"].notna()]
            spanning = int((used.groupby("group")["split"].nunique() > 1).sum())
            lines.append(f"- groups (patient or lesion): {used['group'].nunique()}; in more than one split: {spanning}"
                         + (" (leak-free by group)" if spanning == 0 else " (NOT leak-free by group)"))
        else:
            lines.append("- groups: none recorded in splits.parquet, so the split is by image; images of one "
                         "patient or lesion may sit in different splits")
    duplicates = run_dir / "duplicates.parquet"
    if duplicates.is_file():
        table = pd.read_parquet(duplicates)
        across = f", {int(table['cross_split'].sum())} across splits" if "cross_split" in table else ""
        conflicting = f", {int((~table['same_label']).sum())} with different labels" if "same_label" in table else ""
        lines.append(f"- byte-identical images: {len(table)} pair(s) in duplicates.parquet{across}{conflicting}")
    else:
        lines.append("- byte-identical images: none recorded (no duplicates.parquet)")
    lines.append(_near_duplicates_line(run_dir))
    board_path = run_dir / "leaderboard.parquet"
    if board_path.is_file():
        board = pd.read_parquet(board_path)
        statuses = ", ".join(f"{k} {v}" for k, v in board["status"].value_counts().items()) if "status" in board else ""
        lines.append(f"- search: {len(board)} trials ({statuses}); metric `{study.get('metric')}` "
                     f"({study.get('mode')}), at most {study.get('max_epochs')} epochs, ASHA grace period "
                     f"{study.get('grace_period')}, reduction factor {study.get('reduction_factor')}")
    lines.append("- the trials, the ensemble size, the temperature and the threshold were chosen on the validation "
                 "split (final_model.json `fitted_on`); the test split was read "
                 f"{len((record or {}).get('test_split_log') or [])} time(s) (test_evaluation.json `test_split_log`)")
    return "\n".join(lines)


def _model(run_dir: Path, final_model: dict, study: dict) -> str:
    lines = ["## Model", "_From final_model.json and leaderboard.parquet._", "",
             f"- final model: {final_model.get('model')} (trials {', '.join(final_model.get('trials') or [])})",
             f"- test-time augmentation: {final_model.get('tta') or 'none'}",
             f"- temperature: {_num(final_model.get('temperature'))} ({(final_model.get('fitted_on') or {}).get('temperature')})",
             f"- decision: {final_model.get('decision')}"
             + (f"; threshold {_num(final_model.get('threshold'))} ({final_model.get('threshold_rule')})"
                if final_model.get("threshold") is not None else "")]
    if final_model.get("ensemble"):
        lines.append(f"- ensemble: k = {final_model['ensemble'].get('k')} ({final_model['ensemble'].get('chosen')})")
    board = pd.read_parquet(run_dir / "leaderboard.parquet").set_index("trial_name")
    members = [t for t in final_model.get("trials") or [] if t in board.index]
    if members:
        rows = board.loc[members]
        columns = [c for c in hyperparameter_columns(rows.reset_index()) if rows[c].notna().any()]
        extra = [c for c in ("best_epoch", f"best_{study.get('metric')}") if c in rows.columns]
        shown = rows[[*columns, *extra]].reset_index()
        for column in shown.columns:
            numbers = pd.to_numeric(shown[column], errors="coerce").dropna()
            whole = len(numbers) == shown[column].notna().sum() and bool((numbers % 1 == 0).all())
            shown[column] = [format_value(v, column, whole) for v in shown[column]]
        lines += ["", "Member trials (hyperparameters as recorded in leaderboard.parquet):", "", _table(shown)]
    return "\n".join(lines)


def _results(evaluation: dict, chosen: dict, models: dict) -> str:
    level = int(round(100 * evaluation.get("level", 0.95)))
    d = _digits(evaluation)
    lines = ["## Results", f"_From test_evaluation.json (evaluated {evaluation.get('evaluated_at')}, "
             f"{evaluation.get('n')} {evaluation.get('split')} images; {level}% percentile bootstrap intervals over "
             f"{evaluation.get('n_boot')} resamples, seed {evaluation.get('seed')})._", ""]
    names = ["accuracy", "balanced_accuracy", "macro_f1", "auc"]
    rows = [{"model": label + (" (final)" if m is chosen else ""),
             **{n.replace("_", " "): _ci(m["metrics"].get(n), m["ci"].get(n), d) for n in names}}
            for label, m in models.items()]
    lines += [f"Each model at the decision it ships with ({evaluation.get('decision') or 'its decision rule'}), "
              "on its calibrated probabilities:", "", _table(pd.DataFrame(rows))]
    selection = (evaluation.get("final") or {}).get("selection_corrected")
    if selection and selection.get("estimate") is not None:
        lines += ["", selection_text(selection) + f" {selection['method']}; {selection['n_boot']} resamples."]
    op = chosen.get("operating_point")
    if op:
        at, ci = op["at_threshold"], op["ci"]
        lines += ["", f"Operating point of the final model for **{op['class']}**: threshold {_num(op['value'])} "
                  f"({_rule(op)}); on validation sensitivity {_num(op['validation']['sensitivity'], d)}, specificity "
                  f"{_num(op['validation']['specificity'], d)}. On {evaluation.get('split')}:", "",
                  _table(pd.DataFrame([{m: _ci(at[m], ci[m], d) for m in ("sensitivity", "specificity", "ppv", "npv", "f1")}])),
                  "", f"Confusion at the threshold: TP {at['tp']}, FN {at['fn']}, FP {at['fp']}, TN {at['tn']}."]
        if op.get("at_prevalence"):
            lines += ["", f"PPV and NPV above hold at the {evaluation.get('split')} set's prevalence only. "
                      + PREVALENCE_NOTE, "", _table(prevalence_frame(op["at_prevalence"], d))]
    ovr = chosen.get("one_vs_rest")
    if ovr:
        lines += ["", "Per class, one vs rest at the shipped decision:", "",
                  _table(pd.DataFrame([{"class": c, "sensitivity": _ci(o["sensitivity"], o["ci"]["sensitivity"], d),
                                        "specificity": _ci(o["specificity"], o["ci"]["specificity"], d)}
                                       for c, o in ovr.items()]))]
    return "\n".join(lines)


def _rule(op: dict) -> str:
    return rule_text(op)


def _calibration(final: dict, models: dict, d: int = 4) -> str:
    lines = ["## Calibration", f"_From test_evaluation.json. ECE: top-label confidence, {ECE_BINS} equal-width bins; "
             "Brier: mean squared distance to the one-hot label (halved for two classes); temperature fitted on "
             "validation._", ""]
    rows = []
    for label, m in models.items():
        c = m["calibration"]
        rows.append({"model": label, "temperature": _num(c["temperature"]),
                     "ECE before": _num(c["before"]["ece"], d), "ECE after": _num(c["after"]["ece"], d),
                     "Brier before": _num(c["before"]["brier"], d), "Brier after": _num(c["after"]["brier"], d),
                     "NLL before": _num(c["before"]["nll"], d), "NLL after": _num(c["after"]["nll"], d)})
    lines.append(_table(pd.DataFrame(rows)))
    if final.get("reliability_plot"):
        lines += ["", f"![reliability diagram]({final['reliability_plot']})"]
    return "\n".join(lines)


def _failure_modes(run_dir: Path, chosen: dict, final_model: dict, evaluation: dict) -> str:
    lines = ["## Failure modes", "_From test_evaluation.json and test_predictions.parquet._", ""]
    classes = final_model.get("class_names") or []
    recalls = sorted(((chosen["metrics"].get(f"recall_{c}"), c) for c in classes), key=lambda t: (t[0] is None, t[0]))
    lines.append("Lowest recall (at the shipped decision): " + "; ".join(
        f"{c} {_ci(r, chosen['ci'].get(f'recall_{c}'), _digits(evaluation))}" for r, c in recalls[:WORST_CLASSES]))
    path = run_dir / predictions_file(evaluation.get("split", "test"))
    if not path.is_file():
        lines.append(f"\n{path.name} is missing: no examples to list.")
        return "\n".join(lines)
    rows = pd.read_parquet(path)
    rows = rows[rows["trial"] == chosen["label"]].reset_index(drop=True)
    if rows.empty:
        lines.append(f"\n{path.name} holds no predictions of {chosen['label']!r}.")
        return "\n".join(lines)
    probs = rows[[f"prob_{c}" for c in classes]].to_numpy()  # calibrated, as shipped
    predicted = rows["predicted"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    wrong = np.flatnonzero(predicted != rows["label_index"].to_numpy())
    confidence = probs[wrong, predicted[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:WRONG_EXAMPLES]
    lines.append(f"\n{len(wrong)} of {len(rows)} {evaluation.get('split')} images are wrong at the final model's decision "
                 f"rule; the {len(order)} most confident (calibrated probability of the wrong call):\n")
    table = pd.DataFrame({"image": rows.loc[order, "path"].astype(str), "true": rows.loc[order, "label"].astype(str),
                          "called": [classes[i] for i in predicted[order]],
                          "probability": [_num(probs[i, predicted[i]]) for i in order]})
    lines.append(_table(table) if len(table) else "(none)")
    return "\n".join(lines)


def _limitations(evaluation: dict, chosen: dict, final_model: dict, record: dict) -> str:
    lines = ["## Limitations", "_Computed from the files above._", ""]
    n = evaluation.get("n")
    ba = chosen["ci"].get("balanced_accuracy") or [None, None]
    if ba[0] is not None:
        lines.append(f"- {n} {evaluation.get('split')} images: the balanced-accuracy interval is "
                     f"{_num(ba[1] - ba[0], _digits(evaluation))} wide")
    n_val = (final_model.get("fitted_on") or {}).get("n")
    if n_val:
        lines.append(f"- {n_val} validation images fitted the temperature and threshold and chose the trials: one "
                     f"image moves a validation accuracy by {_num(1 / n_val)}")
    fit = (final_model.get("validation") or {}).get("temperature_fit") or {}
    if fit.get("at_bound"):
        lines.append(f"- the temperature ({_num(fit.get('temperature'))}) lies at its search bound: the validation "
                     "set could not pin it down")
    c = chosen["calibration"]
    if c["after"]["ece"] > c["before"]["ece"]:
        lines.append(f"- calibration fitted on validation raised the {evaluation.get('split')} ECE "
                     f"({_num(c['before']['ece'])} -> {_num(c['after']['ece'])})")
    op = chosen.get("operating_point")
    if op and op.get("rule") == "target_sensitivity" and op["at_threshold"]["sensitivity"] < op["target"]:
        lines.append(f"- the target sensitivity {op['target']} met on validation was not reached on "
                     f"{evaluation.get('split')} ({_num(op['at_threshold']['sensitivity'], _digits(evaluation))})")
    if evaluation.get("final", {}).get("fitted_on_evaluated_split"):
        lines.append("- evaluated on the validation split it was fitted on: optimistic")
    reads = len((record or {}).get("test_split_log") or [])
    if reads > 1:
        lines.append(f"- the test split has been read {reads} times (test_split_log)")
    return "\n".join(lines)


def _export(run_dir: Path) -> str:
    lines = ["## Export", "_From export/*.json (analysis.export's sidecars) and final_model.json._", ""]
    folder = run_dir / EXPORT_DIR
    sidecars = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not sidecars:
        lines.append("No export sidecar in export/: the model has not been exported (python -m analysis.export).")
    final = _read_json(run_dir / FINAL_MODEL) or {}
    for path in sidecars:
        side = _read_json(path) or {}
        check = side.get("verification") or {}
        same = side.get("trials") == final.get("trials") and side.get("tta") == final.get("tta")
        what = "the final model" if same else "NOT the final model (exported before the last evaluation, or --trial)"
        lines.append(f"- {path.name}: format {side.get('format')}, {side.get('model')} "
                     f"({', '.join(side.get('trials') or [])}), {what}; verified "
                     + (f"on {check.get('split')}: {'ok' if check.get('ok') else 'FAILED'}" if check else "no"))
        if side.get("output"):
            lines.append(f"  - outputs {side['output']}")
        if side.get("decision"):
            lines.append(f"  - decision: {side['decision']}")
    return "\n".join(lines)


def _software(study_record: dict) -> str:
    versions = study_record.get("versions") or {}
    lines = ["## Software", "_From study.json._", "", f"- python {study_record.get('python', 'not recorded')}"]
    lines += [f"- {name} {version}" for name, version in sorted(versions.items())]
    lines.append(f"- study file `{shown_path(study_record.get('study_file'))}` (SHA-256 "
                 f"{study_record.get('study_file_sha256')})")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis.model_card", allow_abbrev=False,
                                     description="Write RUN_DIR/model_card.md from the results folder's files.")
    parser.add_argument("run_dir", help="a study's results folder, evaluated by python -m analysis.evaluate")
    args = parser.parse_args(argv)
    try:
        path = write_model_card(args.run_dir)
    except (ModelCardError, AnalysisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
