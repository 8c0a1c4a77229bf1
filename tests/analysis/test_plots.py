"""analysis.plots: every plot is a valid PNG, or is skipped with a note saying why."""

from __future__ import annotations

import json

import pytest

from analysis import plots as P
from analysis import tables as T
from fixtures.runs import make_run_dir

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1000 and data.rstrip().endswith(b"IEND\xaeB`\x82")


def test_every_plot_of_the_real_study_is_a_png(run_dir, tmp_path):
    run = T.load_run(run_dir)
    plots = P.make_all(run, tmp_path / "plots")
    assert set(plots) == {"learning_curves", "hyperparameters", "importance", "confusion", "efficiency"}
    drawn = [p for group in plots.values() for p in group if p.path is not None]
    for p in drawn:
        assert p.path.parent == tmp_path / "plots" and is_png(p.path), p
    assert {p.name for p in drawn} >= {"learning_curves", "best_so_far", "hparam_backbone", "hparam_learning_rate"}
    # Importance is fitted or skipped with a reason; never silently missing.
    (importance,) = plots["importance"]
    assert importance.path is not None or importance.note.startswith("skipped")
    # No test evaluation in this folder: the confusion matrix says how to get one.
    (confusion,) = plots["confusion"]
    assert confusion.path is None and "python -m analysis.evaluate" in confusion.note
    assert not list(run_dir.glob("*.png"))  # nothing written into the study folder


def test_learning_curves_mark_asha_stops(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    plot = P.learning_curves(run, tmp_path / "out")
    assert is_png(plot.path) and "(2)" in plot.note  # two trials stopped by ASHA


def test_one_hyperparameter_plot_per_searched_parameter(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    plots = P.hyperparameter_plots(run, tmp_path / "out")
    assert [p.name for p in plots] == ["hparam_backbone", "hparam_unfreeze", "hparam_learning_rate", "hparam_dropout"]
    assert all(is_png(p.path) for p in plots)
    notes = {p.name: p.note for p in plots}
    # The best trial (trial 4) has the highest learning rate sampled: at the edge of the space.
    assert "high edge" in notes["hparam_learning_rate"]
    assert "do not set dropout" in notes["hparam_dropout"]  # conditional: the CNN trials have none


def test_importance_with_two_varying_parameters(tmp_path):
    trials = [(i, "mobilenet_v2" if i % 2 else "cnn_s3", "all", 10 ** (-4 + i / 3), None, "finished",
               [0.5 + 0.04 * i + (0.1 if i % 2 else 0.0)]) for i in range(8)]
    run = T.load_run(make_run_dir(tmp_path, trials, max_epochs=1))
    importances, note = P.param_importances(run)
    assert importances is not None, note
    assert set(importances.index) == {"backbone", "learning_rate"}
    assert importances.sum() == pytest.approx(1.0)
    assert "8 finished trials" in note
    plot = P.importance_plot(run, tmp_path / "out", importances, note)
    assert is_png(plot.path)


def test_importance_leaves_out_conditional_parameters_and_names_them(tmp_path):
    trials = [(i, "mobilenet_v2" if i % 2 else "cnn_s3", [0, 20, "all"][i % 3], 10 ** (-4 + i / 4),
               0.1 + i / 40 if i % 2 else None, "finished", [0.5 + 0.03 * i]) for i in range(10)]
    trials.append((10, "cnn_s3", "all", 1e-3, None, "stopped", [0.4]))
    run = T.load_run(make_run_dir(tmp_path, trials, max_epochs=1))  # only the mobilenet trials set dropout
    importances, note = P.param_importances(run)
    assert importances is not None, note
    assert set(importances.index) == {"backbone", "unfreeze", "learning_rate"}
    assert "left out (not set by every trial): dropout" in note
    assert "ASHA-stopped trials are not used" in note and "10 finished trials" in note


def test_importance_from_fewer_trials_than_the_minimum_is_a_sentence_not_a_chart(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))  # 3 finished trials with varying parameters
    importances, note = P.param_importances(run)
    assert importances is None
    assert note == (f"skipped: 3 finished trial(s); parameter importances from fewer than "
                    f"{P.MIN_TRIALS_FOR_IMPORTANCE} would look precise and mean nothing")
    plot = P.importance_plot(run, tmp_path / "out")
    assert plot.path is None and plot.note == note


def test_importance_is_skipped_with_a_reason(tmp_path):
    single = T.load_run(make_run_dir(tmp_path / "a", [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.5])], max_epochs=1))
    importances, note = P.param_importances(single)
    assert importances is None and note.startswith("skipped") and "at least 2" in note
    plot = P.importance_plot(single, tmp_path / "out")
    assert plot.path is None and plot.note == note

    same = [(i, "cnn_s3", "all", 1e-3, None, "finished", [0.5 + i / 10]) for i in range(3)]
    importances, note = P.param_importances(T.load_run(make_run_dir(tmp_path / "b", same, max_epochs=1)))
    assert importances is None and "no hyperparameter varies" in note


