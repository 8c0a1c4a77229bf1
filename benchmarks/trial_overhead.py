"""Where a trial's time goes, and how much of it is not training.

    python benchmarks/trial_overhead.py

Runs a small study through ``search.run`` (the quickstart's data and its
pretrained ``efficientnet_lite0``, frozen, so trials are short and overhead
shows) and splits each trial's time, as the driver saw it from start to end,
into: epochs (``train_s``), checkpoint saves, set-up inside the trial (TF
set-up, model build, weights, activation cache: ``setup_s``) and the rest
(Ray: scheduling, starting or reusing the worker, reporting). The first trial
of each worker pays process start and the TensorFlow import; later ones reuse
the worker. Writes per-trial rows and a summary to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_MINUTE_TRIAL_S = 60.0  # the yardstick: overhead under 5% of a one-minute trial

STUDY = '''
from search import Dataset, Study


def space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.5)}


STUDY = Study(
    name="overhead",
    dataset=Dataset(loader="embedded", image_size=64, positive_class="malignant"),
    space=space,
    fixed={"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
           "batch_size": 32},
    num_samples=TRIALS, max_epochs=EPOCHS, grace_period=EPOCHS, max_concurrent=2,
)
'''


def main(argv=None) -> int:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/trial_overhead.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "overhead.py"
        study.write_text(STUDY.replace("TRIALS", str(args.trials)).replace("EPOCHS", str(args.epochs)))
        subprocess.run([sys.executable, "-m", "search.run", str(study), "--storage", tmp], cwd=ROOT, check=True)
        board = pd.read_parquet(Path(tmp) / "overhead" / "leaderboard.parquet")
    board = board.sort_values("trial_number")
    driver_s = (pd.to_datetime(board["ended_at"]) - pd.to_datetime(board["started_at"])).dt.total_seconds()
    rows = pd.DataFrame({
        "trial": board["trial_name"], "driver_s": driver_s, "train_s": board["train_s"],
        "checkpoint_s": board["checkpoint_s"], "setup_s": board["setup_s"],
        "ray_s": driver_s - board["wall_time_s"],
    }).round(3)
    rows["overhead_s"] = (rows["driver_s"] - rows["train_s"]).round(3)
    later = rows.iloc[2:]  # the first two trials start the two workers; the rest reuse them
    summary = {
        "trials": len(rows), "epochs_per_trial": args.epochs,
        "median_train_s": float(rows["train_s"].median()),
        "median_overhead_s_first_per_worker": float(rows["overhead_s"].iloc[:2].median()),
        "median_overhead_s_reused_worker": float(later["overhead_s"].median()),
        "median_setup_s_reused_worker": float(later["setup_s"].median()),
        "median_checkpoint_s_reused_worker": float(later["checkpoint_s"].median()),
        "median_ray_s_reused_worker": float(later["ray_s"].median()),
        "overhead_share_of_one_minute_trial": round(float(later["overhead_s"].median()) / ONE_MINUTE_TRIAL_S, 4),
        "per_trial": rows.to_dict("records"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(rows.to_string(index=False))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_trial"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
