"""The reference studies, run end to end on 2 CPU cores: ours beside the published numbers (issue 17 item 3).

    python benchmarks/paper_tables.py --rows S1 S2 S5 S5-grouped --storage /work/real \\
        --data-root ../shared/datasets
    python benchmarks/paper_tables.py --rows S1 --reuse S1=/work/real/melanoma_cpu   # a finished folder
    python benchmarks/paper_tables.py --table-only      # the Markdown again, from the JSON

Each row is one study file of ``spaces/`` (the files users get), sized for a
2-core machine with offline weights:

  S1          spaces/melanoma_cpu.py          melanoma10k (train/ only)   split S1, test
  S2          spaces/ham10000_binary_cpu.py   HAM10000 binary, 1,200      split S2, test (240)
  S5          spaces/ham10000_cpu.py          HAM10000, 7 classes         split S5, val (as S5 reported: optimistic)
  S5-grouped  spaces/ham10000_grouped_cpu.py  HAM10000, 7 classes         grouped by lesion_id, test

For each row: the study runs through the Python API (``search.run_study``)
unless its folder (``--storage``/<study name>, or ``--reuse ROW=FOLDER``)
already holds a completed run; then ``analysis.evaluate.evaluate_top_k`` scores
the final model (ensemble and temperature, threshold, chosen on validation)
once, unless an evaluation of that split is already logged in the folder
(``test_evaluation.json`` / ``val_evaluation.json``), whose numbers are read
instead: the test split is read once, ever. Everything is chosen on
validation; the test numbers are reported, never tuned on.

Written: ``benchmarks/results/paper_tables.json`` (merged: rows not asked for
keep their last record) and ``benchmarks/results/paper_tables.md`` (generated
from the JSON; ``--table-only`` regenerates it). A row that cannot be measured
yet (study unfinished, or ``--read-only`` with no logged evaluation) is
recorded as ``pending`` with the commands that complete it.

Published numbers come from ``analysis/published.csv`` through
``analysis.published.compare``: a delta only where the split protocol is the
same as the study's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
JSON_OUT = RESULTS / "paper_tables.json"
MD_OUT = RESULTS / "paper_tables.md"
N_BOOT = 1000
METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1", "auc": "AUC",
    "f1_malignant": "F1 (malignant)", "precision_malignant": "precision (malignant)",
    "recall_malignant": "recall (malignant)", "precision_benign": "precision (benign)",
    "recall_benign": "recall (benign)", "f1_benign": "F1 (benign)",
}


@dataclass(frozen=True)
class Row:
    key: str
    study_file: str  # relative to the repository
    dataset_dir: str  # under --data-root
    published_study: str  # its key in analysis/published.csv
    split: str  # the split the final model is scored on
    evaluation: dict  # evaluate_top_k's final-model options
    metrics: tuple  # shown in the table, in order
    targets: tuple = ()  # (metric, threshold, "test" or "val")
    data_note: str = ""
    choices: tuple = ()
    val_metrics: tuple = ()  # validation lines shown in the table too
    short: str = ""  # the CPU-sizing choices in a few words, for the table



# S5 and its lesion-grouped twin (spaces/ham10000_cpu.py, spaces/ham10000_grouped_cpu.py) share everything but the split.
S5_SHORT = "lite0/lite1 (pip weights) · 128 px · unfreeze 0/21/41 cached · no aug · class weights · 16 trials ≤ 10 ep, 30 min · ens. auto"
S5_CHOICES = ("efficientnet_lite0 / lite1 with pip-shipped ImageNet weights instead of EfficientNetB1",
              "128 px instead of 224 px",
              "unfreeze 0 / 21 / 41 after a 2-epoch warm-up (cache-served depths; S5: 30)",
              "no augmentation (S5: flips, rotation, zoom, brightness, contrast)",
              "balanced class weights (as S5), batch 32",
              "16 trials, up to 10 epochs, ASHA (grace 2, factor 3), 30 min limit, 2 trials x 1 core",
              "evaluation: --ensemble auto, no TTA (8 views would cost ~8x the evaluation time); final model "
              "chosen on validation: single best or ensemble of the top k (k on validation)")

ROWS = {
    "S1": Row(
        key="S1", study_file="spaces/melanoma_cpu.py", dataset_dir="melanoma10k", published_study="S1", split="test",
        evaluation={"ensemble": "auto", "tta": "dihedral", "target_sensitivity": 0.95},
        metrics=("accuracy", "f1_malignant", "precision_malignant", "recall_malignant", "auc", "balanced_accuracy"),
        targets=(("accuracy", 0.93, "test"),),
        data_note="melanoma10k `train/` only (9,605 images: 6,723 / 1,440 / 1,442). S1 used the 13,879-image Kaggle "
                  "\"Melanoma Cancer Dataset\" (9,715 / 2,081 / 2,083): same split protocol, different images, so "
                  "the delta compares like protocols, not like images",
        short="lite0/lite1 (pip weights) · 128 px · unfreeze 0/21/41 on cached features · no aug · 24 trials ≤ 12 ep, 45 min · ens. auto ± TTA",
        choices=("efficientnet_lite0 / lite1 with pip-shipped ImageNet weights (offline) instead of MobileNetV2",
                 "128 px instead of 224 px",
                 "unfreeze 0 / 21 / 41 (depths the activation cache serves; S1: 30 of MobileNetV2)",
                 "no augmentation (clean cached features)",
                 "24 trials, up to 12 epochs, ASHA (grace 3, factor 2), 45 min limit, 2 trials x 1 core",
                 "evaluation: analysis.evaluate --ensemble auto --tta dihedral --target-sensitivity 0.95; final model "
                 "chosen on validation among single best / ensemble of the top k (k on validation), each with and "
                 "without dihedral TTA (8 views); accuracy etc. at the argmax; a malignant threshold for sensitivity "
                 ">= 0.95 fitted on validation, reported as the operating point"),
    ),
    "S2": Row(
        key="S2", study_file="spaces/ham10000_binary_cpu.py", dataset_dir="ham10000", published_study="S2", split="test",
        evaluation={"ensemble": "auto"},
        metrics=("accuracy", "precision_benign", "recall_benign", "f1_benign", "precision_malignant",
                 "recall_malignant", "f1_malignant", "auc"),
        targets=(("accuracy", 0.90, "test"),),
        data_note="HAM10000 binary (malignant = mel, bcc, akiec), the S2 subsample: 1,200 images (600 / 600), "
                  "816 train / 144 val / 240 test (120 / 120); split by image, like the study; selection by 5-fold "
                  "cross-validation on the 960 train + val images",
        short="lite0/1/2 (pip weights) · 224 px · unfreeze 0/21/41 cached · aug none/heavy via 4 cached views · 5-fold CV selection · 16 trials ≤ 15 ep, 40 min · ens. auto",
        choices=("efficientnet_lite0 / lite1 / lite2 with pip-shipped ImageNet weights instead of VGG16 / "
                 "MobileNetV2 / custom CNN",
                 "224 px (as S2)",
                 "unfreeze 0 / 21 / 41 (cache-served depths; S2: frozen)",
                 "augmentation none or heavy through a cached bank of 4 augmented views per image (augment_views=4)",
                 "balanced class weights, batch 32 (as S2)",
                 "selection by 5-fold cross-validation on train + val (cv_folds=5): each trial's score is the mean "
                 "of 5 fold models, and its model their ensemble",
                 "16 trials, up to 15 epochs, ASHA (grace 3, factor 2), 40 min limit, 2 trials x 1 core",
                 "evaluation: --ensemble auto: analysis.evaluate chooses the final model on out-of-fold validation "
                 "predictions, single best or ensemble of the top k (k on validation), before it reads the test "
                 "split; no TTA (with 5 fold models per trial, 8 views would cost ~25 min of evaluation here); "
                 "P/R/F1 at the argmax"),
    ),
    "S5": Row(
        key="S5", study_file="spaces/ham10000_cpu.py", dataset_dir="ham10000", published_study="S5", split="val",
        evaluation={"ensemble": "auto"},
        metrics=("accuracy", "balanced_accuracy", "macro_f1", "auc"),
        targets=(("accuracy", 0.80, "val"), ("balanced_accuracy", 0.70, "val")),
        data_note="HAM10000, 7 classes, the S5 split: stratified 80/20 by image, 8,012 train / 2,003 val, no test "
                  "set; lesions leak across it. Scored on val as S5 reported: optimistic (the trials, the "
                  "ensemble size and the temperature were all chosen on it)",
        short=S5_SHORT, choices=S5_CHOICES,
    ),
    "S5-grouped": Row(
        key="S5-grouped", study_file="spaces/ham10000_grouped_cpu.py", dataset_dir="ham10000", published_study="S5",
        split="test", evaluation={"ensemble": "auto"},
        metrics=("accuracy", "balanced_accuracy", "macro_f1", "auc"),
        val_metrics=("accuracy", "balanced_accuracy"),
        data_note="HAM10000, 7 classes, grouped by lesion_id (no lesion on two sides of a split), 70/15/15 "
                  "train / val / test, stratified as far as whole lesions allow: the leak-free number we stand "
                  "behind. No published S5 number shares this protocol",
        short=S5_SHORT, choices=S5_CHOICES,  # the grouped twin differs from S5 only in its split
    ),
}


class RowPending(Exception):
    """The row cannot be measured yet; the message says why and what completes it."""


# --------------------------------------------------------------------------
# running and evaluating a row
# --------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _py() -> str:
    return ".venv/bin/python"


def run_command(row: Row, data_root: str, storage: str) -> str:
    return (f"{_py()} -m search.run {row.study_file} --data-dir {shlex.quote(str(Path(data_root) / row.dataset_dir))} "
            f"--storage {shlex.quote(storage)}")


def evaluate_command(row: Row, folder: Path) -> str:
    ev = row.evaluation
    parts = [f"{_py()} -m analysis.evaluate {shlex.quote(str(folder))}"]
    if row.split != "test":
        parts.append(f"--split {row.split}")
    if ev.get("ensemble"):
        parts.append(f"--ensemble {ev['ensemble']}")
    if ev.get("tta"):
        parts.append(f"--tta {ev['tta']}")
    if ev.get("target_sensitivity"):
        parts.append(f"--target-sensitivity {ev['target_sensitivity']}")
    return " ".join(parts)


def outcome(folder: Path) -> str | None:
    path = folder / "study.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("outcome", "running or stopped")
    except ValueError:
        return "unreadable study.json"


def study_name(row: Row) -> str:
    from search import load_study

    return load_study(ROOT / row.study_file).name


def logged_evaluation(folder: Path, split: str) -> dict | None:
    path = folder / f"{split}_evaluation.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    evaluations = [e for e in record.get("evaluations", []) if e.get("split") == split]
    return {"last": evaluations[-1], "count": len(evaluations),
            "test_reads": len(record.get("test_split_log", []))} if evaluations else None


def measure_row(row: Row, args) -> dict:
    """Run (or reuse) the study, evaluate (or read the logged evaluation), and collect the row's record."""
    storage = str(Path(args.storage).expanduser())
    reuse = dict(args.reuse)
    folder = Path(reuse[row.key]).expanduser().resolve() if row.key in reuse else \
        Path(storage).resolve() / study_name(row)
    if row.key in reuse:
        storage = str(folder.parent)  # a resume of a reused folder continues it where it is
    cmds = {"run": run_command(row, args.data_root, storage), "evaluate": evaluate_command(row, folder),
            "table": f"{_py()} benchmarks/paper_tables.py --rows {row.key} --reuse {row.key}={folder}"}
    study_wall = eval_wall = None
    study_timing = eval_timing = "not measured"
    state = outcome(folder)
    if state is None:
        if row.key in reuse:
            raise RowPending(f"--reuse {row.key}={folder}: no study.json there", cmds)
        if args.read_only:
            raise RowPending(f"{folder} does not exist (--read-only: no study is run)", cmds)
        from search import run_study

        print(f"[{_now()}] {row.key}: running {row.study_file} into {folder}", flush=True)
        started = time.monotonic()
        results = run_study(str(ROOT / row.study_file), storage=storage,
                            data_dir=str(Path(args.data_root).expanduser() / row.dataset_dir))
        study_wall = time.monotonic() - started
        study_timing = "measured by this script (run_study: data, audit, search)"
        folder = Path(results.path).resolve()
        state = outcome(folder)
    if state != "completed":
        raise RowPending(f"{folder}: study outcome {state!r}; let it finish (or resume it: "
                         f"{cmds['run']} --resume), then run this row again", cmds)
    if study_wall is None:
        study_wall = _recorded_study_wall(folder)
        study_timing = "study.json started_at -> finished_at"

    logged = logged_evaluation(folder, row.split)
    if logged is None:
        if args.read_only:
            raise RowPending(f"{folder}: no {row.split} evaluation logged yet (--read-only: the split is not read "
                             "here); evaluate it, then run this row again", cmds)
        from analysis.evaluate import evaluate_top_k

        print(f"[{_now()}] {row.key}: evaluating on {row.split} ({row.evaluation})", flush=True)
        started = time.monotonic()
        evaluate_top_k(folder, k=1, n_boot=N_BOOT, seed=0, split=row.split, log=lambda line: print(line, flush=True),
                       **row.evaluation)
        eval_wall = time.monotonic() - started
        eval_timing = "measured by this script (evaluate_top_k)"
        logged = logged_evaluation(folder, row.split)
        evaluated_here = True
    else:
        evaluated_here = False
        eval_timing = "evaluated outside this script; not measured"
        print(f"[{_now()}] {row.key}: reading the logged {row.split} evaluation of {folder} (not re-reading the split)",
              flush=True)
    return collect(row, folder, logged, study_wall=study_wall, eval_wall=eval_wall, study_timing=study_timing,
                   eval_timing=eval_timing, evaluated_here=evaluated_here, cmds=cmds)


