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

import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import efficiency as E
from analysis import tables as T
from analysis.document import Section, render_html, render_markdown
from analysis.errors import EvaluateError
from analysis.headline import headline, headline_text
from analysis.intended_use import intended_use
from analysis.evaluate import evaluate_top_k, summary
from analysis.options import add_final_model_arguments, check_final_model_arguments, final_model_options
from analysis.figures import Plot, figure, save
from analysis.files import MODEL_CARD, PLOTS_DIR, REPORT_HTML, REPORT_MD, shown_command, shown_path, write_file
from analysis.plots import make_all
from analysis.records import latest_evaluation, read_evaluations
from analysis.splits import image_paths
from analysis.subgroups import subgroup_section
from search.argtypes import ArgumentParser, positive_int
from search.budget import budget_text, describe_budget
from analysis.report_evaluation import (curves_section, decimals_for, explain_part, final_model_section, image_step,
                                        published_section, split_class_counts, test_section, validation_resolution)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ANSWER_TITLE = "The answer in short"
LONG_TABLE = 40  # trial-by-trial tables longer than this are shortened
SECTIONS = (
    ANSWER_TITLE,
    "Study summary",
    "Best trial per backbone",
    "Backbone x unfreeze depth",
    "Published results beside ours",
    "Held-out test evaluation",
    "Final model: ensemble, calibration, operating point",
    "ROC and precision-recall curves",
    "Results by subgroup",
    "Where the model looks",
    "Near-duplicate audit",
    "Plots",
    "Search efficiency",
    "All trials",
    "Errored trials",
)


def parse_args(argv):
    parser = ArgumentParser(
        prog="python -m analysis.report", allow_abbrev=False,
        description="Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html from a study's results folder.",
        epilog="Example: python -m analysis.report runs/quickstart --evaluate")
    parser.add_argument("run_dir", help="a study's results folder, e.g. runs/quickstart")
    parser.add_argument("--evaluate", action="store_true",
                        help="first evaluate the top-k trials on the held-out test split (analysis.evaluate)")
    parser.add_argument("--top-k", type=positive_int, default=3, help="trials to evaluate with --evaluate (default: 3)")
    add_final_model_arguments(parser)  # as analysis.evaluate takes them, for --evaluate
    args = parser.parse_args(argv)
    check_final_model_arguments(parser, args)
    given = [name for name, value in final_model_options(args).items() if value not in (None, False) and name != "data_dir"]
    if given and not args.evaluate:
        parser.error(f"--{given[0].replace('_', '-')} chooses the final model, which only --evaluate fits; "
                     "add --evaluate (or run python -m analysis.evaluate first)")
    return args


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
        eval_error = run_evaluation(run_dir, args.top_k, **final_model_options(args))
        if eval_error:
            print(f"warning: test evaluation failed: {eval_error}", file=sys.stderr)
            code = EXIT_FAILED
    try:
        md, html_path = write_report(run_dir, eval_error=eval_error, data_dir=args.data_dir)
    except T.AnalysisError as exc:  # a file that cannot be written (a full disk): nothing partial is left
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report: {md}\n        {html_path}")
    return code


def run_evaluation(run_dir: Path, k: int, **options) -> str | None:
    """Run analysis.evaluate.evaluate_top_k (``options``: the final model's); the error's text if it fails, else None."""
    try:
        table = evaluate_top_k(run_dir, k=k, **options)
    except Exception as exc:  # noqa: BLE001 - reported in the report and on stderr
        return f"{type(exc).__name__}: {exc}"
    print(summary(Path(run_dir).expanduser().resolve(), "test", table) + "\n")  # as analysis.evaluate prints it
    return None


def write_report(run_dir: str | Path, eval_error: str | None = None, data_dir: str | None = None) -> tuple[Path, Path]:
    """Build every section and write report.md and report.html into ``run_dir`` (``data_dir``: where the dataset
    now lives, if it moved, for the panels that show images)."""
    run = T.load_run(run_dir, data_dir)
    sections, header = build(run, eval_error=eval_error)
    md_path, html_path = run.path / REPORT_MD, run.path / REPORT_HTML
    write_file(md_path, render_markdown(header, sections, run.path).encode("utf-8"))
    write_file(html_path, render_html(header, sections, run.path).encode("utf-8"))
    return md_path, html_path


