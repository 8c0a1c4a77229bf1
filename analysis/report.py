"""``python -m analysis.report RUN_DIR [--evaluate] [--top-k 3]``: one report of a results folder.

Writes ``RUN_DIR/report.md`` (plots as PNG files in ``RUN_DIR/report_files/``) and
``RUN_DIR/report.html`` (self-contained: the same PNGs embedded as base64 data URIs).
Needs no network and no Ray; works on a study that is still running (the header
says "partial results") and on studies with errored trials.

``--evaluate`` first scores the top-k trials on the held-out test split with
``analysis.evaluate.evaluate_top_k`` (it writes ``test_evaluation.json``); without
it, the report uses a test_evaluation.json already in the folder, or says the
evaluation has not been run.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import tables as T
from analysis.plots import Plot, latest_evaluation, make_all, read_test_evaluation

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PLOTS_DIR = "report_files"
LONG_TABLE = 40  # trial-by-trial tables longer than this are shortened
SECTIONS = (
    "Study summary",
    "Near-duplicate audit",
    "Best trial per backbone",
    "Backbone x unfreeze depth",
    "Published results beside ours",
    "Held-out test evaluation",
    "Final model: ensemble, calibration, operating point",
    "ROC and precision-recall curves",
    "Where the model looks",
    "Plots",
    "Search efficiency",
    "All trials",
    "Errored trials",
)


@dataclasses.dataclass
class Section:
    title: str
    blocks: list = dataclasses.field(default_factory=list)  # ("text", str) | ("table", DataFrame) | ("plot", Plot) | ("h3", str)

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def plot(self, p: Plot) -> None:
        self.blocks.append(("plot", p))

    def sub(self, title: str) -> None:
        self.blocks.append(("h3", title))

    def row(self, plots: list[Plot]) -> None:
        """Plots side by side in the HTML (one after the other in Markdown)."""
        self.blocks.append(("row", list(plots)))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report", allow_abbrev=False,
        description="Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html from a study's results folder.",
        epilog="Example: python -m analysis.report runs/quickstart --evaluate")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--evaluate", action="store_true",
                        help="first evaluate the top-k trials on the held-out test split (analysis.evaluate)")
    parser.add_argument("--top-k", type=_positive_int, default=3, help="trials to evaluate with --evaluate (default: 3)")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        T.load_run(run_dir)  # fail early on a folder that is not a results folder
    except T.AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    code = EXIT_OK
    eval_error = None
    if args.evaluate:
        eval_error = run_evaluation(run_dir, args.top_k)
        if eval_error:
            print(f"warning: test evaluation failed: {eval_error}", file=sys.stderr)
            code = EXIT_FAILED
    try:
        md, html_path = write_report(run_dir, eval_error=eval_error)
    except T.AnalysisError as exc:  # a file that cannot be written (a full disk): nothing partial is left
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {md}\n        {html_path}")
    return code


def run_evaluation(run_dir: Path, k: int) -> str | None:
    """Run analysis.evaluate.evaluate_top_k; the error's text if it fails, else None."""
    try:
        from analysis.evaluate import evaluate_top_k
    except ImportError as exc:
        return f"analysis.evaluate is not available ({exc})"
    try:
        evaluate_top_k(run_dir, k=k)
    except Exception as exc:  # noqa: BLE001 - reported in the report and on stderr
        return f"{type(exc).__name__}: {exc}"
    return None


def write_report(run_dir: str | Path, eval_error: str | None = None) -> tuple[Path, Path]:
    """Build every section and write report.md and report.html into ``run_dir``."""
    run = T.load_run(run_dir)
    sections, header = build(run, eval_error=eval_error)
    md_path, html_path = run.path / "report.md", run.path / "report.html"
    T.write_file(md_path, render_markdown(header, sections, run).encode("utf-8"))
    T.write_file(html_path, render_html(header, sections, run).encode("utf-8"))
    return md_path, html_path


# ---------------------------------------------------------------- content

def build(run: T.Run, eval_error: str | None = None) -> tuple[list[Section], dict]:
    state = T.run_state(run)
    record = read_test_evaluation(run)
    evaluation = latest_evaluation(record)
    plots = make_all(run, run.path / PLOTS_DIR, evaluation)
    header = {"title": f"Study report: {run.name}", "state": state,
              "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model_card": (run.path / "model_card.md").is_file()}
    sections = [
        summary_section(run, state),
        near_duplicates_section(run),
        best_backbone_section(run),
        unfreeze_section(run),
        published_section(run, evaluation),
        test_section(run, record, evaluation, eval_error),
        final_model_section(run, evaluation),
        curves_section(run, evaluation),
        explain_part(run, evaluation),
        plots_section(plots),
        efficiency_section(run),
        all_trials_section(run),
        errored_section(run),
    ]
    assert [s.title for s in sections] == list(SECTIONS)
    return sections, header


def state_line(state: dict) -> str:
    if state["partial"]:
        return "**Partial results**: " + "; ".join(state["reasons"]) + "."
    return "**Complete**: every trial of the study has ended."