def _recorded_study_wall(folder: Path) -> float | None:
    record = json.loads((folder / "study.json").read_text())
    try:
        start = dt.datetime.fromisoformat(record["started_at"])
        end = dt.datetime.fromisoformat(record["finished_at"])
    except (KeyError, ValueError, TypeError):
        return None
    return (end - start).total_seconds()


# --------------------------------------------------------------------------
# collecting a row's record
# --------------------------------------------------------------------------


def collect(row: Row, folder: Path, logged: dict, *, study_wall, eval_wall, study_timing, eval_timing,
            evaluated_here: bool, cmds: dict) -> dict:
    import pandas as pd

    from analysis.published import compare, run_protocol

    evaluation = logged["last"]
    final = evaluation["final"]
    models = {m["label"]: m for m in final["models"]}
    single = final["models"][0]
    record = json.loads((folder / "study.json").read_text())
    study = record["study"]
    chosen, candidates = choose_on_validation(folder, final, study)
    protocol = run_protocol(folder)
    board = pd.read_parquet(folder / "leaderboard.parquet")
    splits = pd.read_parquet(folder / "splits.parquet", columns=["split"])["split"].value_counts().to_dict()

    metrics = {m: {"value": chosen["metrics"].get(m), "ci": chosen["ci"].get(m)} for m in chosen["metrics"]}
    ours = pd.DataFrame([{"trial_name": chosen["label"], "split": row.split,
                          **{m: v["value"] for m, v in metrics.items()},
                          **{f"{m}_ci_low": (v["ci"] or [None, None])[0] for m, v in metrics.items()},
                          **{f"{m}_ci_high": (v["ci"] or [None, None])[1] for m, v in metrics.items()}}])
    published = compare(ours, row.published_study, protocol)
    published = published.drop(columns=["ours"]).astype(object).where(published.drop(columns=["ours"]).notna(), None)
    published_rows = published.to_dict(orient="records")

    val = candidates[chosen["label"]]["validation"]
    op = chosen.get("operating_point")
    targets = []
    for metric, threshold, on in row.targets:
        value = (metrics if on == row.split else (val or {})).get(metric, {}).get("value")
        targets.append({"metric": metric, "target": threshold, "split": on, "value": value,
                        "met": None if value is None else bool(value >= threshold),
                        "gap": None if value is None else value - threshold})
    wall_total = None if study_wall is None else study_wall + (eval_wall or 0.0)
    return {
        "row": row.key, "status": "measured", "measured_at": _now(),
        "study_file": row.study_file, "study_name": study["name"], "run_dir": str(folder),
        "protocol": protocol, "dataset": row.data_note, "split_evaluated": row.split,
        "optimistic": row.split == "val", "n_eval": evaluation["n"], "split_sizes": splits,
        "image_size": study["dataset"]["image_size"],
        "budget": {k: study.get(k) for k in ("num_samples", "max_epochs", "grace_period", "reduction_factor",
                                              "time_limit_s", "max_concurrent", "cpus_per_trial", "augment_views")},
        "trials_run": int(len(board)), "epochs_run": int(board["epochs"].fillna(0).sum()),
        "trial_status": board["status"].value_counts().to_dict(),
        "final_model": chosen["label"], "final_members": chosen["trials"], "final_tta": chosen.get("tta"),
        "ensemble": final.get("ensemble"),
        "selection": {"rule": SELECTION_RULE, "evaluate_final_model": final["model"],
                      "candidates": {label: {"validation_" + study.get("metric", "val_balanced_accuracy").removeprefix("val_"):
                                             c["score"], "validation_loss": c["loss"], "chosen": label == chosen["label"]}
                                     for label, c in candidates.items()}},
        "evaluation_settings": {k: evaluation.get(k) for k in ("evaluated_at", "k", "n_boot", "seed", "level",
                                                              "metric", "positive_class")},
        "evaluations_logged": logged["count"], "test_split_reads": logged["test_reads"],
        "evaluated_by_this_script": evaluated_here,
        "metrics": metrics, "metric_order": list(row.metrics),
        "evaluate_final": {"label": final["model"],
                           "metrics": {m: {"value": models[final["model"]]["metrics"].get(m),
                                           "ci": models[final["model"]]["ci"].get(m)} for m in row.metrics}},
        "single_best": {"label": single["label"],
                        "metrics": {m: {"value": single["metrics"].get(m), "ci": single["ci"].get(m)}
                                    for m in row.metrics}},
        "operating_point": None if not op else {
            "class": op["class"], "rule": op.get("rule"), "target": op.get("target"), "threshold": op["value"],
            **{m: {"value": op["at_threshold"].get(m), "ci": op["ci"].get(m)}
               for m in ("sensitivity", "specificity", "ppv", "npv", "f1")}},
        "validation": val, "val_metrics_shown": list(row.val_metrics),
        "published": published_rows,
        "wall_s": {"study": study_wall, "evaluation": eval_wall, "total": wall_total,
                   "study_how": study_timing, "evaluation_how": eval_timing},
        "targets": targets, "choices": list(row.choices), "commands": cmds,
    }