def test_in_memory_optuna_study_infers_distributions(tmp_path):
    import optuna

    run = T.load_run(make_run_dir(tmp_path))
    study, params, note = P.optuna_study(run, statuses=("finished", "stopped"))
    assert note == "" and len(study.trials) == 5  # errored trial left out
    dists = study.trials[0].distributions
    assert isinstance(dists["learning_rate"], optuna.distributions.FloatDistribution) and dists["learning_rate"].log
    assert isinstance(dists["unfreeze"], optuna.distributions.CategoricalDistribution)
    assert dists["unfreeze"].choices == ("0", "20", "all")  # as the leaderboard holds them (mixed types become text)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    # dropout is conditional: only the mobilenet trials carry it
    assert sum("dropout" in t.params for t in study.trials) == 3


def test_confusion_matrix_from_the_test_evaluation(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    evaluation = {"trials": [{"rank": 1, "trial_name": "trial_004_mobilenet_v2", "classes": ["benign", "malignant"],
                              "confusion_matrix": [[8, 2], [1, 9]]}]}
    (run.path / "test_evaluation.json").write_text(json.dumps(evaluation))
    plot = P.confusion_plot(run, tmp_path / "out")
    assert is_png(plot.path) and "trial_004_mobilenet_v2" in plot.note and "20 test images" in plot.note


def test_best_so_far_plot(tmp_path):
    run = T.load_run(make_run_dir(tmp_path))
    plot = P.best_so_far_plot(run, tmp_path / "out")
    assert is_png(plot.path) and "ASHA saved 5 epochs" in plot.note and "trial_number order" in plot.note


def test_plots_of_a_study_with_nothing_scored(tmp_path):
    trials = [(0, "cnn_s3", "all", 1e-3, None, "errored", []), (1, "cnn_s3", "all", 2e-3, None, "running", [])]
    run = T.load_run(make_run_dir(tmp_path, trials, num_samples=4))
    plots = P.make_all(run, tmp_path / "out")
    for group in plots.values():
        for p in group:
            assert p.path is None and p.note, p


def test_axis_labels_and_titles_are_words_not_column_names(tmp_path, monkeypatch):
    """Every label a plot shows comes from analysis.tables.label: no ``best_val_...`` or other snake_case names."""
    import re

    drawn = []
    real_save = P.save

    def save(fig, out_dir, name):
        drawn.append(fig)
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(P, "save", save)
    run = T.load_run(make_run_dir(tmp_path))
    P.make_all(run, tmp_path / "out")
    texts = []
    for fig in drawn:
        for ax in fig.axes:
            texts += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
            texts += [t.get_text() for t in ax.get_yticklabels() if ax.get_ylabel() == ""]  # importance bars
    assert len(drawn) >= 4 and "validation balanced accuracy (best epoch)" in texts
    raw = [t for t in texts if re.search(r"\b(best|last)_|\bval_|\b[a-z]+_[a-z_]+\b", t) and "trial_" not in t]
    assert raw == [], raw
    assert T.label("best_val_balanced_accuracy") == "validation balanced accuracy (best epoch)"
    assert T.label("learning_rate") == "learning rate" and T.label("test_recall_mel") == "test recall of mel"