def summary_section(run: T.Run, state: dict) -> Section:
    s = Section("Study summary")
    study, ds = run.study, run.study.get("dataset") or {}
    counts = T.status_counts(run)
    rows = [
        ("study", run.name),
        ("description", study.get("description") or ""),
        ("study file", f"{run.record.get('study_file', '')} (sha256 {str(run.record.get('study_file_sha256', ''))[:12]})"),
        ("dataset", _dataset_text(ds)),
        ("split protocol", _split_text(ds)),
        ("classes", ", ".join(_classes(run)) + (f" (positive: {ds.get('positive_class')})" if ds.get("positive_class") else "")),
        ("metric", f"{T.label(run.metric)} ({run.metric}, {'higher' if run.mode == 'max' else 'lower'} is better)"),
        ("budget", f"{run.num_samples} trials x at most {run.max_epochs} epochs"
                   + (f", time limit {study.get('time_limit_s')} s" if study.get("time_limit_s") else "")),
        ("ASHA", f"grace period {study.get('grace_period')} epoch(s), reduction factor {study.get('reduction_factor')}"),
        ("resources", f"{study.get('max_concurrent')} trials at a time, {study.get('cpus_per_trial')} CPU and "
                      f"{study.get('gpus_per_trial')} GPU per trial"),
        ("seed", str(study.get("seed"))),
        ("fixed hyperparameters", ", ".join(f"{k}={v}" for k, v in (study.get("fixed") or {}).items()) or "none"),
        ("trials by status", ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {run.num_samples} planned)"),
        ("started", str(state["started_at"] or "unknown")),
    ]
    if state["resumed_at"]:
        rows.append(("resumed", ", ".join(state["resumed_at"])))
    ends = T.ray_end_times(run)
    if ends:
        last = datetime.fromtimestamp(max(ends.values()), timezone.utc).isoformat(timespec="seconds")
        rows.append(("last trial result", f"{last} (Ray's trial result.json)"))
    if state["updated_at"]:
        rows.append(("leaderboard last written", f"{state['updated_at']} ({_ago(state['updated_ago_s'])} ago)"))
    if state["finish_marker"]:
        rows.append(("finished", str(state["finish_marker"])))
    if run.record.get("smoke"):
        rows.append(("smoke run", "yes (--smoke: tiny budget and data subset)"))
    if run.record.get("skipped_images"):
        rows.append(("skipped images", f"{len(run.record['skipped_images'])} unreadable (listed in study.json)"))
    versions = run.record.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    rows.append(("command", str(run.record.get("command", ""))))
    s.table(pd.DataFrame(rows, columns=["", "value"]))
    best = T.best_trial(run)
    if best is not None:
        step = image_step(run.metric, split_class_counts(run, "val"))
        value = best[run.score_column]
        shown = f"{value:.{decimals_for(step[0])}f}" if step and not pd.isna(value) else \
            T.format_value(value, run.score_column)
        s.text(f"Best trial by {T.label(run.metric)}: **{best.get('trial_name')}** "
               f"({best.get('backbone', '')}), {shown} at epoch {T.format_value(best.get('best_epoch'), 'best_epoch')}.")
        resolution = validation_resolution(run)
        if resolution:
            s.text(resolution)
    splits = T.split_counts(run)
    if splits is not None:
        s.sub("Images per split")
        s.table(splits)
    if not state["finish_marker"]:
        s.text("How \"partial\" is decided: study.json has no `finished_at` (the run has not ended, or predates "
               "the marker), so the report reads the folder: trials still `running` in leaderboard.parquet, or "
               "fewer trials than `num_samples`.")
    return s


NEAR_DUPLICATES_SHOWN = 10  # closest cross-split pairs listed
NEAR_DUPLICATES_PANEL = 6  # of which drawn side by side


