"""The activation cache's speed-up: the same frozen-backbone trials with the cache on and off, side by side.

    python benchmarks/cache_speedup.py                  # melanoma10k subset, 5 configurations x 5 epochs
    python benchmarks/cache_speedup.py --data embedded  # the generated dataset instead
    python benchmarks/cache_speedup.py --cached-only --data ham10000 --image-size 128 --epochs 10
        # a frozen search's cost: cached head-only trials on 8,012 HAM10000 feature vectors against the one
        # backbone pass that built the cache (issue 18's "physical limit" target); writes head_only.json

Each trial is ``efficientnet_lite0`` with its ImageNet weights (shipped with
pip), ``unfreeze=0``, ``augment="none"``, batch 32, on one CPU thread as a Ray
trial gets; learning rate, dropout and head units are sampled from the search
benchmark's space. One fresh process runs them all through
``trainables.train.fit_classifier`` (``benchmarks._contenders.run_cache_speedup``):
first a cached warm-up trial builds the cache entry and the process's shared
backbone (the worker's first trial; its extra set-up is ``cache_build_s``), then
every configuration runs uncached and cached, in alternating order. A trial's
time is the wall time of ``fit_classifier``: TF set-up, model build, weights,
cache look-up, every epoch with its validation, and checkpoint saves.

Data: the search benchmark's class-balanced melanoma10k subset (default 300 +
100 images per class: 600 train, 200 validation) at 64 px.

Writes ``--out`` (default ``benchmarks/results/cache_speedup.json``): the
per-trial and per-epoch speed-ups (medians over configurations of uncached /
cached), the time split of both, the validation balanced accuracy of both
(best and last epoch) with their largest difference, and every trial.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRIAL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 0, "augment": "none",
         "batch_size": 32, "tf_threads": 1}  # what _contenders.run_cache_speedup trains


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python benchmarks/cache_speedup.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["melanoma10k", "embedded", "ham10000"], default="melanoma10k",
                        help="ham10000: all 10,015 images, 7 classes, 8,012 train / 2,003 val (search_bench's realistic data)")
    parser.add_argument("--data-dir", default=None, help="default: ../shared/datasets/<data>")
    parser.add_argument("--cached-only", action="store_true",
                        help="a frozen search's cost: only cached trials, against the one backbone pass that built "
                        "the cache (no uncached arm); writes head_only.json by default")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial (default 5)")
    parser.add_argument("--configs", type=int, default=5, help="configurations, each run cached and uncached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_speedup.json"))
    args = parser.parse_args(argv)
    # What search_bench.run_contender reads. The measurement has no budget (the Study its data comes
    # through wants a positive one) and keeps no caches.
    args.budget_s, args.max_epochs, args.grace_s, args.keep_work = 3600.0, args.epochs, 0.0, False
    if args.data_dir is None:
        args.data_dir = str(ROOT.parent / "shared/datasets" / args.data)
    if args.cached_only and args.out == str(ROOT / "benchmarks/results/cache_speedup.json"):
        args.out = str(ROOT / "benchmarks/results/head_only.json")
    return args


def summarise(trials: list[dict]) -> dict:
    """Medians over configurations; the warm-up trial (config 999) only gives the one-off build."""
    pairs = {}
    for t in trials:
        if t["config"] != 999:
            pairs.setdefault(t["config"], {})[t["cache"]] = t
    pairs = [p for p in pairs.values() if len(p) == 2]
    cached, uncached = [p[True] for p in pairs], [p[False] for p in pairs]

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    warm = next(t for t in trials if t["config"] == 999)
    return {
        "speedup_trial": statistics.median(p[False]["trial_s"] / p[True]["trial_s"] for p in pairs),
        "speedup_epoch": statistics.median(p[False]["epoch_s"] / p[True]["epoch_s"] for p in pairs),
        **{f"{key}_{name}": median(rows, key) for key in ("trial_s", "epoch_s", "setup_s", "checkpoint_s")
           for name, rows in (("cached", cached), ("uncached", uncached))},
        "cache_build_s": warm["setup_s"] - median(cached, "setup_s"),
        "val_balanced_accuracy": {
            "best_cached": median(cached, "best"), "best_uncached": median(uncached, "best"),
            "last_cached": median(cached, "last"), "last_uncached": median(uncached, "last"),
            "max_abs_diff_best": max(abs(p[True]["best"] - p[False]["best"]) for p in pairs),
            "max_abs_diff_last": max(abs(p[True]["last"] - p[False]["last"]) for p in pairs),
        },
        "configs": len(pairs),
    }


FROZEN_SEARCH = 50  # configurations in the frozen search the issue prices against one backbone pass


def frozen_search(trials: list[dict], epochs: int) -> dict:
    """What a frozen search costs: the median cached head-only trial, the one-off backbone pass over train and
    val that built the cache (the warm-up trial's extra set-up), and FROZEN_SEARCH trials over that pass."""
    cached = [t for t in trials if t["config"] != 999 and t["cache"]]
    warm = next(t for t in trials if t["config"] == 999)
    trial_s = statistics.median(t["trial_s"] for t in cached)
    build_s = warm["setup_s"] - statistics.median(t["setup_s"] for t in cached)
    return {"trial_s_cached": trial_s, "epoch_s_cached": statistics.median(t["epoch_s"] for t in cached),
            "setup_s_cached": statistics.median(t["setup_s"] for t in cached),
            "checkpoint_s_cached": statistics.median(t["checkpoint_s"] for t in cached),
            "cache_build_s": build_s, "epochs": epochs, "configs": len(cached),
            f"search_{FROZEN_SEARCH}_s": FROZEN_SEARCH * trial_s,
            f"search_{FROZEN_SEARCH}_over_pass": FROZEN_SEARCH * trial_s / build_s,
            "val_balanced_accuracy_best": statistics.median(t["best"] for t in cached)}


def main(argv=None) -> int:
    from benchmarks.search_bench import prepare_dataset, read_events, run_contender

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cache-speedup-") as work:
        dataset = prepare_dataset(args, Path(work))
        spec = run_contender("cache_speedup", args.seed, args, dataset, Path(work), configs=args.configs,
                             epochs=args.epochs, cached_only=args.cached_only)
        events = read_events(spec["events"])
        if spec["exit_code"] != 0:
            print((Path(spec["workdir"]) / "log.txt").read_text()[-3000:], file=sys.stderr)
            return 1
    trials = [{k: v for k, v in e.items() if k not in ("kind", "t")} for e in events if e["kind"] == "speedup_trial"]
    result = {
        **(frozen_search(trials, args.epochs) if args.cached_only else summarise(trials)),
        "trial": {**TRIAL, "epochs": args.epochs},
        "data": {"name": args.data, "image_size": args.image_size,
                 **({"train": 8012, "val": 2003} if args.data == "ham10000" else
                    {"train": 2 * args.train_per_class, "val": 2 * args.val_per_class})},
        "seed": args.seed, "process_s": spec["process_s"],
        "per_trial": trials,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_trial"}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
