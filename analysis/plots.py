"""PNG plots of a results folder (matplotlib, Agg; no pyplot state, no display needed).

- ``learning_curves``: every trial's validation metric per epoch; an ``x`` where ASHA stopped a trial;
- ``hyperparameter_plots``: one plot per searched parameter, the trial's best score against its value
  (categorical parameters as strip plots, learning rates on a log axis); a best value at the edge
  of the sampled range is called out, since the space may be too narrow there;
- ``importance_plot``: Optuna's parameter importances (``optuna.importance.get_param_importances``)
  on an in-memory study rebuilt from the finished trials;
- ``confusion_plot``: the best trial's confusion matrix on the held-out test split (from test_evaluation.json);
- ``best_so_far_plot``: the best score so far against cumulative compute.

Each returns a ``Plot``: its file, title and a note; a plot that cannot be drawn
returns ``path=None`` and a note saying why, instead of raising. A PNG that
cannot be written (a full disk) raises ``AnalysisError``, leaving no partial file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import Plot, figure, save
from analysis.records import best_evaluated, final_evaluated, latest_evaluation, read_evaluations
from analysis.efficiency import asha_budget, best_so_far, order_note
from analysis.tables import Run, category_order, label, parameter_kind, scored, searched_parameters

STATUS_MARKERS = {"finished": "o", "stopped": "x", "running": "s", "interrupted": "s", "errored": "v"}
MIN_TRIALS_FOR_IMPORTANCE = 8  # finished trials below which no importance chart is drawn, only a sentence
EDGE_FRACTION = 0.1  # a best value in the outer 10% of the sampled range is "at the edge"


def _colours(values) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(values)}


def _backbones(run: Run) -> list[str]:
    if "backbone" not in run.board.columns:
        return ["model"]
    ranked = scored(run)
    order = list(dict.fromkeys(ranked["backbone"].dropna().astype(str)))
    rest = [b for b in run.board["backbone"].dropna().astype(str).unique() if b not in order]
    return order + sorted(rest) or ["model"]


def _backbone_of(run: Run) -> pd.Series:
    if "backbone" not in run.board.columns:
        return pd.Series("model", index=run.board.index)
    return run.board["backbone"].astype("object").where(run.board["backbone"].notna(), "model").astype(str)


def _metric_label(run: Run) -> str:
    return f"{label(run.metric)} ({'higher' if run.mode == 'max' else 'lower'} is better)"


# ---------------------------------------------------------------- learning curves

def learning_curves(run: Run, out_dir: Path) -> Plot:
    """The study's validation metric per epoch for every trial, coloured by backbone."""
    title = f"Learning curves: {label(run.metric)} per epoch"
    epochs = run.epochs
    if epochs.empty or not {"trial_id", "epoch", run.metric} <= set(epochs.columns):
        return Plot("learning_curves", title, None, "skipped: epochs.parquet has no epochs yet")
    board = run.board.set_index("trial_id")
    backbone = _backbone_of(run).set_axis(run.board["trial_id"])
    colours = _colours(_backbones(run))
    fig = figure()
    ax = fig.add_subplot()
    stopped_n = 0
    for trial_id, rows in epochs.sort_values("epoch").groupby("trial_id", sort=False):
        bb = backbone.get(trial_id, "model")
        status = board["status"].get(trial_id, "running") if trial_id in board.index else "running"
        colour = colours.get(bb, "grey")
        style = "--" if status == "errored" else "-"
        ax.plot(rows["epoch"], rows[run.metric], style, color=colour, alpha=0.6, linewidth=1.2)
        last = rows.iloc[-1]
        if status == "stopped":
            stopped_n += 1
            ax.plot([last["epoch"]], [last[run.metric]], "x", color=colour, markersize=9, markeredgewidth=2)
        elif status == "errored":
            ax.plot([last["epoch"]], [last[run.metric]], "v", color=colour, markersize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=b) for b, c in colours.items()]
    handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="stopped by ASHA"))
    if (run.board["status"] == "errored").any():
        handles.append(Line2D([], [], color="black", marker="v", linestyle="--", label="errored"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_metric_label(run))
    ax.set_xlim(0.8, max(run.max_epochs, int(epochs["epoch"].max())) + 0.2)
    if run.max_epochs <= 30:
        ax.set_xticks(range(1, max(run.max_epochs, int(epochs["epoch"].max())) + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title)
    note = f"{epochs['trial_id'].nunique()} trials; x marks the epoch after which ASHA stopped a trial ({stopped_n})"
    return Plot("learning_curves", title, save(fig, out_dir, "learning_curves"), note)


# ---------------------------------------------------------------- hyperparameters

def hyperparameter_plots(run: Run, out_dir: Path) -> list[Plot]:
    """One plot per searched parameter: each trial's best score against the parameter's value."""
    ranked = scored(run)
    params = searched_parameters(run)
    if ranked.empty:
        return [Plot("hparams", "Hyperparameters", None, "skipped: no trial has a score yet")]
    if not params:
        return [Plot("hparams", "Hyperparameters", None, "skipped: no hyperparameter varies across trials")]
    return [_one_parameter(run, ranked, p, out_dir) for p in params]


def _one_parameter(run: Run, ranked: pd.DataFrame, param: str, out_dir: Path) -> Plot:
    score = run.score_column
    title = f"{label(score)} vs {label(param)}"
    rows = ranked[ranked[param].notna()]
    unset = len(ranked) - len(rows)
    kind = parameter_kind(run.board[param], param)
    colours = _colours(_backbones(run))
    best = rows.iloc[0] if len(rows) else None
    fig = figure((6.0, 3.8))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    note_parts = []
    if kind == "categorical":
        cats = category_order(run.board[param].dropna().tolist())
        labels = [str(c) for c in cats]
        pos = {str(c): i for i, c in enumerate(cats)}
        x = rows[param].astype(str).map(pos).astype(float) + rng.uniform(-0.15, 0.15, len(rows))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.6, len(labels) - 0.4)
    else:
        x = rows[param].astype(float)
        if kind == "log":
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    for status, marker in STATUS_MARKERS.items():
        sel = (rows["status"] == status).to_numpy()
        if not sel.any():
            continue
        c = [colours.get(b, "grey") for b in _backbone_of(run).loc[rows.index[sel]]]
        ax.scatter(np.asarray(x)[sel], rows[score].to_numpy()[sel], c=c, marker=marker, s=40, alpha=0.8,
                   linewidths=1.5 if marker == "x" else 0.5, edgecolors=None if marker == "x" else "black")
    if best is not None:
        bx = float(np.asarray(x)[0])
        ax.scatter([bx], [best[score]], s=220, facecolors="none", edgecolors="red", linewidths=1.8)
        if kind != "categorical":
            edge = _edge(rows[param].astype(float), float(best[param]), log=kind == "log")
            if edge:
                note_parts.append(f"best value {best[param]:.4g} is at the {edge} edge of the sampled range "
                                  f"[{rows[param].min():.4g}, {rows[param].max():.4g}]: consider widening the space")
                ax.axvline(float(best[param]), color="red", linestyle=":", alpha=0.7)
        else:
            cats_str = [str(c) for c in category_order(run.board[param].dropna().tolist())]
            if len(cats_str) > 2 and _numeric_cats(cats_str) and str(best[param]) in (cats_str[0], cats_str[-1]):
                note_parts.append(f"best value {best[param]} is the {'lowest' if str(best[param]) == cats_str[0] else 'highest'} "
                                  "of the ordered choices")
    ax.set_xlabel(label(param) + (" (log scale)" if kind == "log" else ""))
    ax.set_ylabel(label(score))
    ax.grid(alpha=0.3)
    ax.legend(handles=_legend(colours, set(rows["status"])), fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    if best is not None and note_parts:
        ties = int((rows[score] == best[score]).sum())
        if ties > 1:
            note_parts.append(f"{ties} trials share the best score (ties go to the lower validation loss), "
                              "so read the edge with care")
    if unset:
        note_parts.append(f"{unset} scored trial(s) do not set {param} (a conditional parameter)")
    return Plot(f"hparam_{_safe(param)}", title, save(fig, out_dir, f"hparam_{_safe(param)}"), "; ".join(note_parts))


def _legend(colours: dict, statuses: set) -> list:
    """Colour = backbone, marker = status, red ring = the best trial."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=b) for b, c in colours.items()]
    handles += [Line2D([], [], color="dimgrey", marker=m, linestyle="", label=s)
                for s, m in STATUS_MARKERS.items() if s in statuses]
    handles.append(Line2D([], [], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="red",
                          linestyle="", label="best"))
    return handles


def _numeric_cats(cats: list[str]) -> bool:
    try:
        [float(c) for c in cats[:-1]]
        return True
    except ValueError:
        return False


def _edge(values: pd.Series, best: float, *, log: bool) -> str | None:
    """``low``/``high`` if ``best`` lies in the outer EDGE_FRACTION of the sampled range."""
    lo, hi = float(values.min()), float(values.max())
    if values.nunique() < 3 or hi <= lo:
        return None
    if log and lo > 0:
        lo, hi, best = math.log10(lo), math.log10(hi), math.log10(best)
    where = (best - lo) / (hi - lo)
    if where <= EDGE_FRACTION:
        return "low"
    if where >= 1 - EDGE_FRACTION:
        return "high"
    return None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)


# ---------------------------------------------------------------- importance

def optuna_study(run: Run, statuses=("finished",)):
    """An in-memory Optuna study rebuilt from the leaderboard, and the parameters it holds.

    Every trial of ``statuses`` with a score becomes a COMPLETE trial whose value
    is its best score; distributions are inferred from the values seen (a
    parameter a trial does not set is simply absent from that trial, as in a
    define-by-run space). Returns ``(study, params, note)``; ``study`` is None
    when there are fewer than 2 such trials or no varying parameter.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranked = scored(run)
    ranked = ranked[ranked["status"].isin(statuses)]
    if len(ranked) < 2:
        return None, [], (f"skipped: importance needs at least 2 trials with status {'/'.join(statuses)} "
                          f"and a score; this study has {len(ranked)}")
    params = [p for p in searched_parameters(run, statuses=statuses) if ranked[p].dropna().nunique() > 1]
    if not params:
        return None, [], f"skipped: no hyperparameter varies across the {len(ranked)} {'/'.join(statuses)} trials"
    distributions = {p: _distribution(ranked[p], p) for p in params}
    direction = "maximize" if run.mode == "max" else "minimize"
    study = optuna.create_study(direction=direction)
    for _, row in ranked.iterrows():
        values = {p: _native(row[p], distributions[p]) for p in params if not _missing(row[p])}
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={p: distributions[p] for p in values}, value=float(row[run.score_column])))
    return study, params, ""


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _distribution(values: pd.Series, name: str):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind = parameter_kind(values, name)
    present = values.dropna()
    if kind == "categorical":
        return CategoricalDistribution([_plain(v) for v in category_order(present.tolist())])
    floats = present.astype(float)
    if kind == "int":
        return IntDistribution(int(floats.min()), int(floats.max()))
    return FloatDistribution(float(floats.min()), float(floats.max()), log=kind == "log")