def near_duplicates_section(run: T.Run) -> Section:
    """The leakage audit (``near_duplicates.parquet``): contamination figures, the closest cross-split pairs, a panel."""
    from trainables.datasets.near_duplicates import contamination, recorded_settings

    s = Section("Near-duplicate audit")
    path = run.path / "near_duplicates.parquet"
    if not path.is_file():
        s.text("Not run for this study: `Dataset(near_duplicates=False)`, or a study from before the audit.")
        return s
    pairs = T.read_table(path)  # a damaged file is an AnalysisError naming it, as for the other Parquet files
    settings = recorded_settings(pairs, (run.study.get("dataset") or {}).get("near_duplicates", True))
    how = "" if settings is None else f"pHash within {settings.hash_distance} of 256 bits (any flip)" + (
        f", or {settings.embedding} similarity >= {settings.embedding_similarity}" if settings.embedding else "")
    lines = [f"- found by: {how}" if how else "- found by: (settings not recorded)"]
    if run.splits is not None:
        f = contamination(pairs, run.splits)
        lines += [
            f"- **{f['pairs']} pair(s)** in {f['clusters']} cluster(s) ({f['images_in_clusters']} images); "
            f"**{f['cross_split_pairs']} across splits**; {f['label_conflicts']} label conflict(s) "
            "(a pair with two labels)",
            *(f"- **{_pct(f[f'{name}_share_with_train_near_duplicate'])} of {name} images** "
              f"({f[f'{name}_with_train_near_duplicate']} of {f[f'{name}_images']}) have a near-duplicate in train"
              for name in ("val", "test") if f[f"{name}_images"]),
        ]
    s.text("\n".join(lines))
    crossing = pairs[pairs["cross_split"]].head(NEAR_DUPLICATES_SHOWN) if "cross_split" in pairs else pairs.head(0)
    if crossing.empty:
        s.text("No near-duplicate pair crosses splits: validation and test scores measure unseen images.")
        return s
    s.text("A validation or test image with a near-duplicate in train is scored partly on memory. A leak-free "
           "split keeps each cluster in one split: `Dataset(split=\"grouped\", split_options={\"by\": "
           "\"near_duplicates\"})` (with patient or lesion ids: `by=[\"group\", \"near_duplicates\"]`).")
    s.sub("Closest pairs across splits")
    shown = pd.DataFrame({
        "image a": crossing["path_a"].map(lambda p: Path(p).name), "split a": crossing["split_a"],
        "label a": crossing["label_a"],
        "image b": crossing["path_b"].map(lambda p: Path(p).name), "split b": crossing["split_b"],
        "label b": crossing["label_b"],
        "pHash bits": crossing["hash_distance"].astype("string").fillna(""),
        "similarity": crossing["embedding_similarity"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
    })
    s.table(shown)
    s.plot(near_duplicates_panel(crossing.head(NEAR_DUPLICATES_PANEL), run.path / PLOTS_DIR))
    return s


def near_duplicates_panel(pairs: pd.DataFrame, out_dir: Path) -> Plot:
    """The pairs side by side, one row each, titled with split, label and distance; skipped if the images are gone."""
    from analysis.plots import _figure, _save
    from trainables.data import eight_bit, open_image

    title = "Closest near-duplicate pairs across splits"
    missing = [p for p in list(pairs["path_a"]) + list(pairs["path_b"]) if not Path(p).is_file()]
    if missing:
        return Plot("near_duplicates", title, None, f"not drawn: {len(missing)} image(s) are no longer at their "
                                                     f"recorded paths (e.g. {missing[0]})")
    fig = _figure(figsize=(5.0, 2.3 * len(pairs)))
    for row, pair in enumerate(pairs.itertuples()):
        for col, side in enumerate("ab"):
            ax = fig.add_subplot(len(pairs), 2, 2 * row + col + 1)
            path = getattr(pair, f"path_{side}")
            with open_image(path) as image:  # as training saw it: DICOM windowed, 16-bit PNG scaled, not clipped
                ax.imshow(eight_bit(image, path).convert("RGB"))
            ax.set_axis_off()
            distance = f"{pair.hash_distance} bits" if not pd.isna(pair.hash_distance) else \
                f"sim {pair.embedding_similarity:.3f}"
            ax.set_title(f"{getattr(pair, f'split_{side}')} / {getattr(pair, f'label_{side}')}"
                         + (f"  ({distance})" if side == "a" else ""), fontsize=8)
    return Plot("near_duplicates", title, _save(fig, out_dir, "near_duplicates"),
                "each row is one pair: left and right differ in split; the distance is the pHash's (or the "
                "embedding similarity)")


def _dataset_text(ds: dict) -> str:
    parts = [str(ds.get("loader", "?"))]
    if ds.get("path"):
        parts.append(f"at {ds['path']}")
    parts.append(f"{ds.get('image_size')} px")
    if ds.get("options"):
        parts.append("options " + ", ".join(f"{k}={v}" for k, v in ds["options"].items()))
    return ", ".join(parts)


def _split_text(ds: dict) -> str:
    text = str(ds.get("split", "?"))
    if ds.get("split_options"):
        text += " (" + ", ".join(f"{k}={v}" for k, v in ds["split_options"].items()) + ")"
    return text + f", split seed {ds.get('seed', 0)}"


def _classes(run: T.Run) -> list[str]:
    if run.splits is not None and "label" in run.splits.columns:
        if "label_index" in run.splits.columns:
            return list(run.splits.sort_values("label_index")["label"].drop_duplicates().astype(str))
        return sorted(run.splits["label"].astype(str).unique())
    return [str(c) for c in ((run.study.get("dataset") or {}).get("classes") or [])]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- resolution: what one image is worth

def split_class_counts(run: T.Run, split: str) -> dict[str, int]:
    """Images per class in ``split`` (splits.parquet), in class order; empty when the folder does not say."""
    if run.splits is None or not {"split", "label"} <= set(run.splits.columns):
        return {}
    counts = run.splits.loc[run.splits["split"] == split, "label"].astype(str).value_counts()
    ordered = {c: int(counts[c]) for c in _classes(run) if c in counts.index}
    return ordered if sum(ordered.values()) == int(counts.sum()) else {str(k): int(v) for k, v in counts.items()}


def image_step(metric: str, counts: dict[str, int]) -> tuple[float, str, str] | None:
    """The most one image of a split with ``counts`` per class can move ``metric``: ``(step, "1/120", what)``.

    Accuracy: 1/n. Balanced accuracy: 1/(k x n_c) for an image of class c, so
    1/(k x the smallest class). Recall of a class: 1/n_c. None for metrics
    without a fixed step per image (AUC, F1, loss).
    """
    name = str(metric)
    for prefix in ("best_", "last_", "val_", "test_"):
        name = name.removeprefix(prefix)
    present = {c: n for c, n in counts.items() if n > 0}
    total = sum(present.values())
    if not total:
        return None
    if name == "accuracy":
        return 1 / total, f"1/{total}", "one image"
    if name == "balanced_accuracy":
        k, smallest = len(present), min(present, key=present.get)
        n = present[smallest]
        what = "one image" if k * n == total else f"one image of the smallest class, {smallest} ({n} images): 1/({k} x {n})"
        return 1 / (k * n), f"1/{k * n}", what
    if name.startswith("recall_") and name[len("recall_"):] in present:
        n = present[name[len("recall_"):]]
        return 1 / n, f"1/{n}", f"one {name[len('recall_'):]} image"
    return None


def decimals_for(step: float | None) -> int:
    """Decimals that show a step of ``step`` and no finer: 1/20 -> 2, 1/120 -> 3, 1/2000 -> 4."""
    if not step or step <= 0 or math.isnan(step):
        return 4
    return max(2, min(4, math.ceil(-math.log10(step) - 1e-9)))


def _images(gap: float, step: float) -> str:
    count = gap / step
    return f"{round(count)}" if abs(count - round(count)) < 0.05 else f"about {count:.1f}"


def validation_resolution(run: T.Run) -> str | None:
    """What one validation image is worth on the study's metric, and whether the top trials can be told apart."""
    counts = split_class_counts(run, "val")
    if not counts:
        return None
    n = sum(counts.values())
    words = T.label(run.metric)
    held = f"the validation split holds {n} images ({', '.join(f'{c} {k}' for c, k in counts.items())})"
    step = image_step(run.metric, counts)
    if step is None:
        acc = image_step("accuracy", counts)
        return (f"Resolution: {held}; one image is {acc[1]} = {acc[0]:.{decimals_for(acc[0])}f} of validation "
                f"accuracy. The study's metric, {words}, has no fixed step per image.")
    d = decimals_for(step[0])
    text = f"Resolution: {held}; one image is {step[1]} = {step[0]:.{d}f} of {words}" + \
        (f" ({step[2]})" if step[2] != "one image" else "") + "."
    ranked = T.scored(run)
    scores = pd.to_numeric(ranked[run.score_column], errors="coerce").dropna().to_numpy(dtype=float) \
        if run.score_column in ranked.columns else []
    if len(scores) >= 2:
        close = int(((abs(scores - scores[0])) <= step[0] + 1e-9).sum())
        if close >= 2:
            text += (f" The top {close} trials are within {step[1]} = {step[0]:.{d}f} of each other on {words}: one "
                     "image; they cannot be told apart (their order is the tie rule's: the lower validation loss first).")
        else:
            gap = abs(scores[0] - scores[1])
            text += (f" The best trial leads the next by {gap:.{d}f}: {_images(gap, step[0])} image(s) at {step[1]} "
                     "each.")
    return text


def test_resolution(run: T.Run, evaluation: dict) -> str | None:
    """What one test image is worth, and how wide the best trial's test interval is (in images)."""
    from analysis.plots import best_evaluated

    split = evaluation.get("split", "test")
    counts = split_class_counts(run, split)
    n = evaluation.get("n")
    if not counts or (n and sum(counts.values()) != n):
        best = best_evaluated(evaluation) or {}
        report = best.get("classification_report") or {}
        counts = {c: int((report.get(c) or {}).get("support", 0)) for c in best.get("class_names") or []}
    step = image_step("accuracy", counts)
    if step is None:
        return None
    d = decimals_for(step[0])
    text = f"Resolution on {split}: {sum(counts.values())} images; one image is {step[1]} = {step[0]:.{d}f} of accuracy"
    balanced = image_step("balanced_accuracy", counts)
    if balanced and balanced[1] != step[1]:
        text += f" and up to {balanced[1]} = {balanced[0]:.{d}f} of balanced accuracy ({balanced[2]})"
    text += "."
    best = best_evaluated(evaluation)
    metric = str(evaluation.get("metric") or run.metric).removeprefix("val_")
    if best and metric not in (best.get("metrics") or {}):
        metric = "balanced_accuracy"
    low, high = ((best or {}).get("ci") or {}).get(metric, [None, None])[:2]
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)):
        pct = int(round(100 * evaluation.get("level", 0.95)))
        width = high - low
        metric_step = image_step(metric, counts)
        in_images = f", {_images(width, metric_step[0])} images' worth" if metric_step else ""
        text += (f" The {pct}% interval of {best.get('trial_name')}'s {T.label(split + '_' + metric)} is "
                 f"{width:.{d}f} wide [{low:.{d}f}, {high:.{d}f}]{in_images}: trials closer than that on {split} are "
                 "not told apart by this test set.")
    return text