SELECTION_RULE = ("among the candidates analysis.evaluate scored (single best, ensemble of the top k, each with and "
                  "without the requested TTA), the one with the best validation score on the study's metric (ties: "
                  "lower validation loss, then the simpler candidate); validation predictions only, from "
                  "val_predictions_cache.parquet")


def choose_on_validation(folder: Path, final: dict, study: dict) -> tuple[dict, dict]:
    """The candidate with the best validation score, and every candidate's validation metrics.

    Since ``--ensemble auto`` / ``--tta auto`` make ``analysis.evaluate`` choose on validation itself (``chosen_by``),
    its choice is taken as it is. Before that, it took its last candidate (ensemble + TTA) whatever validation said;
    test-time views a model never saw in training can hurt it (S1: dihedral TTA lowered validation balanced
    accuracy from 0.93 to 0.88-0.91), so the choice is made here, on validation alone, among the candidates the
    evaluation already scored: the test split is not read again.
    """
    metric = str(study.get("metric", "val_balanced_accuracy")).removeprefix("val_")
    sign = 1.0 if study.get("mode", "max") == "max" else -1.0
    by_label = {m["label"]: m for m in final["models"]}
    candidates, keys = {}, {}
    for order, m in enumerate(final["models"]):
        val = validation_metrics(folder, m["trials"], m.get("tta"))
        score = None if val is None else val.get(metric, {}).get("value")
        loss = None if val is None else val.get("loss", {}).get("value")
        candidates[m["label"]] = {"validation": val, "score": score, "loss": loss}
        bad = math.inf if score is None or math.isnan(score) else -sign * score
        keys[m["label"]] = (bad, math.inf if loss is None else loss, order)
    if str(final.get("chosen_by", "")).startswith("auto"):  # evaluate chose on validation itself, before the test read
        return by_label[final["model"]], candidates
    if all(k[0] == math.inf for k in keys.values()):  # no validation predictions cached: keep evaluate's choice
        return by_label[final["model"]], candidates
    best = min(keys, key=keys.get)
    return by_label[best], candidates