def _plain(value):
    """A Python bool/int/float/str, as Optuna's categorical choices need."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _native(value, distribution):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        value = _plain(value)
        if value not in distribution.choices:  # e.g. 20 vs "20"
            value = next(c for c in distribution.choices if str(c) == str(value))
        return value
    if isinstance(distribution, IntDistribution):
        return int(value)
    return float(value)


def param_importances(run: Run, statuses=("finished",), seed: int = 0) -> tuple[pd.Series | None, str]:
    """Optuna's fANOVA importances of the searched parameters, fitted on the finished trials.

    Returns ``(importances, note)``; importances is None (and the note says why)
    with fewer than 2 finished trials or no varying parameter. Conditional
    parameters that not every trial sets are left out (Optuna uses the
    parameters all trials share) and named in the note.
    """
    import optuna

    study, params, note = optuna_study(run, statuses)
    if study is None:
        return None, note
    shared = [p for p in params if all(p in t.params for t in study.trials)]
    left_out = [p for p in params if p not in shared]
    if not shared:
        return None, f"skipped: no parameter is set by every {'/'.join(statuses)} trial (conditional: {', '.join(left_out)})"
    values = [t.value for t in study.trials]
    if len(set(values)) < 2:
        return None, f"skipped: all {len(values)} {'/'.join(statuses)} trials have the same score, nothing to explain"
    if len(study.trials) < MIN_TRIALS_FOR_IMPORTANCE:  # fANOVA on a handful of points is noise that sums to 1
        return None, (f"skipped: {len(study.trials)} {'/'.join(statuses)} trial(s); parameter importances from "
                      f"fewer than {MIN_TRIALS_FOR_IMPORTANCE} would look precise and mean nothing")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=shared)
    except Exception as exc:  # noqa: BLE001 - a failed fit is reported, not raised
        return None, f"skipped: Optuna's importance evaluator failed: {type(exc).__name__}: {exc}"
    importances = pd.Series(found, dtype=float, name="importance").sort_values(ascending=False)
    importances.index.name = "parameter"
    note = (f"fANOVA (Optuna) on {len(study.trials)} {'/'.join(statuses)} trials, {len(shared)} parameter(s)"
            + (f"; conditional parameters left out (not set by every trial): {', '.join(left_out)}" if left_out else "")
            + ("; ASHA-stopped trials are not used: their scores come from fewer epochs" if "stopped" not in statuses else "")
            + (f"; only {len(study.trials)} trials: read as a rough indication" if len(study.trials) < 20 else ""))
    return importances, note


def importance_plot(run: Run, out_dir: Path, importances: pd.Series | None = None, note: str | None = None) -> Plot:
    title = f"Parameter importance for {label(run.metric)} (fANOVA)"
    if importances is None and note is None:
        importances, note = param_importances(run)
    if importances is None:
        return Plot("importance", title, None, note or "skipped")
    fig = figure((6.0, 0.5 + 0.45 * max(len(importances), 2)))
    ax = fig.add_subplot()
    ordered = importances.sort_values()
    ax.barh([label(p) for p in ordered.index], ordered.values, color="tab:blue")
    for y, v in enumerate(ordered.values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, float(ordered.max()) * 1.15))
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(title, fontsize=10)
    return Plot("importance", title, save(fig, out_dir, "importance"), note or "")


# ---------------------------------------------------------------- test confusion matrix

def read_test_evaluation(run: Run, split: str = "test") -> dict | None:
    """``RUN_DIR/<split>_evaluation.json`` (``analysis.records.read_evaluations``)."""
    return read_evaluations(run.path, split)


def confusion_from(entry: dict) -> tuple[np.ndarray, list[str]] | None:
    """A confusion matrix (rows true, columns predicted) and the class names of one evaluated trial."""
    matrix = entry.get("confusion_matrix")
    if matrix is None:
        return None
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        return None
    classes = entry.get("class_names") or entry.get("classes")
    classes = list(classes) if classes else [str(i) for i in range(matrix.shape[0])]
    return matrix, classes


def confusion_plot(run: Run, out_dir: Path, evaluation: dict | None = None) -> Plot:
    title = "Confusion matrix of the final model at its shipped decision, on the held-out test split"
    evaluation = latest_evaluation(evaluation if evaluation is not None else read_test_evaluation(run))
    if evaluation is None:
        return Plot("confusion_test", title, None,
                    "not run yet: python -m analysis.evaluate RUN_DIR (or add --evaluate to analysis.report)")
    entry = final_evaluated(evaluation) or best_evaluated(evaluation)
    found = confusion_from(entry) if entry else None
    if found is None:
        return Plot("confusion_test", title, None, "skipped: test_evaluation.json holds no confusion matrix")
    matrix, classes = found
    size = max(3.5, 0.6 * len(classes) + 2.5)
    fig = figure((size + 0.8, size))
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(matrix[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 3 else 0, ha="right" if len(classes) > 3 else "center")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="share of the true class")
    name = entry.get("label") or entry.get("trial_name", "best trial")
    split = evaluation.get("split", "test")
    ax.set_title(f"{name} on {split}", fontsize=10)
    return Plot("confusion_test", title, save(fig, out_dir, "confusion_test"),
                f"{name} at the decision it ships with ({evaluation.get('decision') or 'its decision rule'}), "
                f"{int(matrix.sum())} {split} images; rows are the true class (count and share of the row)")


# ---------------------------------------------------------------- search efficiency

def best_so_far_plot(run: Run, out_dir: Path) -> Plot:
    title = f"Best {label(run.metric)} so far vs cumulative compute"
    curve = best_so_far(run)
    if curve["best_so_far"].notna().sum() == 0:
        return Plot("best_so_far", title, None, "skipped: no trial has a score yet")
    fig = figure()
    ax = fig.add_subplot()
    minutes = curve["cumulative_s"] / 60.0
    score = curve[run.score_column]
    ax.step(minutes, curve["best_so_far"], where="post", color="tab:red", label="best so far")
    colours = {"finished": "tab:blue", "stopped": "tab:orange", "running": "tab:grey"}
    for status, marker in STATUS_MARKERS.items():
        sel = (curve["status"] == status) & score.notna()
        if sel.any():
            ax.scatter(minutes[sel], score[sel], marker=marker, s=30, color=colours.get(status, "black"), label=status)
    budget = asha_budget(run)
    how = curve.attrs.get("order") or ""
    ax.set_xlabel("cumulative trial wall time (min), trials in " + ("completion" if how.startswith(("completion", "ended")) else how) + " order")
    ax.set_ylabel(label(run.score_column))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    note = (f"{budget['epochs_run']} of {budget['full_epochs']} epochs run ({budget['trials']} trials x "
            f"{budget['max_epochs']}); ASHA saved {budget['saved_by_asha']} epochs; trials in {order_note(how)}")
    return Plot("best_so_far", title, save(fig, out_dir, "best_so_far"), note)


# ---------------------------------------------------------------- all of them

def make_all(run: Run, out_dir: str | Path, evaluation: dict | None = None) -> dict[str, list[Plot]]:
    """Every plot, grouped: ``learning_curves``, ``hyperparameters``, ``importance``, ``confusion``, ``efficiency``."""
    out_dir = Path(out_dir)
    importances, note = param_importances(run)
    return {
        "learning_curves": [learning_curves(run, out_dir)],
        "hyperparameters": hyperparameter_plots(run, out_dir),
        "importance": [importance_plot(run, out_dir, importances, note)],
        "confusion": [confusion_plot(run, out_dir, evaluation)],
        "efficiency": [best_so_far_plot(run, out_dir)],
    }


# ---------------------------------------------------------------- calibration (analysis.evaluate's final model)

def reliability_plot(curves: dict[str, dict], out_dir: Path, *, name: str = "reliability_test",
                     title: str = "Reliability diagram on the held-out test split", note: str = "") -> Plot:
    """Accuracy against mean confidence per confidence bin, one line per entry of ``curves``
    (e.g. ``{"before calibration (ECE 0.12)": bins, "after ...": bins}``, bins from
    ``analysis.calibration.reliability_bins``), with the diagonal of perfect calibration and
    the images per bin below. Empty bins are left out."""
    if not curves:
        return Plot(name, title, None, "skipped: no predictions to draw")
    fig = figure((6.0, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    edges = None
    for i, (name_of_curve, bins) in enumerate(curves.items()):
        count = np.asarray(bins["count"], dtype=float)
        filled = count > 0
        confidence = np.asarray(bins["confidence"], dtype=float)[filled]
        accuracy = np.asarray(bins["accuracy"], dtype=float)[filled]
        if "low" in bins:  # equal-count bins with the Wilson interval of each bin's accuracy
            low = accuracy - np.asarray(bins["low"], dtype=float)[filled]
            high = np.asarray(bins["high"], dtype=float)[filled] - accuracy
            top.errorbar(confidence, accuracy, yerr=[low, high], fmt="o-", color=f"C{i}", label=name_of_curve,
                         markersize=4, capsize=3, alpha=0.85)
        else:
            top.plot(confidence, accuracy, "o-", color=f"C{i}", label=name_of_curve, markersize=4)
        edges = np.asarray(bins["edges"], dtype=float)
        widths = np.diff(edges) / (len(curves) + 0.5)
        bottom.bar(edges[:-1] + widths * (i + 0.25), count, width=widths, align="edge", color=f"C{i}", alpha=0.7)
    top.set_ylabel("accuracy in the bin")
    # the top-label confidence of k classes is at least 1/k: start at the first bin holding images
    low = min(float(np.asarray(b["edges"])[np.flatnonzero(np.asarray(b["count"]) > 0)].min(initial=1.0))
              for b in curves.values())
    top.set_xlim(min(low, 0.5), 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title, fontsize=10)
    equal_count = all("low" in b for b in curves.values())
    bottom.set_xlabel(f"confidence (top-label probability), {len(edges) - 1} "
                      + ("equal-count bins (bars: 95% Wilson intervals)" if equal_count else "equal-width bins"))
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    return Plot(name, title, save(fig, out_dir, name), note)
