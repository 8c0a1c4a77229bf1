"""Does cross-validated selection pick better models on small data? One validation split vs 5-fold CV.

    python benchmarks/cv_selection.py --data-dir ../shared/datasets/ham10000

A chest-X-ray-sized problem: 600 HAM10000 images (binary: malignant = mel, bcc, akiec; one image per lesion,
300 per class, drawn with the seed), stratified 60/15/25 train/val/test at 64 px. For each seed, two studies
through the real API (``search.run_study``: Optuna TPE + ASHA on Ray, frozen ImageNet efficientnet_lite0 on
cached features, the same space, trials, epochs and seed):

  (a) ``single``: trials selected on the one validation split (90 images);
  (b) ``cv5``: ``Study(cv_folds=5)``: each trial trains 5 fold models on train ∪ val (450 images) and
      reports their mean; the chosen trial's model is its 5-model fold ensemble.

The chosen trial of each (``analysis.evaluate``, best by the study's metric) is scored once on the same
held-out test split (150 images): balanced accuracy of its argmax. Writes ``--out`` (JSON) and prints a
table with each arm's test score per seed, the mean, and wall time (whole study, and the trials' own time)
so CV's cost ratio can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SIZE = 64
PER_CLASS = 300
LOADER = "ham10000_600"


def space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "head_units": trial.suggest_categorical("head_units", [0, 64, 256]),
        "class_weight": trial.suggest_categorical("class_weight", [False, True]),
    }


def register_subsample_loader(per_class: int) -> None:
    """``ham10000_600``: HAM10000 binary, one image per lesion, ``per_class`` per class drawn with ``seed``."""
    from trainables.datasets import load_table
    from trainables.datasets._registry import register_loader

    @register_loader(LOADER, layout="the HAM10000 layout")
    def load(path, *, seed: int = 0):
        table = load_table("ham10000", path, target="binary")
        table = table.drop_duplicates("group", keep="first") if table["group"].notna().any() else table
        parts = [rows.sample(n=per_class, random_state=seed) for _, rows in table.groupby("label", sort=True)]
        import pandas as pd

        return pd.concat(parts).sort_index().reset_index(drop=True)


def make_study(seed: int, data_dir: str, *, cv_folds, num_samples: int, max_epochs: int):
    from search import Dataset, Study

    return Study(
        name=f"cvsel_{'cv' if cv_folds else 'single'}_s{seed}",
        dataset=Dataset(loader=LOADER, path=data_dir, image_size=IMAGE_SIZE, positive_class="malignant",
                        split="stratified", split_options={"val": 0.15, "test": 0.25}, seed=seed,
                        options={"seed": seed}, near_duplicates=False),
        space=space,
        fixed={"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
               "batch_size": 32},
        num_samples=num_samples, max_epochs=max_epochs, grace_period=2, reduction_factor=2,
        max_concurrent=2, cpus_per_trial=1, seed=seed, cv_folds=cv_folds,
    )


def run_arm(seed: int, args, cv_folds) -> dict:
    from analysis.evaluate import evaluate_top_k
    from search import run_study

    study = make_study(seed, args.data_dir, cv_folds=cv_folds, num_samples=args.trials, max_epochs=args.epochs)
    started = time.monotonic()
    results = run_study(study, storage=args.storage)
    wall = time.monotonic() - started
    table = evaluate_top_k(results.path, k=1, n_boot=200, seed=seed, log=lambda *_: None)
    best = table.iloc[0]
    board = results.leaderboard
    return {
        "arm": "cv5" if cv_folds else "single", "seed": seed, "chosen": str(best["trial_name"]),
        "val_score": float(best[f"best_{study.metric}"]),
        "test_balanced_accuracy": float(best["balanced_accuracy"]), "test_auc": float(best["auc"]),
        "n_test": int(best["n"]), "study_wall_s": round(wall, 1),
        "trials_wall_s": round(float(board["wall_time_s"].sum()), 1), "trials": int(len(board)),
        "epochs_run": int(board["epochs"].sum()), "folder": str(results.path),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ham10000"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--storage", default="/tmp/medsearch-cv-selection")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cv_selection.json"))
    args = parser.parse_args(argv)
    register_subsample_loader(PER_CLASS)
    rows = []
    for seed in args.seeds:
        for cv_folds in (None, 5):
            rows.append(run_arm(seed, args, cv_folds))
            print(json.dumps(rows[-1]), flush=True)
            write(rows, args)
    print(format_table(rows))
    return 0


def summary(rows: list[dict]) -> dict:
    import numpy as np

    out = {}
    for arm in ("single", "cv5"):
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            out[arm] = {"test_balanced_accuracy_mean": float(np.mean([r["test_balanced_accuracy"] for r in mine])),
                        "study_wall_s_mean": float(np.mean([r["study_wall_s"] for r in mine])),
                        "trials_wall_s_mean": float(np.mean([r["trials_wall_s"] for r in mine]))}
    if len(out) == 2:
        out["cv_cost_ratio_study_wall"] = out["cv5"]["study_wall_s_mean"] / out["single"]["study_wall_s_mean"]
        out["cv_cost_ratio_trials_wall"] = out["cv5"]["trials_wall_s_mean"] / out["single"]["trials_wall_s_mean"]
    return out


def write(rows: list[dict], args) -> None:
    record = {"setup": {"data": f"HAM10000 binary, {2 * PER_CLASS} images (one per lesion, balanced), "
                                 f"stratified 60/15/25 at {IMAGE_SIZE} px", "backbone": "efficientnet_lite0 frozen, cached",
                        "space": "learning_rate, dropout, head_units, class_weight", "trials": args.trials,
                        "max_epochs": args.epochs, "seeds": args.seeds, "cpus": os.cpu_count()},
              "runs": rows, "summary": summary(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'seed':>4}  {'arm':<6}  {'val/CV score':>12}  {'test bal.acc':>12}  {'study s':>8}  {'trials s':>8}  chosen"]
    for r in rows:
        lines.append(f"{r['seed']:>4}  {r['arm']:<6}  {r['val_score']:>12.4f}  {r['test_balanced_accuracy']:>12.4f}  "
                     f"{r['study_wall_s']:>8.0f}  {r['trials_wall_s']:>8.0f}  {r['chosen']}")
    s = summary(rows)
    for arm in ("single", "cv5"):
        if arm in s:
            lines.append(f"mean  {arm:<6}  {'':>12}  {s[arm]['test_balanced_accuracy_mean']:>12.4f}  "
                         f"{s[arm]['study_wall_s_mean']:>8.0f}  {s[arm]['trials_wall_s_mean']:>8.0f}")
    if "cv_cost_ratio_study_wall" in s:
        lines.append(f"CV cost: x{s['cv_cost_ratio_study_wall']:.2f} study wall time, "
                     f"x{s['cv_cost_ratio_trials_wall']:.2f} trials' own time")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