def validation_metrics(folder: Path, members: list[str], tta: str | None) -> dict | None:
    """The final model's metrics on the validation split (where it was chosen: optimistic), from the validation
    predictions ``analysis.evaluate`` cached; no split is read again."""
    import numpy as np
    import pandas as pd

    from analysis.evaluate import bootstrap_ci, point_metrics

    path = folder / "val_predictions_cache.parquet"
    if not path.is_file():
        return None
    cache = pd.read_parquet(path)
    study = json.loads((folder / "study.json").read_text())["study"]
    classes = pd.read_parquet(folder / "splits.parquet", columns=["label", "label_index"]).drop_duplicates() \
        .sort_values("label_index")["label"].astype(str).tolist()
    probs, y = [], None
    for name in members:
        rows = cache[(cache["trial"] == name) & (cache["tta"] == (tta or "none"))]
        if rows.empty:
            return None
        probs.append(rows[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64))
        y = rows["label_index"].to_numpy()
    p = np.mean(probs, axis=0)
    positive = study["dataset"].get("positive_class")
    positive = classes.index(positive) if positive in classes else None
    values = point_metrics(y, p, classes, positive)
    ci = bootstrap_ci(y, p, classes, n_boot=N_BOOT, seed=0, positive=positive)
    return {"n": int(len(y)), **{m: {"value": values[m], "ci": list(ci[m])} for m in values}}