def best_backbone_section(run: T.Run) -> Section:
    s = Section("Best trial per backbone")
    table = T.best_per_backbone(run)
    if table.empty:
        s.text("No trial has a validation score yet.")
        return s
    s.text(f"Each backbone's best trial by {T.label(run.metric)}; every metric is taken at that trial's best "
           "epoch (the checkpointed one). `trials` counts all the backbone's trials, errored included.")
    s.table(T.pretty(table, run))
    return s


def unfreeze_section(run: T.Run) -> Section:
    s = Section("Backbone x unfreeze depth")
    table = T.best_per_backbone_unfreeze(run)
    if table.empty:
        s.text("No trial has a validation score yet.")
        return s
    s.text("As in the reference studies' tables: the best trial of each backbone at each unfreeze depth "
           "(0 = frozen backbone, k = top k layers, all; `default` = not set by the study, the trainer's default). "
           "Total parameters are per backbone, in the table above.")
    s.table(T.pretty(table.drop(columns=["total_params"], errors="ignore"), run))
    return s


def published_section(run: T.Run, evaluation: dict | None) -> Section:
    s = Section("Published results beside ours")
    try:
        from analysis import published
    except ImportError:
        s.text("analysis/published.py is not available in this installation.")
        return s
    try:
        key, protocol = published.study_key(run.path), published.run_protocol(run.path)
        s.text(published.reference_note(run.path) + ".")
    except ValueError as exc:
        s.text(f"No published comparison: {exc}")
        return s
    if key is None:
        return s
    ours, prefix, what = _ours_for_published(run, evaluation)
    if ours.empty:
        s.text("No result of ours to compare yet.")
        return s
    try:
        table = published.compare(ours, key, protocol, prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still matters
        s.text(f"Comparing with the published rows of {key} failed: {type(exc).__name__}: {exc}")
        return s
    s.text(f"Ours: {what}. `delta` = ours minus published, filled only under the same split protocol "
           f"({protocol}); other rows are published anchors under their own protocol, shown for scale.")
    s.table(_published_table(table))
    return s


def _ours_for_published(run: T.Run, evaluation: dict | None) -> tuple[pd.DataFrame, str, str]:
    """Our rows for published.compare: the test evaluation's best trial if there is one, else validation bests."""
    from analysis.plots import best_evaluated

    best = best_evaluated(evaluation)
    if best is not None and best.get("metrics"):
        row = {"trial_name": best.get("trial_name"), "split": evaluation.get("split", "test")}
        for m, v in best["metrics"].items():
            row[m] = v
            low_high = (best.get("ci") or {}).get(m)
            if low_high:
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low_high
        return pd.DataFrame([row]), "", f"the best trial on validation, scored on the {row['split']} split (95% CI)"
    table = T.best_per_backbone(run)
    table = table.assign(split="val")
    return table, "best_val_", ("each backbone's best trial on the validation split (no test evaluation yet: "
                                "published numbers are mostly on test, so read these as optimistic)")


def _published_table(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "ours": table["ours"], "split": table["split"], "metric": table["metric"],
        "ours value": [_ci_text(v, lo, hi) for v, lo, hi in zip(table["ours_value"], table["ours_ci_low"], table["ours_ci_high"])],
        "published": table["published_value"].map(lambda v: T.format_value(v, "published")),
        "delta": table["delta"].map(lambda v: "" if pd.isna(v) else f"{v:+.4f}"),
        "comparison": table["comparison"],
        "published model": table["published_model"].astype(str) + " (" + table["published_protocol"].astype(str) + ")",
        "published config": table["published_config"].map(lambda v: _short(v, 70)),
        "n": table["published_n"].map(lambda v: T.format_value(v, "n")),
        "citation": table["citation"],
    })
    return out


