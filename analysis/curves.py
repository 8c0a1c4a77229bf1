"""ROC and precision-recall curves of the final model on the held-out split, with bootstrap bands and its operating point.

``python -m analysis.curves RUN_DIR`` (and ``analysis.report``) draws them from
what ``analysis.evaluate`` wrote, reading no image and no model:

- ``test_predictions.parquet``: the final model's probabilities per test image
  (rows whose ``trial`` is the final model's label);
- ``test_evaluation.json`` (its latest evaluation): which model is final, its
  temperature and its threshold for the positive class (both fitted on
  validation), and the bootstrap's ``n_boot``, ``seed`` and ``level``.

The scores are the *calibrated* probabilities (``softmax(log p / T)``), the ones
the threshold applies to. For two classes a curve is drawn for the positive
class; for more, one per class, that class against the rest.

**The operating point.** The validation-chosen threshold ``t`` (positive iff
score >= t) is marked where it lies: at the test split's (FPR, TPR) and
(recall, precision) for ``score >= t``, which is a vertex of the curve. For more
than two classes without a threshold for a class, the argmax decision is marked
per class instead (hollow): it is a decision on all the probabilities, not a
threshold on one, so it need not lie on that class's curve.

**The band.** The test images are resampled with the evaluation's own resamples
(``analysis.evaluate.resample_counts``, same ``n_boot`` and seed, so the band is
paired with every interval of the evaluation); on each resample the curve is
computed and read on a fixed grid: TPR at ``ROC_GRID`` false-positive rates
(linear between the curve's vertices, the top of a vertical step at a grid
point), precision at ``PR_GRID`` recalls (the precision at the highest threshold
that reaches that recall: the step curve scikit-learn's ``PrecisionRecallDisplay``
draws). The band is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles
per grid point, over the resamples where the curve is defined (both classes
present). AUC and average precision (scikit-learn's definitions) get
percentile intervals from the same resamples.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from analysis.bootstrap import resample_counts
from analysis.errors import AnalysisError
from analysis.figures import Plot, figure, save
from analysis.files import TEST_LOG, predictions_file
from analysis.operating_point import rule_text
from analysis.records import latest_evaluation, read_evaluations
from analysis.tables import label
from search.argtypes import ArgumentParser

__all__ = ["ROC_GRID", "PR_GRID", "ClassCurves", "CurvesError", "class_curves", "curves_for", "final_model_curves",
           "roc_plot", "pr_plot", "curve_plots", "main"]

ROC_GRID = np.linspace(0.0, 1.0, 101)  # false-positive rates
PR_GRID = np.linspace(0.01, 1.0, 100)  # recalls; precision at recall 0 is undefined
_TOL = 1e-12  # a grid point equal to a curve's value, up to rounding, counts as reached


class CurvesError(ValueError):
    """The folder lacks what the curves need. The message names the file and the fix."""


@dataclasses.dataclass
class ClassCurves:
    """One class against the rest: the curves on the evaluated images, their bands and the marked point."""

    name: str
    n_positive: int
    n_negative: int
    fpr: np.ndarray  # scikit-learn's roc_curve (drop_intermediate=False): every threshold's vertex
    tpr: np.ndarray
    roc_thresholds: np.ndarray
    precision: np.ndarray  # precision_recall_curve (recall descending)
    recall: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    average_precision: float
    average_precision_ci: tuple[float, float]
    roc_on_grid: np.ndarray  # the curve read on ROC_GRID / PR_GRID as the band is
    roc_band: tuple[np.ndarray, np.ndarray]
    pr_on_grid: np.ndarray
    pr_band: tuple[np.ndarray, np.ndarray]
    n_boot: int  # resamples used for the band (those where the curve is defined)
    level: float
    point: dict | None = None  # {"kind": "threshold" | "argmax", "fpr", "tpr", "recall", "precision", ...}

    @property
    def prevalence(self) -> float:
        return self.n_positive / (self.n_positive + self.n_negative)


# --------------------------------------------------------------------------
# the curves
# --------------------------------------------------------------------------


def _weighted_curves(is_pos: np.ndarray, scores: np.ndarray, w: np.ndarray):
    """Cumulative weighted true and false positives per distinct threshold, highest first: (tp, fp), each (b, G)."""
    order = np.argsort(-scores, kind="stable")
    s, pos, w = scores[order], is_pos[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores: one threshold each
    tp = np.cumsum(np.add.reduceat(w * pos, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w * ~pos, starts, axis=1), axis=1)
    return tp, fp


def _roc_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR at each grid FPR, row by row; rows of ``fpr`` are non-decreasing from 0 to 1.

    Linear between vertices; at a grid point that meets a vertical step, its top.
    """
    b, m = fpr.shape
    offsets = 2.0 * np.arange(b)[:, None]  # rows apart, so one sorted search serves them all
    flat_x, flat_y = (fpr + offsets).ravel(), tpr.ravel()
    query = grid[None, :] + offsets + _TOL
    j = np.searchsorted(flat_x, query.ravel(), side="right").reshape(query.shape) - 1
    last = (np.arange(b) * m + m - 1)[:, None]
    j = np.minimum(j, last)
    k = np.minimum(j + 1, last)
    x0, x1, y0, y1 = flat_x[j], flat_x[k], flat_y[j], flat_y[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(x1 > x0, np.clip((query - _TOL - x0) / (x1 - x0), 0.0, 1.0), 0.0)
    return y0 + frac * (y1 - y0)


def _pr_on_grid(recall: np.ndarray, precision: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Precision at the highest threshold whose recall reaches each grid recall, row by row (recall non-decreasing)."""
    b, m = recall.shape
    offsets = 2.0 * np.arange(b)[:, None]
    query = grid[None, :] + offsets - _TOL
    i = np.searchsorted((recall + offsets).ravel(), query.ravel(), side="left").reshape(query.shape)
    return precision.ravel()[np.minimum(i, (np.arange(b) * m + m - 1)[:, None])]


def _curves_of(is_pos: np.ndarray, scores: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """For each row of weights: TPR on ROC_GRID, precision on PR_GRID, AUC and average precision (NaN where undefined)."""
    tp, fp = _weighted_curves(is_pos, scores, w)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    ok = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    zeros = np.zeros((len(tp), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.hstack([zeros, tp / np.where(n_pos > 0, n_pos, 1.0)])
        fpr = np.hstack([zeros, fp / np.where(n_neg > 0, n_neg, 1.0)])
        recall = tp / np.where(n_pos > 0, n_pos, 1.0)
        called = tp + fp
        precision = np.where(called > 0, tp / np.where(called > 0, called, 1.0), 1.0)
    fpr[~ok], tpr[~ok] = np.linspace(0, 1, fpr.shape[1]), 0.0  # placeholders keep the search sorted; NaN below
    recall[~ok] = np.linspace(0, 1, recall.shape[1])
    auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    steps = np.diff(np.hstack([zeros, recall]), axis=1)
    ap = np.sum(np.where(steps > 0, steps * precision, 0.0), axis=1)
    out = {"roc": _roc_on_grid(fpr, tpr, ROC_GRID), "pr": _pr_on_grid(recall, precision, PR_GRID), "auc": auc, "ap": ap}
    for key in out:
        out[key] = np.where(ok[:, None] if out[key].ndim == 2 else ok, out[key], np.nan)
    return out


def class_curves(is_positive, scores, *, name: str = "positive", n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, threshold: float | None = None) -> ClassCurves:
    """The ROC and PR curves of ``scores`` for ``is_positive``, with bootstrap bands; ``threshold`` is marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    is_pos = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_pos.all() or not is_pos.any():
        raise CurvesError(f"class {name!r}: the evaluated images hold {'only' if is_pos.all() else 'no'} images of it; "
                          "a curve needs positives and negatives")
    fpr, tpr, thresholds = roc_curve(is_pos, scores, drop_intermediate=False)
    precision, recall, _ = precision_recall_curve(is_pos, scores)
    point = _curves_of(is_pos, scores, np.ones((1, len(scores))))
    parts = [_curves_of(is_pos, scores, counts) for counts in resample_counts(len(scores), n_boot, seed)]
    boot = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    defined = ~np.isnan(boot["auc"])
    if not defined.any():
        raise CurvesError(f"class {name!r}: no bootstrap resample holds both positives and negatives")

    def band(key):
        return tuple(np.percentile(boot[key][defined], q, axis=0))

    curves = ClassCurves(
        name=name, n_positive=int(is_pos.sum()), n_negative=int((~is_pos).sum()), fpr=fpr, tpr=tpr,
        roc_thresholds=thresholds, precision=precision, recall=recall, auc=float(point["auc"][0]),
        auc_ci=tuple(float(v) for v in band("auc")), average_precision=float(point["ap"][0]),
        average_precision_ci=tuple(float(v) for v in band("ap")), roc_on_grid=point["roc"][0], roc_band=band("roc"),
        pr_on_grid=point["pr"][0], pr_band=band("pr"), n_boot=int(defined.sum()), level=level)
    if threshold is not None:
        curves.point = {"kind": "threshold", "threshold": float(threshold), **_point_at(is_pos, scores >= threshold)}
    return curves


def _point_at(is_pos: np.ndarray, called: np.ndarray) -> dict:
    tp, fp = int((is_pos & called).sum()), int((~is_pos & called).sum())
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    return {"fpr": fp / n_neg, "tpr": tp / n_pos, "recall": tp / n_pos,
            "precision": tp / (tp + fp) if tp + fp else math.nan, "tp": tp, "fp": fp,
            "fn": n_pos - tp, "tn": n_neg - fp}


def curves_for(y_true, probs, class_names: list[str], *, positive: int | None = None, threshold: float | None = None,
               n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[ClassCurves]:
    """One ``ClassCurves`` per class against the rest (two classes: the positive class's only, index 1 by default).

    ``threshold`` applies to ``probs[:, positive]`` (positive iff >= threshold).
    Without a threshold for a class of more than two, the argmax decision's
    one-vs-rest point is marked instead.
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise CurvesError(f"probabilities of shape {probs.shape} do not match {k} classes {class_names}")
    if k == 2:
        positive = 1 if positive is None else positive
        shown = [positive]
    else:
        shown = list(range(k))
    argmax = probs.argmax(axis=1)
    out = []
    for c in shown:
        curve = class_curves(y == c, probs[:, c], name=class_names[c], n_boot=n_boot, seed=seed, level=level,
                             threshold=threshold if c == positive else None)
        if curve.point is None and k > 2:
            curve.point = {"kind": "argmax", **_point_at(y == c, argmax == c)}
        out.append(curve)
    return out


# --------------------------------------------------------------------------
# from the results folder
# --------------------------------------------------------------------------


def final_model_curves(run_dir: str | Path, evaluation: dict | None = None) -> tuple[list[ClassCurves], dict]:
    """The final model's curves from ``RUN_DIR/<split>_predictions.parquet`` and the latest evaluation.

    Returns the curves and what they were drawn from: ``model``, ``split``, ``n``,
    ``temperature``, ``threshold`` (the operating-point record or None),
    ``n_boot``, ``seed``, ``level``.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    if evaluation is None:
        try:
            evaluation = latest_evaluation(read_evaluations(run_dir), final=True)
        except AnalysisError as exc:
            raise CurvesError(str(exc)) from None
    final = (evaluation or {}).get("final")
    if not final:
        raise CurvesError(f"{str(run_dir / TEST_LOG)!r} holds no evaluation of a final model; run "
                          f"python -m analysis.evaluate {run_dir} first")
    split = evaluation.get("split", "test")
    models = {m["label"]: m for m in final.get("models") or []}
    chosen = models.get(final["model"])
    if chosen is None:
        raise CurvesError(f"the evaluation names {final['model']!r} as the final model but scores only "
                          f"{sorted(models)}; run python -m analysis.evaluate {run_dir} again")
    classes = next((t.get("class_names") for t in evaluation.get("trials") or [] if t.get("class_names")), None)
    path = run_dir / predictions_file(split)
    if not path.is_file():
        raise CurvesError(f"{str(path)!r} is missing; run python -m analysis.evaluate {run_dir} to write it")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CurvesError(f"{str(path)!r} is unreadable ({type(exc).__name__}: {exc}); run python -m "
                          f"analysis.evaluate {run_dir} again to rewrite it") from None
    rows = table[table["trial"].astype(str) == str(final["model"])]
    if not classes:
        classes = [c.removeprefix("prob_") for c in table.columns if c.startswith("prob_")]
    columns = [f"prob_{c}" for c in classes]
    if rows.empty or not set(columns) <= set(rows.columns):
        raise CurvesError(f"{str(path)!r} holds no predictions of the final model {final['model']!r}; was it "
                          f"written by another evaluation? Run python -m analysis.evaluate {run_dir} again")
    temperature = float(chosen.get("calibration", {}).get("temperature", 1.0))
    probs = rows[columns].to_numpy(dtype=np.float64)  # as the model ships them: calibrated by ``temperature``
    y = rows["label_index"].to_numpy(dtype=np.int64)
    op = chosen.get("operating_point")
    positive = classes.index(op["class"]) if op and op.get("class") in classes else \
        classes.index(evaluation["positive_class"]) if evaluation.get("positive_class") in classes else None
    n_boot, seed, level = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0)), \
        float(evaluation.get("level", 0.95))
    curves = curves_for(y, probs, classes, positive=positive, threshold=op["value"] if op else None, n_boot=n_boot,
                        seed=seed, level=level)
    if op:
        for c in curves:
            if c.point and c.point["kind"] == "threshold":
                c.point["rule"] = op.get("rule")
                c.point["target"] = op.get("target")
    return curves, {"model": final["model"], "split": split, "n": int(len(rows)), "temperature": temperature,
                    "threshold": op, "n_boot": n_boot, "seed": seed, "level": level, "classes": classes}


# --------------------------------------------------------------------------
# the plots
# --------------------------------------------------------------------------


def _point_label(point: dict) -> str:
    if point["kind"] == "argmax":
        return "argmax decision"
    rule = rule_text(point) if point.get("rule") else "given"
    return f"threshold {point['threshold']:.3f} ({rule})"


def _panels(curves: list[ClassCurves]):
    cols = min(len(curves), 4)
    rows = math.ceil(len(curves) / cols)
    fig = figure((4.8 * cols, 6.6 * rows))  # room for the legend under each panel
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(curves))]
    return fig, axes


