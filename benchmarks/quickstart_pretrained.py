"""The quickstart search with and without ImageNet weights, side by side.

    python benchmarks/quickstart_pretrained.py

Runs ``spaces/quickstart.py`` as it is, then the same study (same space,
budget, seed and data) with every trial's ``weights=None`` and the whole
backbone trained, which is the fair from-scratch baseline. Reports the best
validation balanced accuracy per backbone for both runs, and writes them to
``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "spaces" / "quickstart.py"

SCRATCH_STUDY = '''
import dataclasses
from search.study import load_study

_BASE = load_study({quickstart!r})


def space(trial):
    return {{**_BASE.space(trial), "weights": None, "unfreeze": "all"}}


STUDY = dataclasses.replace(_BASE, name="quickstart_scratch", space=space)
'''


def run(study_file: Path, storage: Path) -> Path:
    subprocess.run([sys.executable, "-m", "search.run", str(study_file), "--storage", str(storage)],
                   cwd=ROOT, check=True)
    return storage


def best_by_backbone(folder: Path, metric: str = "val_balanced_accuracy") -> dict[str, float]:
    import pandas as pd

    board = pd.read_parquet(folder / "leaderboard.parquet")
    return {str(k): round(float(v), 4) for k, v in board.groupby("backbone")[f"best_{metric}"].max().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quickstart_pretrained.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scratch_file = tmp / "quickstart_scratch.py"
        scratch_file.write_text(SCRATCH_STUDY.format(quickstart=str(QUICKSTART)))
        pretrained = best_by_backbone(run(QUICKSTART, tmp / "runs") / "quickstart")
        scratch = best_by_backbone(run(scratch_file, tmp / "runs") / "quickstart_scratch")
    summary = {"metric": "best val_balanced_accuracy per backbone", "pretrained": pretrained, "weights_none": scratch,
               "lite0_gain": round(pretrained["efficientnet_lite0"] - scratch["efficientnet_lite0"], 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