def _short(text, width: int) -> str:
    text = "" if text is None or (isinstance(text, float) and text != text) else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _ci_text(value, low, high) -> str:
    if value is None or pd.isna(value):
        return ""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def _ci_cell(value, low, high, digits: int = 4) -> str:
    """A value over its interval on a second line (``"0.875\\n[0.817, 0.933]"``): one cell, two lines in HTML,
    one line in Markdown."""
    if value is None or pd.isna(value):
        return ""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f}\n[{low:.{digits}f}, {high:.{digits}f}]"


def test_section(run: T.Run, record: dict | None, evaluation: dict | None, eval_error: str | None) -> Section:
    s = Section("Held-out test evaluation")
    if eval_error:
        s.text(f"The test evaluation requested with --evaluate failed: `{eval_error}`")
    if evaluation is None:
        val = read_test_evaluation(run, "val")
        if record is not None:
            s.text("test_evaluation.json logs a use of the test split but holds no finished evaluation.")
        s.text(f"Not run yet: `python -m analysis.evaluate {run.path}` (or `python -m analysis.report {run.path} "
               "--evaluate`). The search never loads the test split; only this evaluation does.")
        if latest_evaluation(val) is not None:
            s.text("A validation-split evaluation (val_evaluation.json) exists; it is not shown here: the trials "
                   "were chosen on that split, so its scores are optimistic.")
        _test_log(s, record)
        return s
    n = evaluation.get("n")
    level = evaluation.get("level", 0.95)
    split = evaluation.get("split", "test")
    s.text(f"The top {len(evaluation.get('trials') or [])} trial(s) by {T.label(evaluation.get('metric') or run.metric)}, "
           f"scored on the held-out {split} split ({n} images), evaluated "
           f"{evaluation.get('evaluated_at', '?')}. Under each {split} value: its {int(round(100 * level))}% percentile "
           f"bootstrap interval over {evaluation.get('n_boot')} resamples of the images (seed {evaluation.get('seed')}); "
           f"values carry the decimals one image can move.")
    for note in evaluation.get("notes") or []:
        s.text(f"Note: {note}")
    resolution = validation_resolution(run)
    if resolution:
        s.text(resolution)
    resolution = test_resolution(run, evaluation)
    if resolution:
        s.text(resolution)
    s.table(evaluation_table(evaluation, run))
    per_class = per_class_table(evaluation, run)
    if per_class is not None:
        from analysis.plots import best_evaluated

        s.sub(f"Per class: {best_evaluated(evaluation).get('trial_name', 'the best trial')} (best on validation) on {split}")
        s.table(per_class)
    _test_log(s, record)
    return s