# --------------------------------------------------------------------------
# the JSON and the Markdown
# --------------------------------------------------------------------------


def load_json() -> dict:
    if JSON_OUT.is_file():
        return json.loads(JSON_OUT.read_text())
    return {"rows": {}}


def write_json(record: dict) -> None:
    record["written_at"] = _now()
    record["machine"] = {"cpus": os.cpu_count(), "gpu": None}
    record["rows"] = {k: record["rows"][k] for k in ROWS if k in record["rows"]}  # table order
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = JSON_OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(record), indent=1, allow_nan=False) + "\n")
    tmp.replace(JSON_OUT)


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci") or [None, None]
    if ci[0] is None:
        return _fmt(entry["value"])
    return f"{entry['value']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _count(n) -> str:
    return "n/a" if n is None else f"{n:,}"


def _gap(g) -> str:
    return "n/a" if g is None else f"{g:+.4f}"


def _minutes(s) -> str:
    return "n/a" if s is None else f"{s / 60:.1f} min"


def _wall(rec: dict) -> str:
    w = rec["wall_s"]
    if w.get("evaluation") is None:
        return f"{_minutes(w.get('study'))} study; evaluation not timed"
    return f"{_minutes(w.get('total'))} ({_minutes(w.get('study'))} study + {_minutes(w.get('evaluation'))} evaluation)"