def roc_plot(curves: list[ClassCurves], out_dir: Path, *, name: str = "roc_test", title: str = "ROC curves",
             note: str = ""):
    """One ROC panel per entry of ``curves``: the curve, its band, the chance diagonal and the marked point."""
    if not curves:
        return Plot(name, title, None, "skipped: no curve to draw")
    fig, axes = _panels(curves)
    pct = int(round(100 * curves[0].level))
    for ax, c in zip(axes, curves):
        ax.fill_between(ROC_GRID, *c.roc_band, color="tab:blue", alpha=0.2, linewidth=0,
                        label=f"{pct}% bootstrap band ({c.n_boot} resamples)")
        ax.plot(c.fpr, c.tpr, color="tab:blue", linewidth=1.6,
                label=f"AUC {c.auc:.3f} [{c.auc_ci[0]:.3f}, {c.auc_ci[1]:.3f}]")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="chance")
        if c.point:
            filled = c.point["kind"] == "threshold"
            ax.plot([c.point["fpr"]], [c.point["tpr"]], "*" if filled else "o", markersize=14 if filled else 9,
                    color="tab:red", markerfacecolor="tab:red" if filled else "none", markeredgewidth=1.5,
                    label=f"{_point_label(c.point)}\nTPR {c.point['tpr']:.3f}, FPR {c.point['fpr']:.3f} on these images")
        _finish_panel(ax, c, label("fpr"), label("tpr"))
    fig.suptitle(title, fontsize=10)
    return Plot(name, title.replace("\n", ", "), save(fig, out_dir, name), note)