def final_model_section(run: T.Run, evaluation: dict | None) -> Section:
    """analysis.evaluate's final model: each candidate beside the single best, calibration, operating point."""
    s = Section("Final model: ensemble, calibration, operating point")
    final = (evaluation or {}).get("final")
    if not final:
        s.text(f"Not evaluated yet: `python -m analysis.evaluate {run.path}` fits a temperature and a threshold on "
               "validation (`--ensemble K|auto`, `--tta flips|dihedral`, `--target-sensitivity S` add to it) and "
               "scores the final model on test.")
        return s
    split = evaluation.get("split", "test")
    d = decimals_for(1 / evaluation["n"]) if evaluation.get("n") else 4
    s.text(f"Final model: **{final['model']}** (final_model.json; used by search.predict). Temperature and threshold "
           f"are fitted on the validation split only; scores are on {split}, each over its bootstrap interval. ECE: "
           "top-label confidence, 15 equal-width bins. Brier: halved for two classes (scikit-learn's).")
    if (run.path / "model_card.md").is_file():
        s.text("The model card, with intended use, data, results at the operating point and limitations: "
               "[model_card.md](model_card.md).")
    rows = []
    for m in final.get("models") or []:
        c, metrics, ci = m["calibration"], m["metrics"], m["ci"]
        rows.append({"model": m["label"] + (" (final)" if m["label"] == final["model"] else ""),
                     T.label(f"{split}_balanced_accuracy"): _ci_cell(metrics.get("balanced_accuracy"),
                                                                    *ci["balanced_accuracy"][:2], digits=d),
                     T.label(f"{split}_auc"): _ci_cell(metrics.get("auc"), *ci["auc"][:2], digits=d),
                     "temperature": f"{c['temperature']:.3f}",
                     "ECE before / after": f"{c['before']['ece']:.4f} / {c['after']['ece']:.4f}",
                     "Brier before / after": f"{c['before']['brier']:.4f} / {c['after']['brier']:.4f}"})
    s.table(pd.DataFrame(rows))
    chosen = next((m for m in final.get("models") or [] if m["label"] == final["model"]), None) or {}
    op = chosen.get("operating_point")
    if op:
        from analysis.operating_point import BINARY_METRICS, rule_text

        at, ci = op["at_threshold"], op["ci"]
        s.sub(f"Operating point for {op['class']}: threshold {op['value']:.4f} ({rule_text(op)})")
        s.table(pd.DataFrame([{"": split, **{T.label(m): _ci_cell(at[m], *ci[m][:2], digits=d) for m in BINARY_METRICS},
                               "TP / FN / FP / TN": f"{at['tp']} / {at['fn']} / {at['fp']} / {at['tn']}"},
                              {"": "validation", **{T.label(m): f"{op['validation'][m]:.{d}f}" for m in BINARY_METRICS},
                               "TP / FN / FP / TN": " / ".join(str(op["validation"].get(k, "")) for k in
                                                               ("tp", "fn", "fp", "tn"))}]))
    if chosen.get("one_vs_rest"):
        s.sub("Per class, one vs rest at the argmax")
        s.table(pd.DataFrame([{"class": c, T.label("sensitivity"): _ci_cell(o["sensitivity"], *o["ci"]["sensitivity"][:2], digits=d),
                               T.label("specificity"): _ci_cell(o["specificity"], *o["ci"]["specificity"][:2], digits=d)}
                              for c, o in chosen["one_vs_rest"].items()]))
    if final.get("reliability_plot") and (run.path / final["reliability_plot"]).is_file():
        s.plot(Plot("reliability", "Reliability diagram", run.path / final["reliability_plot"],
                    "before and after temperature scaling"))
    return s


def curves_section(run: T.Run, evaluation: dict | None) -> Section:
    """The final model's ROC and precision-recall curves on test (analysis.curves), with the operating point."""
    from analysis.curves import curve_plots

    s = Section("ROC and precision-recall curves")
    if not (evaluation or {}).get("final"):
        s.text(f"Not drawn yet: the curves are the final model's on the test split, from `python -m "
               f"analysis.evaluate {run.path}` (test_predictions.parquet and test_evaluation.json).")
        return s
    plots, curves, info = curve_plots(run.path, evaluation, run.path / PLOTS_DIR)
    if not curves:
        for p in plots:
            s.plot(p)
        return s
    d = decimals_for(1 / info["n"]) if info.get("n") else 4
    pct = int(round(100 * info["level"]))
    op = info["threshold"]
    s.text(f"{info['model']} on the {info['split']} split ({info['n']} images), its calibrated probabilities "
           f"(T = {info['temperature']:.3f}, the ones the threshold applies to); "
           + ("the positive class against the rest" if len(info["classes"]) == 2 else "each class against the rest")
           + f". Bands and intervals: {pct}% percentile bootstrap over the evaluation's own {info['n_boot']} "
           f"resamples (seed {info['seed']}), so they pair with the tables above. "
           + (f"The star is the threshold {op['value']:.4f} chosen on validation, where it falls on the "
              f"{info['split']} images." if op else "Circles: the argmax decision, one class against the rest."))
    rows = []
    for c in curves:
        row = {"class": c.name, "positive / negative": f"{c.n_positive} / {c.n_negative}",
               T.label(f"{info['split']}_auc"): _ci_cell(c.auc, *c.auc_ci, digits=d),
               T.label(f"{info['split']}_average_precision"): _ci_cell(c.average_precision, *c.average_precision_ci,
                                                                      digits=d)}
        if c.point:
            row["marked point: sensitivity / specificity"] = (f"{c.point['tpr']:.{d}f} / {1 - c.point['fpr']:.{d}f}"
                                                               f"\n({'threshold' if c.point['kind'] == 'threshold' else 'argmax'})")
        rows.append(row)
    s.table(pd.DataFrame(rows))
    if len(curves) == 1:  # one panel each: ROC and precision-recall side by side
        s.row(plots)
    else:
        for p in plots:
            s.plot(p)
    return s


EXPLAIN_TITLE = "Where the model looks"


def explain_part(run: T.Run, evaluation: dict | None) -> Section:
    """The Grad-CAM panel: ``analysis.explain.explain_section(run, evaluation)`` when that module is there.

    The report works without it (an older installation): the section then says so.
    """
    s = Section(EXPLAIN_TITLE)
    # ---- Grad-CAM panel (analysis/explain.py, its own module): its Section's blocks go here
    try:
        from analysis.explain import explain_section
    except ImportError:
        s.text("Not available in this installation (analysis/explain.py, the Grad-CAM panel, is missing).")
        return s
    try:
        made = explain_section(run, evaluation)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still matters
        s.text(f"Not drawn: {type(exc).__name__}: {exc}")
        return s
    s.blocks = list(getattr(made, "blocks", None) or [])
    if not s.blocks:
        s.text("Not drawn: analysis.explain returned nothing to show.")
    return s


def _test_log(s: Section, record: dict | None) -> None:
    log = (record or {}).get("test_split_log") or []
    if log:
        when = ", ".join(str(e.get("test_split_used_at", "?")) for e in log[-5:])
        s.text(f"The test split has been read {len(log)} time(s) (test_split_log in test_evaluation.json; "
               f"latest: {when}). Each look at the test set makes it a little less held out.")