def _best_published(rec: dict, metric: str) -> dict | None:
    """The study's best row (its own protocol) for ``metric``; else the first row reporting it."""
    rows = [p for p in rec["published"] if p["metric"] == metric]
    own = [p for p in rows if p["published_protocol"] == rec_published_key(rec)]
    best = [p for p in own if "best row" in str(_notes_for(p))]
    for group in (best, own, rows):
        if group:
            return group[0]
    return None


def rec_published_key(rec: dict) -> str:
    return ROWS[rec["row"]].published_study


def _notes_for(p: dict) -> str:
    return PUBLISHED_NOTES.get((p["published_model"], p["published_config"]), "")


PUBLISHED_NOTES: dict = {}


def _load_published_notes() -> None:
    import csv

    from analysis.published import PUBLISHED_CSV

    with open(PUBLISHED_CSV, newline="") as handle:
        for r in csv.DictReader(handle):
            PUBLISHED_NOTES[(r["model"], r["config"])] = r["notes"]


def _published_cell(p: dict | None) -> str:
    if p is None:
        return "not reported"
    cell = f"{p['published_value']:.4f} ({p['published_model']}, {p['published_split']})"
    if p["comparison"].startswith("different"):
        cell += " †diff. protocol"
    return cell


def _delta_cell(rec: dict, p: dict | None) -> str:
    if p is None or p.get("delta") is None:
        return "—" if p is None else "— (protocols differ)"
    mark = " ‡" if rec["row"] == "S1" else ""
    return f"{p['delta']:+.4f}{mark}"


