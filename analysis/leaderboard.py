"""``python -m analysis.leaderboard RUN_DIR... [--out FILE]``: one leaderboard across studies.

One row per study x backbone: that backbone's best trial in the study (by the
study's own metric and mode), with the study's name, dataset, split protocol and
metric, the validation metrics at the best epoch, epochs, wall time and
parameters. Writes ``FILE`` (Parquet, default ``cross_study_leaderboard.parquet``)
and the same table as Markdown beside it (``FILE`` with ``.md``), and prints it.

Studies may use different metrics: ``metric`` names each study's own and
``score`` holds its value; the fixed columns (``best_val_balanced_accuracy``,
``best_val_auc``, ...) are comparable across rows only under the same dataset
and split protocol.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pandas as pd

from analysis import tables as T
from analysis.files import write_file
from search.argtypes import ArgumentParser

DEFAULT_OUT = "cross_study_leaderboard.parquet"
EXIT_OK, EXIT_USAGE = 0, 2
FIRST = ["study", "dataset", "split", "metric", "mode", "backbone", "score", "trial_name", "status"]


def dataset_label(study: dict) -> str:
    """``loader`` plus what tells two datasets of one loader apart (path, target, image size)."""
    ds = study.get("dataset") or {}
    label = str(ds.get("loader", "?"))
    if ds.get("path"):
        label += f":{Path(str(ds['path'])).name}"
    target = (ds.get("options") or {}).get("target")
    if target:
        label += f" ({target})"
    if ds.get("image_size"):
        label += f" @{ds['image_size']}px"
    return label


def split_label(study: dict) -> str:
    ds = study.get("dataset") or {}
    text = str(ds.get("split", "?"))
    if ds.get("split_options"):
        text += "(" + ",".join(f"{k}={v}" for k, v in ds["split_options"].items()) + ")"
    return text


def study_rows(run: T.Run) -> pd.DataFrame:
    """The best trial per backbone of one study, with the study's identity columns in front."""
    best = T.best_per_backbone(run)
    recall = [c for c in best.columns if c.startswith("best_val_recall_")]
    best["score"] = best[run.score_column] if run.score_column in best.columns else float("nan")
    state = T.run_state(run)
    best.insert(0, "study", run.name)
    best["dataset"] = dataset_label(run.study)
    best["split"] = split_label(run.study)
    best["metric"] = run.metric
    best["mode"] = run.mode
    best["positive_class"] = run.positive_class
    positive = f"best_val_recall_{run.positive_class}"
    best["recall_positive"] = best[positive] if run.positive_class and positive in best.columns else float("nan")
    best["partial"] = state["partial"]
    best["run_dir"] = str(run.path)
    return best.drop(columns=recall)


def merge(run_dirs) -> pd.DataFrame:
    """One row per study x backbone across ``run_dirs``, best score first within each study."""
    frames = [study_rows(T.load_run(d)) for d in run_dirs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=FIRST)
    board = pd.concat(frames, ignore_index=True)
    if board["study"].duplicated().any() and board.groupby("study")["run_dir"].nunique().gt(1).any():
        # The same study name from two storages: tell them apart by folder.
        board["study"] = board["study"] + " (" + board["run_dir"].map(lambda p: Path(p).parent.name) + ")"
    order = FIRST + list(T.METRIC_COLUMNS) + ["recall_positive", *T.COST_COLUMNS, "trials", "partial"]
    order += [c for c in board.columns if c not in order]
    return board[[c for c in order if c in board.columns]].reset_index(drop=True)


def to_markdown(board: pd.DataFrame) -> str:
    shown = board.drop(columns=["run_dir", "mode", "positive_class"], errors="ignore")
    pretty = T.pretty(shown)
    pretty = pretty.rename(columns={"recall_positive": "recall (positive class)", "score": "score (study metric)"})
    return T.to_markdown(pretty)


def write(board: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """``out`` as Parquet and the Markdown beside it; each written whole or not at all (``tables.write_file``)."""
    out = Path(out)
    parquet = out if out.suffix == ".parquet" else out.with_suffix(".parquet")
    md = parquet.with_suffix(".md")
    frame = board.copy()
    for col in frame.columns:  # one Parquet type per column (e.g. positive_class None for some studies)
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_file(parquet, buffer.getvalue())
    write_file(md, (to_markdown(board) + "\n").encode("utf-8"))
    return parquet, md


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.leaderboard", allow_abbrev=False,
        description="Merge study results folders into one leaderboard: one row per study x backbone (its best trial).",
        epilog="Example: python -m analysis.leaderboard runs/melanoma runs/ham10000 --out all.parquet")
    parser.add_argument("run_dirs", nargs="+", help="results folders, e.g. runs/quickstart")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"Parquet file to write; the Markdown goes beside it as .md (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        board = merge(args.run_dirs)
        parquet, md = write(board, args.out)
    except T.AnalysisError as exc:  # a damaged input, or an output that cannot be written (nothing partial left)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(to_markdown(board))
    print(f"\n{len(board)} rows from {len(args.run_dirs)} studies: {parquet}  {md}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