TEST_TABLE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def evaluation_table(evaluation: dict, run: T.Run) -> pd.DataFrame:
    """One row per evaluated trial: rank, trial, its validation score, then each test metric over its interval.

    At most 8 columns, so it fits a 1280 px window: per-class recall is in the
    per-class table, except the positive class's (binary studies).
    """
    split = evaluation.get("split", "test")
    positive = evaluation.get("positive_class")
    shown = [*TEST_TABLE_METRICS, *([f"recall_{positive}"] if positive else [])]
    metric = evaluation.get("metric") or run.metric
    score_column = f"best_{metric}"
    val_step = image_step(metric, split_class_counts(run, "val"))
    val_digits = decimals_for(val_step[0]) if val_step else 4
    n = evaluation.get("n")
    test_digits = decimals_for(1 / n) if n else 4
    rows = []
    for t in sorted(evaluation.get("trials") or [], key=lambda t: t.get("rank", 0)):
        metrics, ci = t.get("metrics") or {}, t.get("ci") or {}
        value = t.get(score_column)
        row = {"rank": t.get("rank"), "trial": t.get("trial_name"),
               T.label(score_column): "" if value is None or pd.isna(value) else f"{value:.{val_digits}f}"}
        for m in shown:
            low, high = (ci.get(m) or [None, None])[:2]
            row[T.label(f"{split}_{m}")] = _ci_cell(metrics.get(m), low, high, digits=test_digits)
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_table(evaluation: dict, run: T.Run | None = None) -> pd.DataFrame | None:
    """Precision, recall and F1 per class for the best trial, each over its interval, and the support."""
    from analysis.plots import best_evaluated

    best = best_evaluated(evaluation)
    if not best or not best.get("class_names"):
        return None
    metrics, ci = best.get("metrics") or {}, best.get("ci") or {}
    report = best.get("classification_report") or {}
    n = evaluation.get("n")
    digits = decimals_for(1 / n) if n else 4
    rows = []
    for c in best["class_names"]:
        row = {"class": c}
        for m in ("precision", "recall", "f1"):
            low, high = (ci.get(f"{m}_{c}") or [None, None])[:2]
            row[T.label(m)] = _ci_cell(metrics.get(f"{m}_{c}"), low, high, digits=digits)
        support = (report.get(c) or {}).get("support")
        row["images"] = "" if support is None else str(int(support))
        rows.append(row)
    return pd.DataFrame(rows)


def plots_section(plots: dict[str, list[Plot]]) -> Section:
    s = Section("Plots")
    titles = {"learning_curves": "Learning curves", "hyperparameters": "Hyperparameters",
              "importance": "Parameter importance", "confusion": "Confusion matrix (test)",
              "efficiency": "Best so far vs compute"}
    for group, items in plots.items():
        s.sub(titles.get(group, group))
        for p in items:
            s.plot(p)
    return s


def efficiency_section(run: T.Run) -> Section:
    s = Section("Search efficiency")
    b = T.asha_budget(run)
    curve = T.best_so_far(run)
    lines = [
        f"- epochs run: **{b['epochs_run']}** of {b['full_epochs']} ({b['trials']} trials x {b['max_epochs']} epochs)"
        + (f"; the plan was {b['planned_epochs']} ({b['num_samples']} trials)" if b["planned_epochs"] != b["full_epochs"] else ""),
        f"- saved by ASHA: **{b['saved_by_asha']} epochs** ({_pct(b['saved_fraction'])} of {b['full_epochs']}), "
        f"about {b['saved_s_estimate'] / 60:.1f} min of trial time at each stopped trial's own pace",
        "- stopped trials by epochs run: " + (", ".join(f"{n} after {e}" for e, n in b["stopped_after_epochs"].items()) or "none"),
    ]
    if b["lost_to_errors"]:
        lines.append(f"- not run because trials errored: {b['lost_to_errors']} epochs")
    if b["still_running"]:
        lines.append(f"- still to run for running trials: at most {b['still_running']} epochs")
    lines.append(f"- compute used: {b['compute_s'] / 60:.1f} min of trial wall time (summed over trials)")
    found = curve[curve["new_best"]]
    if len(found):
        last = found.iloc[-1]
        total = curve["cumulative_s"].iloc[-1]
        lines.append(f"- the final best ({T.format_value(last['best_so_far'], run.score_column)}, {last.get('trial_name')}) "
                     f"was reached after {last['cumulative_s'] / 60:.1f} min, {_pct(last['cumulative_s'] / total if total else float('nan'))} "
                     f"of the compute; trial {int(curve.index[curve['new_best']][-1]) + 1} of {len(curve)} to end")
    s.text("\n".join(lines))
    s.text(f"Best so far, trial by trial, in {T.order_note(curve.attrs.get('order'))}; cumulative compute is the "
           "sum of trial wall times in that order (trials ran in parallel, so it exceeds the study's wall time):")
    shown = curve.copy()
    if len(shown) > LONG_TABLE:  # a long study: the trials that improved the best, and the last one
        keep = shown["new_best"].copy()
        keep.iloc[-1] = True
        s.text(f"({len(shown)} trials: only those that set a new best, and the last, are listed.)")
        shown = shown[keep]
    shown["new_best"] = shown["new_best"].map({True: "new best", False: ""})
    s.table(T.pretty(shown, run))
    return s


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def all_trials_section(run: T.Run) -> Section:
    s = Section("All trials")
    if run.board.empty:
        s.text("No trial yet.")
        return s
    s.text(f"Best first by {T.label(run.metric)} (ties: lower validation loss); unscored trials last.")
    s.table(T.pretty(T.all_trials(run), run))
    return s


def errored_section(run: T.Run) -> Section:
    s = Section("Errored trials")
    errored = T.errored_trials(run)
    if errored.empty:
        s.text("None.")
        return s
    s.text(f"{len(errored)} trial(s) errored; the line below is the exception from each trial's Ray error file.")
    s.table(T.pretty(errored, run))
    return s