def pr_plot(curves: list[ClassCurves], out_dir: Path, *, name: str = "pr_test",
            title: str = "Precision-recall curves", note: str = ""):
    """One precision-recall panel per entry of ``curves``: the step curve, its band, the prevalence and the point."""
    if not curves:
        return Plot(name, title, None, "skipped: no curve to draw")
    fig, axes = _panels(curves)
    pct = int(round(100 * curves[0].level))
    for ax, c in zip(axes, curves):
        ax.fill_between(PR_GRID, *c.pr_band, color="tab:green", alpha=0.2, linewidth=0, step="pre",
                        label=f"{pct}% bootstrap band ({c.n_boot} resamples)")
        ax.plot(c.recall, c.precision, color="tab:green", linewidth=1.6, drawstyle="steps-post",
                label=f"average precision {c.average_precision:.3f} "
                      f"[{c.average_precision_ci[0]:.3f}, {c.average_precision_ci[1]:.3f}]")
        ax.axhline(c.prevalence, linestyle=":", color="grey", linewidth=1, label=f"chance (prevalence {c.prevalence:.3f})")
        if c.point and not math.isnan(c.point["precision"]):
            filled = c.point["kind"] == "threshold"
            ax.plot([c.point["recall"]], [c.point["precision"]], "*" if filled else "o",
                    markersize=14 if filled else 9, color="tab:red", markerfacecolor="tab:red" if filled else "none",
                    markeredgewidth=1.5, label=f"{_point_label(c.point)}\nrecall {c.point['recall']:.3f}, "
                                               f"precision {c.point['precision']:.3f} on these images")
        _finish_panel(ax, c, f"{label('recall')} ({label('sensitivity')})", label("ppv"))
    fig.suptitle(title, fontsize=10)
    return Plot(name, title.replace("\n", ", "), save(fig, out_dir, name), note)