# ---------------------------------------------------------------- content

def build(run: T.Run, eval_error: str | None = None) -> tuple[list[Section], dict]:
    state = T.run_state(run)
    record = read_evaluations(run.path)
    evaluation = latest_evaluation(record)
    plots = make_all(run, run.path / PLOTS_DIR, evaluation)
    header = {"title": f"Study report: {run.name}", "state": state, "state_text": state_line(state),
              "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model_card": (run.path / MODEL_CARD).is_file()}
    sections = [
        answer_section(run, record, evaluation),
        summary_section(run, state),
        best_backbone_section(run),
        unfreeze_section(run),
        published_section(run, evaluation),
        test_section(run, record, evaluation, eval_error),
        final_model_section(run, evaluation),
        curves_section(run, evaluation),
        subgroup_section(run, evaluation),
        explain_part(run, evaluation),
        near_duplicates_section(run),
        plots_section(plots),
        efficiency_section(run),
        all_trials_section(run),
        errored_section(run),
    ]
    assert [s.title for s in sections] == list(SECTIONS)
    return sections, header


def answer_section(run: T.Run, record: dict | None, evaluation: dict | None) -> Section:
    """The first screen: the answer (``analysis.headline``), or what to run to get one."""
    s = Section(ANSWER_TITLE)
    use = intended_use(run.study)
    if use["warning"]:
        s.text(f"**{use['warning'].capitalize()}.** The images of this study are generated "
               f"({(run.study.get('dataset') or {}).get('loader')} loader).")
    if use["intended_use"]:
        s.text(sentence(f"Intended use: {use['intended_use']}")
               + (" " + sentence(f"Not for: {use['not_for']}") if use["not_for"] else ""))
    final = latest_evaluation(record, final=True)
    facts = headline(run.study, final, record) if final else None
    if facts is None:
        s.text("No final model has been evaluated on held-out images yet, so there is no answer to give: run "
               f"`python -m analysis.report {shown_path(run.path)} --evaluate` (add `--target-sensitivity 0.95` "
               "for a screening threshold). The search's validation scores below chose the trials; they are "
               "optimistic as an estimate.")
        return s
    s.text(headline_text(facts))
    if facts.rule == "Youden's J on validation":
        d = decimals_for(1 / facts.n) if facts.n else 3
        gave = (f" It gave sensitivity {facts.validation_sensitivity:.{d}f} on validation and "
                f"{facts.sensitivity[0]:.{d}f} on {facts.split}." if facts.validation_sensitivity is not None else "")
        s.text(f"The threshold is the default (Youden's J): it weighs a missed {facts.positive} the same as a false "
               f"alarm.{gave} For screening, ask for the sensitivity you need: `--target-sensitivity 0.95` "
               "(analysis.evaluate or analysis.report --evaluate).")
    return s


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
        ("study file", f"{shown_path(run.record.get('study_file', ''))} (sha256 {str(run.record.get('study_file_sha256', ''))[:12]})"),
        ("dataset", _dataset_text(ds)),
        ("split protocol", _split_text(ds)),
        ("classes", ", ".join(T.class_names(run)) + (f" (positive: {ds.get('positive_class')})" if ds.get("positive_class") else "")),
        ("metric", f"{T.label(run.metric)} ({run.metric}, {'higher' if run.mode == 'max' else 'lower'} is better)"),
        ("budget", describe_budget(run.num_samples, run.max_epochs, study.get("time_limit_s"))),
        ("ASHA", f"grace period {study.get('grace_period')} epoch(s), reduction factor {study.get('reduction_factor')}"),
        ("resources", f"{study.get('max_concurrent')} trials at a time, {study.get('cpus_per_trial')} CPU and "
                      f"{study.get('gpus_per_trial')} GPU per trial"),
        ("seed", str(study.get("seed"))),
        ("fixed hyperparameters", ", ".join(f"{k}={v}" for k, v in (study.get("fixed") or {}).items()) or "none"),
        ("trials by status", ", ".join(f"{k} {v}" for k, v in counts.items())
         + (f" (of {run.num_samples} planned)" if run.num_samples is not None else "")),
        ("started", str(state["started_at"] or "unknown")),
    ]
    if state["resumed_at"]:
        rows.append(("resumed", ", ".join(state["resumed_at"])))
    ends = E.ray_end_times(run)
    if ends:
        last = datetime.fromtimestamp(max(ends.values()), timezone.utc).isoformat(timespec="seconds")
        rows.append(("last trial result", f"{last} (Ray's trial result.json)"))
    if state["updated_at"]:
        rows.append(("leaderboard last written", f"{state['updated_at']} ({_ago(state['updated_ago_s'])} ago)"))
    if state["finish_marker"]:
        rows.append(("finished", str(state["finish_marker"])))
    if "stopped_because" in run.record:
        rows.append(("end", budget_text(run.record, run.num_samples, study.get("time_limit_s"))))
    if run.record.get("smoke"):
        rows.append(("smoke run", "yes (--smoke: tiny budget and data subset)"))
    if run.record.get("skipped_images"):
        rows.append(("skipped images", f"{len(run.record['skipped_images'])} unreadable (listed in study.json)"))
    versions = run.record.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    rows.append(("command", shown_command(str(run.record.get("command", "")))))
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
    from trainables.near_duplicates import contamination, recorded_settings

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
    s.plot(near_duplicates_panel(crossing.head(NEAR_DUPLICATES_PANEL), run.path / PLOTS_DIR, run.path, run.data_dir))
    return s