def markdown(record: dict) -> str:
    _load_published_notes()
    lines = [
        "# The reference studies on 2 CPU cores (issue 17 item 3)",
        "",
        f"Generated by `benchmarks/paper_tables.py` from `benchmarks/results/paper_tables.json` "
        f"(written {record.get('written_at', 'n/a')}); regenerate with `python benchmarks/paper_tables.py --table-only`. "
        "Machine: 2 CPU cores, no GPU, ImageNet weights from pip (offline).",
        "",
        "Ours is the final model: among the candidates `analysis.evaluate` scored (single best trial, ensemble "
        "of the top k with k chosen on validation, each with and without test-time augmentation), the one with "
        "the best validation score, at the argmax; the split was read once, by that evaluation; 95% percentile bootstrap intervals "
        f"over {N_BOOT} resamples of the evaluated images. Published: the study's best row "
        "(`analysis/published.csv`). Δ = ours − published, only where the split protocol is the same.",
        "",
        "| row | protocol · data | evaluated on | metric | ours [95% CI] | published | Δ | wall time | CPU sizing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ROWS:
        rec = record["rows"].get(key)
        if rec is None:
            continue
        if rec["status"] != "measured":
            lines.append(f"| {key} | {rec.get('protocol', '')} · `{rec['study_file']}` | — | — | **pending**: "
                         f"{rec['reason']} | — | — | — | {ROWS[key].short} |")
            continue
        where = f"{rec['split_evaluated']}, n = {rec['n_eval']:,}" + (" (optimistic: selection split)"
                                                                       if rec["optimistic"] else "")
        first = True
        for metric in rec["metric_order"]:
            p = _best_published(rec, metric)
            lines.append("| " + " | ".join([
                f"**{key}**" if first else "",
                f"{rec['protocol']} · {_short_data(rec)}" if first else "",
                where if first else "",
                METRIC_LABELS.get(metric, metric),
                _ci(rec["metrics"].get(metric)),
                _published_cell(p),
                _delta_cell(rec, p),
                _wall(rec) if first else "",
                ROWS[key].short if first else "",
            ]) + " |")
            first = False
        for metric in rec.get("val_metrics_shown") or []:
            val = rec.get("validation") or {}
            lines.append(f"| | | val, n = {_count(val.get('n'))} (selection split) | {METRIC_LABELS.get(metric, metric)} "
                         f"| {_ci(val.get(metric))} | {_published_cell(_best_published(rec, metric))} | "
                         f"— (protocols differ) | | |" if _best_published(rec, metric) else
                         f"| | | val, n = {_count(val.get('n'))} (selection split) | {METRIC_LABELS.get(metric, metric)} "
                         f"| {_ci(val.get(metric))} | not reported | — | | |")
    lines += ["", "† a different split protocol: shown for scale, no delta. "
              "‡ S1: same split protocol, different image set (see the notes).", ""]

    targets = [(k, t) for k, rec in record["rows"].items() if rec["status"] == "measured" for t in rec["targets"]]
    pending = [k for k, rec in record["rows"].items() if rec["status"] != "measured"]
    if targets or pending:
        lines += ["## Targets", "", "| row | target | ours | met | by |", "|---|---|---|---|---|"]
        for key, t in targets:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {key} | {METRIC_LABELS.get(t['metric'], t['metric'])} ≥ {t['target']:.2f} on {t['split']} "
                         f"| {_fmt(t['value'])} | {met} | {_gap(t['gap'])} |")
        for key in pending:
            for metric, threshold, on in ROWS[key].targets:
                lines.append(f"| {key} | {METRIC_LABELS.get(metric, metric)} ≥ {threshold:.2f} on {on} | pending | — | — |")
        lines.append("")

    lines += ["## Rows: data, CPU-sizing choices, final model", ""]
    for key in ROWS:
        rec = record["rows"].get(key)
        if rec is None:
            continue
        lines.append(f"### {key}: `{rec['study_file']}`")
        lines.append("")
        lines.append(f"- Data: {ROWS[key].data_note}.")
        if rec["status"] != "measured":
            lines.append(f"- **Pending**: {rec['reason']}")
            for name, cmd in rec.get("commands", {}).items():
                lines.append(f"  - {name}: `{cmd}`")
            lines.append("")
            continue
        sizes = ", ".join(f"{s} {n:,}" for s, n in sorted(rec["split_sizes"].items()))
        lines.append(f"- Folder `{rec['run_dir']}`; split sizes: {sizes}.")
        lines.append("- Choices: " + "; ".join(ROWS[key].choices) + ".")
        status = ", ".join(f"{n} {s}" for s, n in rec["trial_status"].items())
        lines.append(f"- Ran {rec['trials_run']} trials ({status}), {rec['epochs_run']} epochs in all.")
        members = ", ".join(rec["final_members"])
        lines.append(f"- Final model: {rec['final_model']} (members: {members}), chosen on validation among "
                     "the candidates the evaluation scored: " + _candidates(rec) + ".")
        ev = rec.get("evaluate_final")
        if ev and ev["label"] != rec["final_model"]:
            lines.append(f"- analysis.evaluate's own final model ({ev['label']}; it always takes its last candidate), "
                         f"on {rec['split_evaluated']}, for the record: " + ", ".join(
                             f"{METRIC_LABELS.get(m, m)} {_ci(v)}" for m, v in ev["metrics"].items()) + ".")
        single = rec["single_best"]
        lines.append(f"- The single best trial alone ({single['label']}): " + ", ".join(
            f"{METRIC_LABELS.get(m, m)} {_ci(v)}" for m, v in single["metrics"].items()) + ".")
        op = rec.get("operating_point")
        if op and op.get("rule") == "target_sensitivity":
            lines.append(f"- Operating point for {op['class']} (threshold {op['threshold']:.4f}, sensitivity ≥ "
                         f"{op['target']} on validation): sensitivity {_ci(op['sensitivity'])}, specificity "
                         f"{_ci(op['specificity'])} on {rec['split_evaluated']}.")
        val = rec.get("validation")
        if val and not rec["optimistic"]:
            lines.append(f"- On validation (n = {val['n']:,}, the selection split: optimistic): accuracy "
                         f"{_ci(val.get('accuracy'))}, balanced accuracy {_ci(val.get('balanced_accuracy'))}.")
        reads = rec["test_split_reads"]
        if rec["split_evaluated"] == "test":
            lines.append(f"- Test split read {reads} time(s) in this folder (`test_evaluation.json`'s log); "
                         + ("evaluated by this script." if rec["evaluated_by_this_script"] else
                            "numbers read from the logged evaluation, not from the split."))
        lines.append(f"- Wall time: {_wall(rec)}; study: {rec['wall_s']['study_how']}; evaluation: "
                     f"{rec['wall_s']['evaluation_how']}.")
        for note in record.get("notes", {}).get(key, []):
            lines.append(f"- Note: {note}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _candidates(rec: dict) -> str:
    sel = rec.get("selection") or {}
    parts = []
    for label, c in (sel.get("candidates") or {}).items():
        score = next((v for k, v in c.items() if k.startswith("validation_") and k != "validation_loss"), None)
        parts.append(f"{label} {_fmt(score)}" + (" (chosen)" if c.get("chosen") else ""))
    text = "validation " + ("balanced accuracy " if parts else "") + "; ".join(parts)
    if sel.get("evaluate_final_model") and sel["evaluate_final_model"] != rec["final_model"]:
        text += f" (analysis.evaluate's own final model, {sel['evaluate_final_model']}, scores lower on validation)"
    return text


def _short_data(rec: dict) -> str:
    return {"S1": "melanoma10k train/ (9,605)", "S2": "HAM10000 binary subsample (1,200)",
            "S5": "HAM10000 7-class (10,015)", "S5-grouped": "HAM10000 7-class (10,015), by lesion"}.get(rec["row"], "")


def write_markdown(record: dict) -> None:
    MD_OUT.write_text(markdown(record))


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def parse_reuse(value: str) -> tuple[str, str]:
    key, sep, folder = value.partition("=")
    if not sep or key not in ROWS or not folder:
        raise argparse.ArgumentTypeError(f"--reuse takes ROW=FOLDER with ROW one of {', '.join(ROWS)}, got {value!r}")
    return key, folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--storage", default=str(ROOT / "runs"), help="where each row's results folder is written "
                        "(STORAGE/<study name>); a completed folder there is reused, not run again")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"),
                        help="the folder holding melanoma10k/ and ham10000/")
    parser.add_argument("--reuse", type=parse_reuse, action="append", default=[], metavar="ROW=FOLDER",
                        help="take ROW from this finished results folder (no run); repeatable")
    parser.add_argument("--read-only", action="store_true", help="run no study and read no split: only collect "
                        "logged evaluations; other rows are recorded as pending")
    parser.add_argument("--table-only", action="store_true", help="regenerate the Markdown from the JSON")
    parser.add_argument("--note", action="append", default=[], metavar="ROW=TEXT",
                        help="a note kept with ROW in the JSON and shown under it (replaces its notes; nothing else is "
                        "done); repeatable")
    args = parser.parse_args(argv)

    record = load_json()
    notes = {}
    for item in args.note:
        key, sep, text = item.partition("=")
        if not sep or key not in ROWS:
            parser.error(f"--note takes ROW=TEXT with ROW one of {', '.join(ROWS)}, got {item!r}")
        notes.setdefault(key, []).append(text)
    if notes:
        for key, texts in notes.items():
            record["rows"].setdefault(key, {"row": key, "status": "pending", "reason": "not run yet",
                                            "study_file": ROWS[key].study_file, "protocol": ROWS[key].published_study})
            record["notes"] = {**record.get("notes", {}), key: texts}
        write_json(record)
        write_markdown(record)  # notes only: nothing is run or read
        print(f"notes written for {', '.join(notes)}: {JSON_OUT}, {MD_OUT}")
        return 0
    if args.table_only:
        write_markdown(record)
        print(MD_OUT.read_text())
        return 0
    for key in args.rows:
        row = ROWS[key]
        try:
            measured = measure_row(row, args)
        except RowPending as exc:
            reason, cmds = exc.args
            print(f"[{_now()}] {key}: pending: {reason}", flush=True)
            measured = {"row": key, "status": "pending", "reason": reason, "study_file": row.study_file,
                        "protocol": ROWS[key].published_study if key != "S5-grouped" else "grouped",
                        "commands": cmds, "recorded_at": _now()}
        except Exception as exc:  # a failed study or evaluation: record it and go on to the next row
            import traceback

            traceback.print_exc()
            reason = f"failed: {type(exc).__name__}: {exc}"
            print(f"[{_now()}] {key}: {reason}", flush=True)
            measured = {"row": key, "status": "pending", "reason": reason, "study_file": row.study_file,
                        "protocol": ROWS[key].published_study if key != "S5-grouped" else "grouped",
                        "commands": {"run": run_command(row, args.data_root, str(args.storage))},
                        "recorded_at": _now()}
        # Read the JSON again: another run of this script may have written other rows meanwhile.
        record = load_json()
        old = record["rows"].get(key)
        if (measured["status"] == "measured" and old and old.get("status") == "measured"
                and old.get("run_dir") == measured["run_dir"] and measured["wall_s"].get("evaluation") is None
                and (old.get("wall_s") or {}).get("evaluation") is not None):
            measured["wall_s"] = old["wall_s"]  # the same folder, collected again: keep the times measured then
            measured["evaluated_by_this_script"] = old.get("evaluated_by_this_script", False)
        if measured["status"] != "measured" and old and old.get("status") == "measured":
            print(f"  keeping its earlier measured record ({old['measured_at']})", flush=True)
        else:
            record["rows"][key] = measured
        write_json(record)
        write_markdown(record)
        print(f"[{_now()}] {key}: written {JSON_OUT} and {MD_OUT}", flush=True)
    print(MD_OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