def _finish_panel(ax, c, xlabel: str, ylabel: str) -> None:
    """The unit square, the axis words, the legend under the panel and the class's counts as title."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_box_aspect(1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, markerscale=0.7)
    ax.set_title(f"{c.name} vs rest ({c.n_positive} positive, {c.n_negative} negative)", fontsize=9)


def curve_plots(run_dir: str | Path, evaluation: dict | None = None, out_dir: str | Path | None = None):
    """ROC and PR plots of the final model (``report_files/roc_<split>.png``, ``pr_<split>.png``) and the curves.

    Returns ``(plots, curves, info)``; a folder without a final evaluation gives
    two skipped plots whose note says why, and no curves.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report_files"
    split = (evaluation or {}).get("split", "test")
    try:
        curves, info = final_model_curves(run_dir, evaluation)
    except CurvesError as exc:
        return [Plot(f"roc_{split}", "ROC curves", None, f"not drawn: {exc}"),
                Plot(f"pr_{split}", "Precision-recall curves", None, f"not drawn: {exc}")], [], None
    where = (f"on the {info['split']} split ({info['n']} images)\n{info['model']}, calibrated "
             f"(T = {info['temperature']:.2f})")
    pct = int(round(100 * info["level"]))
    band = (f"band: {pct}% percentile bootstrap over {info['n_boot']} resamples of the {info['split']} images "
            f"(seed {info['seed']}, the evaluation's own)")
    marked = ("star: the threshold chosen on validation, where it falls on the " + info["split"] + " images"
              if info["threshold"] else "circle: the argmax decision, one class against the rest")
    plots = [roc_plot(curves, out_dir, name=f"roc_{split}", title=f"ROC {where}", note=f"{band}; {marked}"),
             pr_plot(curves, out_dir, name=f"pr_{split}", title=f"Precision-recall {where}",
                     note=f"{band}; precision read at the highest threshold reaching each recall; {marked}")]
    return plots, curves, info


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.curves", allow_abbrev=False,
        description="ROC and precision-recall curves of the final model on the test split, with bootstrap bands "
        "and the validation-chosen operating point, from the files analysis.evaluate wrote. Writes "
        "RUN_DIR/report_files/roc_test.png and pr_test.png.",
        epilog="Example: python -m analysis.curves runs/quickstart")
    parser.add_argument("run_dir", help="a study's results folder, evaluated by python -m analysis.evaluate")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        plots, curves, info = curve_plots(run_dir)
    except AnalysisError as exc:  # a PNG that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not curves:
        print(f"error: {plots[0].note.removeprefix('not drawn: ')}", file=sys.stderr)
        return 2
    pct = int(round(100 * info["level"]))
    for c in curves:
        print(f"{c.name} vs rest: AUC {c.auc:.4f} [{c.auc_ci[0]:.4f}, {c.auc_ci[1]:.4f}], average precision "
              f"{c.average_precision:.4f} [{c.average_precision_ci[0]:.4f}, {c.average_precision_ci[1]:.4f}] "
              f"({pct}% bootstrap, {c.n_boot} resamples)")
    for p in plots:
        print(f"written: {p.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