def near_duplicates_panel(pairs: pd.DataFrame, out_dir: Path, run_dir: Path, data_dir: str | None = None) -> Plot:
    """The pairs side by side, one row each, titled with split, label and distance; skipped if the images are gone."""
    from trainables.data import eight_bit, open_image

    title = "Closest near-duplicate pairs across splits"
    try:  # the names as recorded -> where they are on this machine
        pairs = pairs.assign(path_a=image_paths(run_dir, pairs["path_a"], data_dir),
                             path_b=image_paths(run_dir, pairs["path_b"], data_dir))
    except EvaluateError as exc:
        return Plot("near_duplicates", title, None, f"not drawn: {exc}")
    missing = [p for p in list(pairs["path_a"]) + list(pairs["path_b"]) if not Path(p).is_file()]
    if missing:
        return Plot("near_duplicates", title, None, f"not drawn: {len(missing)} image(s) are no longer at their "
                                                     f"recorded paths (e.g. {missing[0]})")
    fig = figure(figsize=(5.0, 2.3 * len(pairs)))
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
    return Plot("near_duplicates", title, save(fig, out_dir, "near_duplicates"),
                "each row is one pair: left and right differ in split; the distance is the pHash's (or the "
                "embedding similarity)")


def _dataset_text(ds: dict) -> str:
    parts = [str(ds.get("loader", "?"))]
    if ds.get("path"):
        parts.append(f"at {shown_path(ds['path'])}")
    parts.append(f"{ds.get('image_size')} px")
    if ds.get("options"):
        parts.append("options " + ", ".join(f"{k}={v}" for k, v in ds["options"].items()))
    return ", ".join(parts)


def _split_text(ds: dict) -> str:
    text = str(ds.get("split", "?"))
    if ds.get("split_options"):
        text += " (" + ", ".join(f"{k}={v}" for k, v in ds["split_options"].items()) + ")"
    return text + f", split seed {ds.get('seed', 0)}"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- resolution: what one image is worth

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
    b = E.asha_budget(run)
    curve = E.best_so_far(run)
    lines = [
        f"- epochs run: **{b['epochs_run']}** of {b['full_epochs']} ({b['trials']} trials x {b['max_epochs']} epochs)"
        + (f"; the plan was {b['planned_epochs']} ({b['num_samples']} trials)"
           if b["planned_epochs"] not in (None, b["full_epochs"]) else ""),
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
    s.text(f"Best so far, trial by trial, in {E.order_note(curve.attrs.get('order'))}; cumulative compute is the "
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

# Tables fit the page: headers wrap between words, an interval sits under its value (see _table_html);
# a table still wider than the page (many hyperparameters) scrolls rather than spill.
if __name__ == "__main__":
    sys.exit(main())


def sentence(text: str) -> str:
    """``text`` ending as a sentence ends: a user's field may or may not bring its full stop."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."
