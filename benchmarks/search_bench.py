"""Side-by-side search benchmark: the same data, space and wall-clock budget for five searchers.

    python benchmarks/search_bench.py                  # full: 3 seeds x 5 contenders, ~40 min on 2 CPU cores
    python benchmarks/search_bench.py --quick          # CI-sized: 1 seed, a small budget, a few minutes
    python benchmarks/search_bench.py --data embedded  # the generated dataset instead of melanoma10k

Contenders (implemented in ``benchmarks/_contenders.py``), each run alone in a
fresh process, one after another, on the same machine:

- ``ours``: ``python -m search.run`` (Optuna TPE + ASHA on Ray Tune), activation cache on;
- ``ours_nocache``: the same with ``--no-activation-cache``;
- ``random_fifo``: Ray Tune with random search (``OptunaSearch`` + ``RandomSampler``, since the
  space is conditional) and ``FIFOScheduler`` (no early stopping), the same trainable, no cache;
- ``keras_tuner_hyperband``: keras-tuner's ``Hyperband``; its ``HyperModel.build`` calls our ``build_model``;
- ``optuna_hyperband``: standalone Optuna (TPE) with ``HyperbandPruner`` and optuna-integration's
  ``KerasPruningCallback``.

Data: a class-balanced subset of ``melanoma10k`` (default 300 + 100 images per
class, 600 train / 200 validation) at 64 px, written once as PNGs (lossless) and
read by every contender through ``search.prepare.prepare_data``, so all get the
same arrays. Space: backbone in {efficientnet_lite0 (ImageNet), cnn_s3 (from
scratch)}; learning rate log-uniform [3e-4, 1e-2]; dropout [0, 0.5]; for lite0
unfreeze in {0, 20} and head_units in {0, 128}; augment "none".

Budget: ``--budget-s`` seconds of wall time per contender and seed, counted from
the start of the contender's process (so Python, TensorFlow and Ray start-up
count). A contender launches no trial after it; results reported after it are
not counted. Resources: the Ray contenders run 2 trials at once with 1 CPU (1 TF
thread) each; keras-tuner and Optuna run one trial at a time in-process with 2 TF
threads. All use ``max_epochs`` (6) epochs at most per configuration.

Per contender and seed: ``best_val_balanced_acc`` within the budget;
``time_to_target_s``, the time its best-so-far first reached the target, the
median over seeds of ``random_fifo``'s final best (null if never);
``trials_per_hour`` (a trial is one ASHA/FIFO trial, one Optuna trial pruned or
not, or one keras-tuner Hyperband trial, i.e. one round of a configuration);
``epochs_per_hour``. Plus one ``cache_speedup`` row per seed: the median over a few
frozen-lite0 configurations of (trial time uncached) / (trial time cached, cache
already built), measured directly with ``trainables.train.fit_classifier``
(``speedup``; per epoch in ``speedup_epoch``; the one-off build in ``cache_build_s``).

Writes ``--out`` (default ``benchmarks/results/search_bench/``; ``--quick``:
``benchmarks/results/search_bench_quick/``): ``bench.parquet``, ``bench.md``,
``best_so_far.png``, ``best_so_far.parquet`` (every run's best-so-far steps),
``utilisation.parquet`` (each run's busy share of its slots per minute), ``run.json``
(the wall time and setting, which ``--merge`` and ``--report-only`` check) and
``work/<contender>_s<seed>/`` (each run's spec, events and log; with
``--keep-work`` also its Ray results, checkpoints and caches). The melanoma10k
subset's PNGs are written once under ``$MEDSEARCH_CACHE/search_bench/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONTENDERS = ("ours", "ours_nocache", "random_fifo", "keras_tuner_hyperband", "optuna_hyperband")
REFERENCE = "random_fifo"  # its median final best across seeds is the target
BASELINE = "ours"  # ratios are against it

FULL = {"budget_s": 120.0, "seeds": [0, 1, 2], "train_per_class": 300, "val_per_class": 100,
        "speedup_configs": 3, "speedup_epochs": 3, "data": "melanoma10k", "image_size": 64, "max_epochs": 6,
        "space": "small", "contenders": list(CONTENDERS)}
QUICK = {**FULL, "budget_s": 45.0, "seeds": [0], "train_per_class": 100, "val_per_class": 50,
         "speedup_configs": 2, "speedup_epochs": 2}
# --setting realistic (issue 18): all of HAM10000, 7 classes, 8,012 train / 2,003 val (stratified 80/20), 96 px,
# the realistic space (cheap cached and expensive fine-tuned configurations mixed), 10 minutes per contender and
# seed. The contenders without a cache of their own whose trials are the same as another's are left out for the
# budget: ours_nocache (random_fifo's trials, under ours' search) and optuna_hyperband (keras-tuner's in-process
# Hyperband, with TPE).
REALISTIC = {**FULL, "budget_s": 600.0, "seeds": [0, 1, 2], "data": "ham10000", "image_size": 96, "max_epochs": 8,
             "space": "realistic", "speedup_configs": 0,
             "contenders": ["ours", "random_fifo", "keras_tuner_hyperband"]}
SETTINGS = {"small": FULL, "quick": QUICK, "realistic": REALISTIC}
SLOTS = {"ours": 2, "ours_nocache": 2, "random_fifo": 2, "keras_tuner_hyperband": 1, "optuna_hyperband": 1}
COLUMNS = ["contender", "seed", "budget_s", "best_val_balanced_acc", "time_to_target_s", "target",
           "trials_completed", "trials_errored", "trials_per_hour", "epochs_completed", "epochs_per_hour",
           "time_to_first_result_s", "slots", "slot_utilisation", "head_only_trial_s", "head_only_trials",
           "process_s", "exit_code", "speedup", "speedup_epoch", "cache_build_s",
           "trial_s_cached", "trial_s_uncached", "epoch_s_cached", "epoch_s_uncached", "note"]
INT_COLUMNS = ("seed", "trials_completed", "trials_errored", "epochs_completed", "exit_code")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python benchmarks/search_bench.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder (default benchmarks/results/search_bench/, "
                                      "with --quick benchmarks/results/search_bench_quick/)")
    parser.add_argument("--quick", action="store_true", help="1 seed, a small budget and data set (a few minutes)")
    parser.add_argument("--setting", choices=["small", "realistic"], default=None,
                        help="small (default): a melanoma10k subset at 64 px, 3 seeds x 2 min; realistic: all of "
                        "HAM10000 (7 classes) at 96 px, a space mixing cheap and expensive configurations, "
                        "3 seeds x 10 min x 3 contenders (~95 min)")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock seconds per contender and seed "
                                                        f"(default {FULL['budget_s']:g}; --quick {QUICK['budget_s']:g})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick 0)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS)
    parser.add_argument("--data", choices=["melanoma10k", "embedded", "ham10000"])
    parser.add_argument("--data-dir", help="the dataset's folder (default: ../shared/datasets/<data>)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--val-per-class", type=int)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--speedup-configs", type=int, help="frozen-lite0 configurations timed with the cache on "
                                                            "and off, per seed (0: skip)")
    parser.add_argument("--speedup-epochs", type=int)
    parser.add_argument("--grace-s", type=float, default=300.0,
                        help="a contender still running this long after its budget is killed")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild bench.md and best_so_far.png from OUT's bench.parquet and best_so_far.parquet "
                        "(after a change to the report); runs nothing. Pass the setting the run used")
    parser.add_argument("--merge", action="store_true",
                        help="add this invocation's runs (e.g. --seeds 2) to the runs saved in OUT by an earlier one "
                        "with the same setting and code; a saved contender and seed run again is replaced; the "
                        "target and every ratio are recomputed over all, the wall times added")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep each run's Ray results, checkpoints and caches under OUT/work/ "
                             "(default: only its spec, events and log)")
    args = parser.parse_args(argv)
    if args.quick and args.setting == "realistic":
        parser.error("--quick is the small setting's CI size; leave out --setting, or --quick")
    args.setting = "quick" if args.quick else args.setting or "small"
    if args.out is None:
        args.out = str(ROOT / "benchmarks/results" / {"quick": "search_bench_quick", "small": "search_bench",
                                                       "realistic": "search_bench_ham"}[args.setting])
    preset = SETTINGS[args.setting]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.data_dir is None:
        args.data_dir = str(ROOT.parent / "shared/datasets" / args.data)
    return args


# --- Data ------------------------------------------------------------------------------------------------------------


def prepare_dataset(args, work: Path) -> dict:
    """The ``search.Dataset`` fields every contender loads: the same images, the same split.

    The leakage audit is off (``near_duplicates=False``): every contender loads its data through
    ``prepare_data`` with a cold cache, so each would pay the audit's forward pass inside its budget,
    and it measures the data, not the search."""
    n = args.train_per_class + args.val_per_class
    split = {"split": "stratified", "split_options": {"val": args.val_per_class / n, "test": 0.0}, "seed": 0,
             "near_duplicates": False}
    if args.data == "embedded":
        from trainables.datasets import load_table

        options = {"n_per_class": n, "image_size": args.image_size}
        load_table("embedded", None, **options)  # generated here once, so the contenders only read it
        return {"loader": "embedded", "image_size": args.image_size, "positive_class": "malignant",
                "options": options, **split}
    cache = Path(os.environ.get("MEDSEARCH_CACHE") or Path.home() / ".cache" / "medsearch")
    if args.data == "ham10000":
        folder = materialise_ham10000(Path(args.data_dir), cache / "search_bench", args)
        return {"loader": "folder", "path": str(folder), "image_size": args.image_size, "split": "stratified",
                "split_options": {"val": 0.2, "test": 0.0}, "seed": 0, "near_duplicates": False}
    folder = materialise_melanoma(Path(args.data_dir), cache / "search_bench", args)
    return {"loader": "folder", "path": str(folder), "image_size": args.image_size, "positive_class": "malignant",
            **split}


def materialise_ham10000(data_dir: Path, parent: Path, args) -> Path:
    """All of HAM10000 as PNGs at the study's size, one folder per diagnosis (7 classes).

    Decoded once with the training decoder (``trainables.data.decode_image``) and
    saved lossless, so every contender's ``prepare_data`` reads the same pixels in
    seconds instead of decoding 10,015 JPEGs inside its budget. The folder loader
    has no lesion ids, so the benchmark's split is by image (stratified 80/20, as S5).
    """
    from PIL import Image

    from trainables.data import decode_image
    from trainables.datasets import load_table

    table = load_table("ham10000", str(data_dir), target="dx")
    manifest = {"source": str(data_dir.resolve()), "image_size": args.image_size, "images": len(table)}
    folder = parent / f"ham10000_dx_{args.image_size}px"
    record = folder / "manifest.json"
    if record.exists() and json.loads(record.read_text()) == manifest:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for path, label in zip(table["path"], table["label"]):
        target = folder / str(label) / (Path(path).stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(decode_image(path, args.image_size)).save(target)
    record.write_text(json.dumps(manifest))
    return folder


def materialise_melanoma(data_dir: Path, parent: Path, args) -> Path:
    """A balanced melanoma10k subset (``transfer_gain.load_subset``, seed 0) as PNGs at the study's size.

    PNG is lossless and the images are already at the study's size, so
    ``prepare_data`` decodes exactly the subset's pixels. The system's own
    stratified split then deals them into train and validation (per class:
    ``train_per_class`` and ``val_per_class``).
    """
    from PIL import Image

    from benchmarks.transfer_gain import load_subset

    if not (data_dir / "train").is_dir():
        raise SystemExit(f"error: melanoma10k not found at {data_dir} (expected train/benign, train/malignant); "
                         "pass --data-dir, or --data embedded")
    manifest = {"source": str(data_dir.resolve()), "image_size": args.image_size, "seed": 0,
                "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    folder = parent / f"melanoma10k_{args.train_per_class}+{args.val_per_class}x2_{args.image_size}px"
    record = folder / "manifest.json"
    if record.exists() and json.loads(record.read_text()) == manifest:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data, classes = load_subset(str(data_dir), args.image_size, args.train_per_class, args.val_per_class, seed=0)
    for split in ("train", "val"):
        for i, (image, label) in enumerate(zip(data[f"x_{split}"], data[f"y_{split}"])):
            path = folder / classes[label] / f"{split}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    record.write_text(json.dumps(manifest))
    return folder


# --- Running one contender ------------------------------------------------------------------------------------------


def run_contender(contender: str, seed: int, args, dataset: dict, work: Path, **extra) -> dict:
    """Run one contender in a fresh process; returns its spec with ``t0``, ``exit_code`` and ``process_s``."""
    run_dir = work / f"{contender}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {"contender": contender, "seed": seed, "budget_s": args.budget_s, "max_epochs": args.max_epochs,
            "space": getattr(args, "space", "small"), "dataset": dataset, "workdir": str(run_dir), "events": str(run_dir / "events.jsonl"), **extra}
    env = {**os.environ, "MEDSEARCH_CACHE": str(run_dir / "cache"),  # a cold activation cache for every run
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    timeout = None if contender == "cache_speedup" else args.budget_s + args.grace_s
    with open(run_dir / "log.txt", "w") as log:
        spec["t0"] = time.time()
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks._contenders", str(run_dir / "spec.json")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = _kill(proc)
            spec["note"] = f"killed {args.grace_s:g} s after its budget"
    spec.update(exit_code=code, process_s=time.time() - spec["t0"])
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    if not args.keep_work:  # checkpoints, Ray results and activation caches: large, and not needed for the report
        for path in run_dir.iterdir():
            if path.name not in ("spec.json", "events.jsonl", "log.txt"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return spec


def _kill(proc) -> int:
    """End the contender's process group (the contender and what it started, e.g. Ray's processes)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def read_events(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- Metrics ------------------------------------------------------------------------------------------------------


def best_so_far(events: list[dict], t0: float, budget_s: float) -> list[tuple[float, float]]:
    """``(elapsed_s, best)`` at each improvement of the best validation balanced accuracy within the budget."""
    points = sorted((e["t"] - t0, e["value"]) for e in events
                    if e["kind"] == "epoch" and 0 <= e["t"] - t0 <= budget_s and e["value"] == e["value"])
    steps, best = [], None
    for elapsed, value in points:
        if best is None or value > best:
            best = value
            steps.append((elapsed, value))
    return steps


def time_to_target(steps: list[tuple[float, float]], target: float | None) -> float | None:
    if target is None:
        return None
    for elapsed, value in steps:
        if value >= target - 1e-12:
            return elapsed
    return None


def summarise_run(spec: dict, events: list[dict]) -> dict:
    t0, budget = spec["t0"], spec["budget_s"]
    within = [e for e in events if 0 <= e["t"] - t0 <= budget]
    ends = [e for e in within if e["kind"] == "trial_end"]
    epochs = [e for e in within if e["kind"] == "epoch"]
    steps = best_so_far(events, t0, budget)
    notes = [e["text"] for e in events if e["kind"] == "note" and "no activation-cache switch" in e["text"]]
    if spec.get("note"):
        notes.append(spec["note"])
    completed = sum(e.get("status") != "errored" for e in ends)
    slots = SLOTS.get(spec["contender"], 1)
    head_only = head_only_trials(events, t0, budget, int(spec.get("max_epochs") or 0))
    return {
        "contender": spec["contender"], "seed": spec["seed"], "budget_s": budget,
        "best_val_balanced_acc": steps[-1][1] if steps else float("nan"),
        "trials_completed": completed, "trials_errored": len(ends) - completed,
        "trials_per_hour": completed / budget * 3600, "epochs_completed": len(epochs),
        "epochs_per_hour": len(epochs) / budget * 3600,
        "time_to_first_result_s": steps[0][0] if steps else float("nan"),
        "slots": slots, "slot_utilisation": slot_utilisation(events, t0, budget, slots),
        "head_only_trial_s": float(statistics.median(head_only)) if head_only else float("nan"),
        "head_only_trials": len(head_only),
        "process_s": spec["process_s"], "exit_code": spec["exit_code"], "note": "; ".join(notes) or None,
        "_steps": steps, "_utilisation": utilisation_over_time(events, t0, budget, slots),
    }


def trial_intervals(events: list[dict], t0: float, budget_s: float) -> list[tuple[float, float, dict]]:
    """``(start, end, config)`` of each trial within the budget, in seconds since ``t0``; a trial still running
    at the budget's end ends there."""
    ends = {e["trial"]: e["t"] - t0 for e in events if e["kind"] == "trial_end"}
    out = []
    for e in events:
        start = e["t"] - t0
        if e["kind"] != "trial_start" or not 0 <= start <= budget_s:
            continue
        out.append((start, min(ends.get(e["trial"], budget_s), budget_s), e.get("config") or {}))
    return out


def slot_utilisation(events: list[dict], t0: float, budget_s: float, slots: int) -> float:
    """Mean share of the ``slots`` busy with a trial, from the first trial's start to the budget's end
    (start-up before the first trial is the time to first result's business, not this)."""
    intervals = trial_intervals(events, t0, budget_s)
    if not intervals:
        return float("nan")
    first = min(start for start, _, _ in intervals)
    busy = sum(end - start for start, end, _ in intervals)
    return busy / (slots * (budget_s - first)) if budget_s > first else float("nan")


UTILISATION_BIN_S = 60.0  # bench.md's utilisation over time: one figure per minute of the budget


def utilisation_over_time(events: list[dict], t0: float, budget_s: float, slots: int,
                          bin_s: float = UTILISATION_BIN_S) -> list[float]:
    """Per ``bin_s`` of the budget, from the process start: the share of the ``slots`` busy with a trial
    (start-up before the first trial shows as idle)."""
    intervals = trial_intervals(events, t0, budget_s)
    out = []
    for k in range(int(math.ceil(budget_s / bin_s))):
        lo, hi = k * bin_s, min((k + 1) * bin_s, budget_s)
        busy = sum(max(0.0, min(end, hi) - max(start, lo)) for start, end, _ in intervals)
        out.append(busy / (slots * (hi - lo)))
    return out


def head_only_trials(events: list[dict], t0: float, budget_s: float, epochs: int) -> list[float]:
    """Wall times of the trials that trained a head alone (pretrained backbone frozen, no augmentation: on cached
    features where the contender has a cache) for all ``epochs``, start to end."""
    done = {}
    for e in events:
        if e["kind"] == "epoch":
            done[e["trial"]] = max(done.get(e["trial"], 0), int(e.get("epoch") or 0))
    ends = {e["trial"]: e["t"] - t0 for e in events if e["kind"] == "trial_end"}
    out = []
    for e in events:
        c = e.get("config") or {}
        if (e["kind"] == "trial_start" and str(c.get("unfreeze")) == "0" and c.get("augment", "none") == "none"
                and e["trial"] in ends and ends[e["trial"]] <= budget_s and done.get(e["trial"], 0) >= epochs > 0):
            out.append(ends[e["trial"]] - (e["t"] - t0))
    return out


def summarise_speedup(spec: dict, events: list[dict]) -> dict:
    found = [e for e in events if e["kind"] == "speedup"]
    row = {"contender": "cache_speedup", "seed": spec["seed"], "process_s": spec["process_s"],
           "exit_code": spec["exit_code"]}
    if not found:
        return {**row, "speedup": float("nan"), "note": "the measurement failed; see its log.txt"}
    keys = ("speedup", "speedup_epoch", "cache_build_s", "trial_s_cached", "trial_s_uncached", "epoch_s_cached",
            "epoch_s_uncached")
    note = (f"{found[0]['speedup_configs']} frozen-lite0 configs x {found[0]['speedup_epochs']} epochs; "
            "speedup = median trial-time ratio, uncached / cached (cache already built)")
    return {**row, **{k: found[0][k] for k in keys}, "note": note}


def build_table(rows: list[dict]):
    """bench.parquet's frame: the target and each run's time to it, from the runs' best-so-far steps."""
    import numpy as np
    import pandas as pd

    runs = [r for r in rows if r["contender"] != "cache_speedup"]
    reference = [r["best_val_balanced_acc"] for r in runs if r["contender"] == REFERENCE]
    reference = [v for v in reference if v == v]
    target = float(np.median(reference)) if reference else None
    for r in runs:
        r["target"] = target
        r["time_to_target_s"] = time_to_target(r["_steps"], target)
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    for col in COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[COLUMNS]
    for col in COLUMNS:
        if col in ("contender", "note"):
            frame[col] = frame[col].astype("string")
        else:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64" if col in INT_COLUMNS else "float64")
    return frame, target


def steps_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame([{"contender": r["contender"], "seed": r["seed"], "elapsed_s": t, "best_val_balanced_acc": v}
                         for r in rows if "_steps" in r for t, v in r["_steps"]],
                        columns=["contender", "seed", "elapsed_s", "best_val_balanced_acc"])


def utilisation_frame(rows: list[dict]):
    """``utilisation.parquet``: per run and minute of its budget, the share of its slots busy."""
    import pandas as pd

    return pd.DataFrame([{"contender": r["contender"], "seed": r["seed"], "minute": k + 1, "busy_share": v}
                         for r in rows for k, v in enumerate(r.get("_utilisation") or [])],
                        columns=["contender", "seed", "minute", "busy_share"])


# --- Report -----------------------------------------------------------------------------------------------------


def median_time_to_target(values) -> float | None:
    """Median over seeds with a miss counted as infinitely slow; None when at least half missed."""
    import numpy as np

    times = sorted(np.inf if v is None or v != v else float(v) for v in values)
    if not times:
        return None
    median = float(np.median(times)) if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    return None if not np.isfinite(median) else median


def summary_rows(frame) -> list[dict]:
    """Medians across seeds per contender, with ratios against ours."""
    import numpy as np

    runs = frame[frame["contender"] != "cache_speedup"]
    out = []
    for name in [c for c in CONTENDERS if c in set(runs["contender"])]:
        part = runs[runs["contender"] == name]
        ttt = [None if v is None or v != v else v for v in part["time_to_target_s"].astype("object")]
        out.append({"contender": name, "seeds": len(part),
                    "best": float(np.nanmedian(part["best_val_balanced_acc"])) if part["best_val_balanced_acc"].notna().any() else float("nan"),
                    "ttt": median_time_to_target(ttt), "reached": sum(v is not None for v in ttt),
                    "trials_per_hour": float(part["trials_per_hour"].median()),
                    "epochs_per_hour": float(part["epochs_per_hour"].median()),
                    "slots": int(part["slots"].max()) if part["slots"].notna().any() else None,
                    "utilisation": float(np.nanmedian(part["slot_utilisation"])) if part["slot_utilisation"].notna().any() else float("nan"),
                    "head_only_s": weighted_median(part["head_only_trial_s"], part["head_only_trials"]),
                    "head_only_n": int(part["head_only_trials"].fillna(0).sum())})
    ours = next((r for r in out if r["contender"] == BASELINE), None)
    for r in out:
        r["best_diff"] = r["best"] - ours["best"] if ours else float("nan")
        r["ttt_ratio"] = (r["ttt"] / ours["ttt"] if ours and r["ttt"] is not None and ours["ttt"] else None)
        r["seed_ratios"] = seed_ratios(runs, r["contender"]) if ours else ""
    return out


def weighted_median(values, counts) -> float:
    """The median of per-seed medians, each seed counted as often as it had trials (the pooled median when the
    seeds' trials are alike; per-trial times are not kept). NaN when no seed had any."""
    import numpy as np

    pooled = [float(v) for v, n in zip(values, counts) if v == v and n == n and n > 0 for _ in range(int(n))]
    return float(np.median(pooled)) if pooled else float("nan")


def seed_ratios(runs, contender: str) -> str:
    """Per seed, the contender's time to target / ours'. With few seeds the median can be undefined (the target
    is the reference's median final best, which the reference itself misses in about half its seeds), so
    each seed's ratio is shown, as a bound where one side never got there: ``>x`` when only ours did (the
    contender would have needed more than the budget), ``<x`` when only the contender did."""
    def get(name, seed):
        part = runs[(runs["contender"] == name) & (runs["seed"] == seed)]
        if not len(part):
            return None, None
        row = part.iloc[0]
        value = row["time_to_target_s"]
        return (None if value != value or value is None else float(value)), float(row["budget_s"])

    out = []
    for seed in sorted(set(runs.loc[runs["contender"] == contender, "seed"])):
        theirs, budget = get(contender, seed)
        ours, _ = get(BASELINE, seed)
        if theirs is not None and ours:
            out.append(f"{theirs / ours:.2f}")
        elif theirs is None and ours:
            out.append(f">{budget / ours:.2f}")
        elif theirs is not None and ours is None and budget:
            out.append(f"<{theirs / budget:.2f}")
        else:
            out.append("n/a")
    return ", ".join(out)


def utilisation_lines(frame, utilisation) -> list[str]:
    """bench.md's utilisation over time: one row per run, one column per minute."""
    runs = frame[frame["contender"] != "cache_speedup"].sort_values(["seed", "contender"])
    minutes = int(utilisation["minute"].max()) if utilisation is not None and len(utilisation) else 0
    if not minutes:
        return []
    lines = ["", "Slot utilisation over time: the share of the contender's slots busy with a trial in each minute "
             "since its process started (Ray's start-up, data decoding and the cache's first pass come before the "
             "first trial).", "",
             "| contender | seed | " + " | ".join(f"min {m}" for m in range(1, minutes + 1)) + " |",
             "|---|---|" + "---|" * minutes]
    for r in runs.itertuples():
        part = utilisation[(utilisation["contender"] == r.contender) & (utilisation["seed"] == r.seed)]
        cells = ([f"{v:.0%}" for v in part.sort_values("minute")["busy_share"]] if len(part)
                 else ["not kept (the run's trial events were not saved)"] + [""] * (minutes - 1))
        lines.append(f"| {r.contender} | {r.seed} | " + " | ".join(cells) + " |")
    return lines


def markdown(frame, target, args, dataset: dict, elapsed_s: float, utilisation=None) -> str:
    rows = summary_rows(frame)
    fmt = lambda v, f="{:.3f}": "n/a" if v is None or v != v else f.format(v)  # noqa: E731
    from benchmarks._contenders import SPACES

    n_train = args.train_per_class * 2
    n_val = args.val_per_class * 2
    data = {"melanoma10k": f"melanoma10k, class-balanced subset ({n_train} train / {n_val} val)",
            "embedded": f"embedded (generated) dataset ({n_train} train / {n_val} val)",
            "ham10000": "HAM10000, all 10,015 images, 7 classes, stratified 80/20 by image (8,012 train / 2,003 val)"
            }[args.data]
    sp = SPACES[args.space]
    space_text = (f"backbone in {{{', '.join(sp.backbones)}}}; learning rate {sp.learning_rate[0]:g}-"
                  f"{sp.learning_rate[1]:g} (log); dropout {sp.dropout[0]:g}-{sp.dropout[1]:g}; for pretrained "
                  f"backbones unfreeze {{{', '.join(map(str, sp.unfreeze))}}} and head units "
                  f"{{{', '.join(map(str, sp.head_units))}}}; augment {{{', '.join(sp.augment)}}}; balanced class "
                  f"weights {{{', '.join(map(str, sp.class_weight))}}}"
                  + (f"; ours caches {sp.augment_views} augmented views per image" if sp.augment_views else ""))
    lines = [
        "# Search benchmark: same data, space and wall-clock budget", "",
        f"- data: {data}, {args.image_size} px; space ({args.space}): {space_text}",
        f"- budget: {args.budget_s:g} s wall time per contender and seed (from process start); "
        f"max {args.max_epochs} epochs per configuration; seeds {args.seeds}; {os.cpu_count()} CPU cores",
        f"- target: {fmt(target)} val balanced accuracy = median over seeds of {REFERENCE}'s final best",
        f"- benchmark wall time {elapsed_s / 60:.1f} min", "",
        "Medians across seeds. *time to target*: a seed that never reached it counts as infinitely slow "
        "(n/a when half or more missed). *ratio vs ours*: the contender's median time to target / ours' "
        "(> 1: ours got there sooner). *Δ best vs ours*: contender minus ours.", "",
        "| contender | seeds | best val bal. acc | Δ best vs ours | time to target (s) | reached | ratio vs ours "
        "| ratio per seed | trials/h | epochs/h | slot utilisation | head-only trial (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        slots = f" of {r['slots']}" if r["slots"] else ""  # a run from before the column has none
        lines.append(f"| {r['contender']} | {r['seeds']} | {fmt(r['best'])} | {fmt(r['best_diff'], '{:+.3f}')} | "
                     f"{fmt(r['ttt'], '{:.0f}')} | {r['reached']}/{r['seeds']} | {fmt(r['ttt_ratio'], '{:.2f}')} | "
                     f"{r['seed_ratios'] or 'n/a'} | "
                     f"{fmt(r['trials_per_hour'], '{:.0f}')} | {fmt(r['epochs_per_hour'], '{:.0f}')} | "
                     f"{fmt(r['utilisation'], '{:.0%}')}{slots} | "
                     f"{fmt(r['head_only_s'], '{:.1f}')} (n={r['head_only_n']}) |")
    lines += ["", "*slot utilisation*: the mean share of the contender's trial slots (Ray: max_concurrent; "
              "keras-tuner and Optuna: one trial at a time in-process) busy with a trial, from its first trial's start "
              "to the budget's end; median over seeds. *head-only trial*: median wall time, start to end as the "
              f"contender saw it, of the trials that trained a head alone (pretrained backbone frozen, no "
              f"augmentation; on cached features where the contender has a cache) for all {args.max_epochs} epochs, "
              "sharing the machine with the contender's other trials (a trial that built the cache counts too); "
              "seeds weighted by their number of such trials. *ratio per seed*: the contender's time to target / "
              "ours' in each seed; `>x`: only ours reached it, so the contender needed more than the budget, at "
              "least x times ours; `<x`: only the contender reached it.", "",
              "Per run:", "",
              "| contender | seed | best val bal. acc | time to target (s) | first result (s) | trials | epochs "
              "| slot utilisation | head-only trial (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    runs = frame[frame["contender"] != "cache_speedup"].sort_values(["seed", "contender"])
    for r in runs.itertuples():
        lines.append(f"| {r.contender} | {r.seed} | {fmt(r.best_val_balanced_acc)} | {fmt(r.time_to_target_s, '{:.0f}')} "
                     f"| {fmt(r.time_to_first_result_s, '{:.0f}')} | {r.trials_completed} | {r.epochs_completed} "
                     f"| {fmt(r.slot_utilisation, '{:.0%}')} | {fmt(r.head_only_trial_s, '{:.1f}')} "
                     f"(n={0 if r.head_only_trials != r.head_only_trials else int(r.head_only_trials)}) |")
    lines += utilisation_lines(frame, utilisation)
    speed = frame[frame["contender"] == "cache_speedup"]
    if len(speed) and speed["speedup"].notna().any():
        med = speed.median(numeric_only=True)
        lines += ["", f"**Activation cache:** a frozen efficientnet_lite0 trial runs {med['speedup']:.2f}x faster "
                      f"with the cache (median over seeds of the median over configurations; "
                      f"{fmt(med['trial_s_uncached'], '{:.1f}')} s uncached vs {fmt(med['trial_s_cached'], '{:.1f}')} s "
                      f"cached per trial); per epoch {med['speedup_epoch']:.2f}x "
                      f"({fmt(med['epoch_s_uncached'], '{:.2f}')} s vs {fmt(med['epoch_s_cached'], '{:.2f}')} s); "
                      f"building the cache once took {fmt(med['cache_build_s'], '{:.1f}')} s. "
                      f"({speed['note'].iloc[0]})"]
    notes = frame[(frame["contender"] != "cache_speedup") & frame["note"].notna()]
    if len(notes):
        lines += ["", "Notes:"] + [f"- {r.contender} seed {r.seed}: {r.note}" for r in notes.itertuples()]
    lines += ["", "Per run: `bench.parquet`; best-so-far curves: `best_so_far.png`, `best_so_far.parquet`; "
              "utilisation per minute: `utilisation.parquet`."]
    return "\n".join(lines) + "\n"


NAMES = {"ours": "ours", "ours_nocache": "ours without the cache", "random_fifo": "Ray random search (FIFO)",
         "keras_tuner_hyperband": "Keras Tuner Hyperband", "optuna_hyperband": "Optuna Hyperband"}


def readme_table(frame) -> str:
    """The README's table of a run (tests/test_search_bench.py checks the README holds the saved run's)."""
    rows = summary_rows(frame)
    runs = frame[frame["contender"] != "cache_speedup"]
    best = max(r["best"] for r in rows)
    lines = ["| contender | median best val balanced accuracy | reached the target | time to it, "
             + " / ".join(f"seed {s}" for s in sorted(set(runs["seed"]))) + " | trials per hour | slot utilisation |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        part = runs[runs["contender"] == r["contender"]].sort_values("seed")
        times = " / ".join("never" if v != v else f"{v:.0f} s" for v in part["time_to_target_s"].astype(float))
        score = f"**{r['best']:.3f}**" if r["best"] == best else f"{r['best']:.3f}"
        lines.append(f"| {NAMES[r['contender']]} | {score} | {r['reached']}/{r['seeds']} | {times} | "
                     f"{r['trials_per_hour']:.0f} | {r['utilisation']:.0%} of {r['slots']} |")
    return "\n".join(lines) + "\n"


def plot(steps, target, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.linspace(0, budget_s, 400)
    colours = dict(zip(CONTENDERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name in [c for c in CONTENDERS if c in set(steps["contender"])]:
        curves = []
        for _, part in steps[steps["contender"] == name].groupby("seed"):
            t = np.r_[part["elapsed_s"].to_numpy(), budget_s]
            v = np.r_[part["best_val_balanced_acc"].to_numpy(), part["best_val_balanced_acc"].iloc[-1]]
            ax.step(t, v, where="post", color=colours[name], alpha=0.25, linewidth=1)
            index = np.searchsorted(t, grid, side="right") - 1
            curves.append(np.where(index >= 0, v[np.clip(index, 0, None)], np.nan))
        curves = np.array(curves)
        enough = np.sum(~np.isnan(curves), axis=0) * 2 > len(curves)  # most seeds have a result
        median = np.where(enough, np.nanmedian(np.where(np.isnan(curves), -np.inf, curves), axis=0), np.nan)
        ax.plot(grid, median, color=colours[name], linewidth=2.2, label=f"{name} (median of {len(curves)})",
                drawstyle="steps-post")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlim(0, budget_s)
    ax.set_xlabel("wall time since the contender started (s)")
    ax.set_ylabel("best validation balanced accuracy so far")
    ax.set_title("Best so far under the same wall-clock budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Main -------------------------------------------------------------------------------------------------------


def saved_run(out: Path, args, flag: str) -> tuple[list[dict], float]:
    """The runs saved in ``out`` as ``main`` builds them (with their best-so-far ``_steps`` and ``_utilisation``),
    and the benchmark's wall time so far; for ``flag`` (``--merge`` or ``--report-only``), which refuses a folder
    whose run used another setting than ``args.setting`` (its data, space and budget would be described wrongly,
    or mixed with this run's)."""
    import pandas as pd

    missing = [name for name in ("bench.parquet", "best_so_far.parquet") if not (out / name).is_file()]
    if missing:
        raise SystemExit(f"search_bench {flag}: {out} has no {', '.join(missing)}; run the benchmark there first")
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    if record.get("setting", args.setting) != args.setting:
        raise SystemExit(f"search_bench {flag}: {out} holds a run of --setting {record['setting']}, not "
                         f"{args.setting}; pass --setting {record['setting']}, or another --out")
    frame, steps = pd.read_parquet(out / "bench.parquet"), pd.read_parquet(out / "best_so_far.parquet")
    budgets = sorted({float(b) for b in frame["budget_s"].dropna()})
    if budgets and budgets != [float(args.budget_s)]:
        raise SystemExit(f"search_bench {flag}: {out} holds runs with --budget-s {', '.join(f'{b:g}' for b in budgets)}, "
                         f"not {args.budget_s:g}; pass --budget-s {budgets[0]:g}, or another --out")
    util = pd.read_parquet(out / "utilisation.parquet") if (out / "utilisation.parquet").is_file() else None
    rows = []
    for saved in frame.drop(columns=["target", "time_to_target_s"]).to_dict("records"):
        row = {k: (None if v is pd.NA else v) for k, v in saved.items()}
        if row["contender"] != "cache_speedup":
            part = steps[(steps["contender"] == row["contender"]) & (steps["seed"] == row["seed"])]
            row["_steps"] = list(zip(part["elapsed_s"].astype(float), part["best_val_balanced_acc"].astype(float)))
            row["_utilisation"] = saved_utilisation(out, util, row)
        rows.append(row)
    return rows, wall_time_s(out, record, flag)


def wall_time_s(out: Path, record: dict, flag: str) -> float:
    """The benchmark's wall time as its run recorded it: ``run.json`` (``record``), or for a run from before that
    file the line its own ``bench.md`` printed."""
    import re

    if "wall_time_s" in record:
        return float(record["wall_time_s"])
    found = re.search(r"benchmark wall time ([0-9.]+) min", (out / "bench.md").read_text()) \
        if (out / "bench.md").is_file() else None
    if not found:
        raise SystemExit(f"search_bench {flag}: {out} has no run.json and no bench.md stating the wall time; "
                         "rerun the benchmark")
    return float(found.group(1)) * 60


def write_report(out: Path, rows: list[dict], args, dataset: dict, elapsed_s: float, *, tables: bool = True):
    """From every run's row: ``bench.parquet`` and ``best_so_far.parquet`` (with ``tables``; ``--report-only``
    leaves them as they are), ``utilisation.parquet``, ``best_so_far.png`` and ``bench.md``; returns the frame and
    the report."""
    args.seeds = sorted({int(r["seed"]) for r in rows})
    frame, target = build_table(rows)
    steps = steps_frame(rows)
    if tables:
        frame.to_parquet(out / "bench.parquet", index=False)
        steps.to_parquet(out / "best_so_far.parquet", index=False)
    utilisation = utilisation_frame(rows)
    utilisation.to_parquet(out / "utilisation.parquet", index=False)
    plot(steps, target, args.budget_s, out / "best_so_far.png")
    report = markdown(frame, target, args, dataset, elapsed_s, utilisation)
    (out / "bench.md").write_text(report)
    return frame, report


def saved_utilisation(out: Path, util, row: dict) -> list[float] | None:
    """A saved run's utilisation per minute: from ``utilisation.parquet``, else from the trial events its
    ``work/`` folder kept (a run from before that file), else None."""
    if util is not None:
        part = util[(util["contender"] == row["contender"]) & (util["seed"] == row["seed"])]
        if len(part):
            return [float(v) for v in part.sort_values("minute")["busy_share"]]
    folder = out / "work" / f"{row['contender']}_s{int(row['seed'])}"
    if not (folder / "spec.json").is_file() or not (folder / "events.jsonl").is_file():
        return None
    spec = json.loads((folder / "spec.json").read_text())
    return utilisation_over_time(read_events(folder / "events.jsonl"), spec["t0"], spec["budget_s"],
                                 SLOTS.get(row["contender"], 1))


def merge_rows(saved: list[dict], rows: list[dict]) -> list[dict]:
    """``saved`` runs and new ``rows``; a contender and seed in both keeps the new one."""
    ran = {(r["contender"], r["seed"]) for r in rows}
    return [r for r in saved if (r["contender"], r["seed"]) not in ran] + rows


def report_only(args) -> int:
    out = Path(args.out)
    rows, wall_s = saved_run(out, args, "--report-only")
    print(write_report(out, rows, args, {}, wall_s, tables=False)[1])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    started = time.time()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(args, work)
    n_runs = len(args.seeds) * len(args.contenders)
    print(f"search_bench: {len(args.contenders)} contenders x {len(args.seeds)} seed(s), {args.budget_s:g} s each "
          f"(at least {n_runs * args.budget_s / 60:.0f} min), data {args.data} "
          + ("(all, 80/20)" if args.data == "ham10000" else f"{2 * args.train_per_class}+{2 * args.val_per_class}")
          + f" at {args.image_size} px, {args.space} space", flush=True)
    saved, saved_wall_s = saved_run(out, args, "--merge") if args.merge else ([], 0.0)
    rows = []
    for seed in args.seeds:
        # Rotate the order per seed, so no contender always runs first (or last) on a warming machine.
        turn = seed % len(args.contenders)
        order = args.contenders[turn:] + args.contenders[:turn]
        for contender in order:
            spec = run_contender(contender, seed, args, dataset, work)
            row = summarise_run(spec, read_events(spec["events"]))
            rows.append(row)
            print(f"[seed {seed}] {contender:>22}: best {row['best_val_balanced_acc']:.3f}, "
                  f"{row['trials_completed']} trials, {row['epochs_completed']} epochs in {args.budget_s:g} s "
                  f"(process {spec['process_s']:.0f} s, exit {spec['exit_code']})", flush=True)
        if args.speedup_configs > 0:
            spec = run_contender("cache_speedup", seed, args, dataset, work, configs=args.speedup_configs,
                                 epochs=args.speedup_epochs)
            row = summarise_speedup(spec, read_events(spec["events"]))
            rows.append(row)
            print(f"[seed {seed}] {'cache_speedup':>22}: {row['speedup']:.2f}x per trial "
                  f"({spec['process_s']:.0f} s)", flush=True)
    rows = merge_rows(saved, rows)
    elapsed = time.time() - started + saved_wall_s
    (out / "run.json").write_text(json.dumps({"wall_time_s": elapsed, "setting": args.setting}))
    frame, report = write_report(out, rows, args, dataset, elapsed)
    print()
    print(report)
    print(f"written to {out}: bench.parquet, bench.md, best_so_far.png, best_so_far.parquet, utilisation.parquet, "
          "run.json")
    failed = frame[(frame["exit_code"].fillna(0) != 0)]
    if len(failed):
        print(f"warning: {len(failed)} run(s) exited non-zero; see {work}/<contender>_s<seed>/log.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
