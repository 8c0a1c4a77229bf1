"""How often the out-of-distribution warning fires, on images like a study's and on images of another source.

    python benchmarks/ood_rates.py --run /work/ood/ham10000_grouped_cpu --data-dir ../shared/datasets/ham10000 \\
        --foreign melanoma10k=../shared/datasets/melanoma10k/train

For the results folder ``--run`` (any study with train, validation and, ideally,
test images in ``splits.parquet``), through the code's own seams
(``analysis.ood.reference_for`` and ``check``, as ``search.predict`` calls them):

- **held out**: the study's test images. The reference never saw them (it is fitted on
  train, and calibrated at the 99th percentile of the validation images' distances), so
  about 1% of images like the validation images should be flagged; a grouped split keeps
  each lesion's images on one side, so nothing but the source is shared with training;
- **calibration**: the validation images themselves, flagged at the percentile by construction
  (shown so that the held-out rate has its reference);
- **foreign**: ``--n`` images drawn (seeded) from each ``--foreign NAME=FOLDER``, e.g.
  melanoma10k photographs against a HAM10000 study.

Each rate comes with its Wilson 95% interval and the reasons (native size, features).
Written: ``benchmarks/results/ood_rates.json`` (one record per ``--run``, merged by the
study's name). It only reads the study folder, except the reference that ``reference_for``
caches there (``ood_reference.parquet``), as predict would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "ood_rates.json"
N_FOREIGN = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a results folder with train/val(/test) images in splits.parquet")
    p.add_argument("--data-dir", default=None, help="the study's dataset folder, if not where the run found it")
    p.add_argument("--foreign", action="append", default=[], metavar="NAME=FOLDER",
                   help="a folder of images of another source (searched recursively); repeatable")
    p.add_argument("--n", type=int, default=N_FOREIGN, help=f"images drawn from each foreign folder ({N_FOREIGN})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    for item in args.foreign:
        name, _, folder = item.partition("=")
        if not name or not folder or not Path(folder).is_dir():
            p.error(f"--foreign: bad value {item!r}; use NAME=FOLDER with an existing folder of images")
    if args.n < 1:
        p.error(f"--n: bad value {args.n}; use a positive number of images")
    return args


def rate(checks) -> dict:
    """The share flagged, its Wilson interval, and how many for each reason."""
    from analysis.bootstrap import wilson_interval

    flagged = checks["ood"].astype(bool)
    warnings = checks["warning"].astype(str)
    low, high = wilson_interval(int(flagged.sum()), len(checks))
    return {"n": int(len(checks)), "flagged": int(flagged.sum()), "rate": float(flagged.mean()),
            "ci": [float(low), float(high)],
            "by_features": int((flagged & warnings.str.contains("feature distance")).sum()),
            "by_size": int((flagged & warnings.str.contains("size |aspect ratio", regex=True)).sum()),
            "median_distance": float(checks["feature_distance"].median())}


def foreign_sample(folder: str, n: int, seed: int) -> list[str]:
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(random.Random(seed).sample(files, min(n, len(files))))


def measure(args) -> dict:
    from analysis.errors import EvaluateError
    from analysis.ood import check, reference_for
    from analysis.reader import read_record
    from analysis.splits import read_split

    run = Path(args.run).expanduser().resolve()
    started = time.monotonic()
    reference = reference_for(run, args.data_dir, log=lambda line: print(line, flush=True))
    record = {"study": (read_record(run).get("study") or {}).get("name", run.name),
              "reference": {k: reference.meta[k] for k in ("images", "threshold", "percentile", "k", "embedding",
                                                          "embedding_size", "validation_distance")},
              "sets": {}}
    for split, label in (("test", "held out (the study's test images)"),
                         ("val", "calibration (the validation images: at the percentile by construction)")):
        try:
            rows = read_split(run, split, args.data_dir)
        except EvaluateError as exc:
            print(f"{split}: not measured ({exc})", flush=True)
            continue
        record["sets"][split] = {"what": label, **rate(check(reference, rows["path"].astype(str).tolist()))}
        print(f"{split}: {record['sets'][split]}", flush=True)
    for item in args.foreign:
        name, _, folder = item.partition("=")
        paths = foreign_sample(folder, args.n, args.seed)
        record["sets"][name] = {"what": f"foreign: {len(paths)} images drawn from {Path(folder).name}/ "
                                        f"(seed {args.seed})", **rate(check(reference, paths))}
        print(f"{name}: {record['sets'][name]}", flush=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    record = measure(args)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved[record["study"]] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