# ---------------------------------------------------------------- rendering

def render_markdown(header: dict, sections: list[Section], run: T.Run) -> str:
    out = [f"# {header['title']}", "", state_line(header["state"]), "",
           f"_Generated {header['generated']} from `{run.path}`._", ""]
    if header.get("model_card"):
        out += [MODEL_CARD_LINE, ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for kind, value in section.blocks:
            if kind == "text":
                out += [value, ""]
            elif kind == "h3":
                out += [f"### {value}", ""]
            elif kind == "table":
                out += [T.to_markdown(value) if len(value) else "_(none)_", ""]
            elif kind in ("plot", "row"):
                for plot in value if kind == "row" else [value]:
                    out += _plot_markdown(plot, run)
    return "\n".join(out).rstrip() + "\n"


MODEL_CARD_LINE = ("**Model card**: [model_card.md](model_card.md), beside this report (intended use, data, results at "
                   "the operating point, calibration, limitations; `python -m analysis.model_card` rewrites it).")

# Tables fit the page: headers wrap between words, an interval sits under its value (see _table_html);
# a table still wider than the page (many hyperparameters) scrolls rather than spill.
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.15em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2;white-space:normal;min-width:3.5em;max-width:11em;font-weight:600}
td{white-space:nowrap}td.text{white-space:normal;min-width:12em}th.l,td.l{text-align:left}
td .ci{color:#666;font-size:.86em}
td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.9em}
.state{padding:.5em .8em;border-radius:4px;background:#eef7ee;border:1px solid #9c9}
.state.partial{background:#fff6e0;border-color:#e0b040}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption,.note{color:#555;font-size:.88em}
.skipped{color:#8a5a00}
.row{display:flex;gap:1em;align-items:flex-start}.row figure{flex:1 1 0;min-width:0}
"""


def render_html(header: dict, sections: list[Section], run: T.Run) -> str:
    state = header["state"]
    body = [f"<h1>{html.escape(header['title'])}</h1>",
            f"<p class=\"state{' partial' if state['partial'] else ''}\">{_inline(state_line(state))}</p>",
            f"<p class=\"note\">Generated {html.escape(header['generated'])} from <code>{html.escape(str(run.path))}</code>.</p>",
            *([f"<p>{_inline(MODEL_CARD_LINE)}</p>"] if header.get("model_card") else []),
            "<nav><ol>" + "".join(f"<li><a href=\"#{_anchor(s.title)}\">{html.escape(s.title)}</a></li>" for s in sections)
            + "</ol></nav>"]
    for section in sections:
        body.append(f"<h2 id=\"{_anchor(section.title)}\">{html.escape(section.title)}</h2>")
        for kind, value in section.blocks:
            if kind == "text":
                body.append(_text_html(value))
            elif kind == "h3":
                body.append(f"<h3>{html.escape(value)}</h3>")
            elif kind == "table":
                body.append(_table_html(value) if len(value) else "<p><em>(none)</em></p>")
            elif kind == "plot":
                body.append(_plot_html(value))
            elif kind == "row":
                body.append("<div class=\"row\">" + "".join(_plot_html(p) for p in value) + "</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(header['title'])}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _plot_markdown(plot: Plot, run: T.Run) -> list[str]:
    if plot.path is None:
        return [f"**{plot.title}**: {plot.note}", ""]
    rel = plot.path.relative_to(run.path) if plot.path.is_relative_to(run.path) else plot.path
    return [f"![{plot.title}]({rel.as_posix()})", ""] + ([f"_{plot.note}_", ""] if plot.note else [])


def _plot_html(plot: Plot) -> str:
    if plot.path is None:
        return f"<p class=\"skipped\"><strong>{html.escape(plot.title)}</strong>: {_inline(plot.note)}</p>"
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    caption = html.escape(plot.note) if plot.note else ""
    return (f"<figure><img alt=\"{html.escape(plot.title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{caption}</figcaption></figure>")


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _inline(text: str) -> str:
    """The little Markdown the report's text uses: `code`, **bold**, [text](relative link); everything else escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\[([^\]]+)\]\(([\w./-]+)\)", r'<a href="\2">\1</a>', text)
    return text


TEXT_CELL = 48  # a cell longer than this (a description, an error line, a citation) may wrap
_NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?%?( / [-+]?[\d.,]+)*")


def _table_html(frame: pd.DataFrame) -> str:
    """An HTML table of text cells: headers wrap, a cell's second line (an interval) sits under its value;
    numbers align right, words left."""
    def text(value) -> str:
        return "" if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)) else str(value)

    cells = [[text(v) for v in row] for row in frame.itertuples(index=False)]
    words = [any(c[j] and not _NUMBER.fullmatch(c[j].split("\n")[0]) for c in cells) for j in range(frame.shape[1])]
    head = "".join(("<th class=\"l\">" if w else "<th>") + f"{html.escape(str(c))}</th>" for c, w in zip(frame.columns, words))
    rows = []
    for row in cells:
        out = []
        for value, word in zip(row, words):
            first, *more = value.split("\n")
            inner = html.escape(first) + "".join(f"<br><span class=\"ci\">{html.escape(m)}</span>" for m in more)
            kind = " ".join(k for k, on in (("l", word), ("text", len(first) > TEXT_CELL)) if on)
            out.append(f"<td class=\"{kind}\">{inner}</td>" if kind else f"<td>{inner}</td>")
        rows.append("<tr>" + "".join(out) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _text_html(text: str) -> str:
    lines = text.splitlines()
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return "<p>" + "<br>".join(_inline(line) for line in lines) + "</p>"


if __name__ == "__main__":
    sys.exit(main())
