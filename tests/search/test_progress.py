"""ProgressPrinter on real Ray Tune trials (made without running Ray, as in test_accounting) and a fake clock."""

import pickle
import re
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial

import search.progress as progress
from search.accounting import TrialAccountant
from search.progress import SLOW_EPOCH_S, ProgressPrinter, next_steps
from search.storage import StudyFolder

METRIC = "val_balanced_accuracy"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class QuietTrial(Trial):
    """A stub trial has no storage, so Ray's ``error_file`` would raise; a real run's trial has one."""

    error_file = None


def make_trial(number: int, backbone: str = "cnn_s3", cls=Trial) -> Trial:
    config = {"backbone": backbone, "trial_number": number}
    return cls("__fake", stub=True, config=config, trial_name_creator=lambda t: f"trial_{number:03d}_{backbone}")


def printer(clock, **kwargs) -> ProgressPrinter:
    options = {"metric": METRIC, "mode": "max", "max_epochs": 6, "num_samples": 4, "max_concurrent": 2}
    return ProgressPrinter(**{**options, **kwargs}, clock=clock)


def report(p, trials, trial, scores, epoch_s=1.0, first_epoch=1):
    """What Ray does per result: the callbacks first, then ``trial.last_result``."""
    for epoch, score in enumerate(scores, start=first_epoch):
        result = {METRIC: score, "val_loss": 1.0 - score, "epoch": epoch, "training_iteration": epoch,
                  "epoch_s": epoch_s, "time_this_iter_s": epoch_s + 0.5}
        p.on_trial_result(iteration=0, trials=trials, trial=trial, result=result)
        trial.update_last_result(result)


def lines(capsys, prefix: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line[10:].startswith(prefix)]


def out_lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_finished_trial_shows_its_best_and_last_score_and_the_status_agrees(capsys):
    clock = Clock()
    p = printer(clock)
    trial = make_trial(3, "efficientnet_lite0")
    trials = [trial]
    p.on_step_begin(iteration=0, trials=trials)
    clock.now = 5
    p.on_trial_start(iteration=0, trials=trials, trial=trial)
    report(p, trials, trial, [0.5, 0.55, 0.5667, 0.575, 0.55, 0.5417])
    clock.now = 35
    trial.set_status(Trial.RUNNING)  # Ray calls on_trial_complete before it marks the trial TERMINATED
    capsys.readouterr()
    p.on_trial_complete(iteration=0, trials=trials, trial=trial)
    assert out_lines(capsys) == [
        "[    35s] finished trial_003_efficientnet_lite0  after epoch 6/6  best val_balanced_accuracy=0.5750 (epoch 4), last 0.5417",
        # 30 s for the one trial ended, 3 left over 2 slots: 45 s
        "[    35s] status   1/4 trials done (finished 1 | stopped 0 | diverged 0 | errored 0) | running 0 | elapsed 35s"
        " | ETA ~45s | best val_balanced_accuracy=0.5750 (trial_003_efficientnet_lite0, epoch 4)",
    ]


def test_stopped_and_errored_lines_and_exact_counts(capsys, monkeypatch):
    monkeypatch.setattr(progress, "trial_error_line", lambda trial: "ValueError: bad dropout")
    clock = Clock()
    p = printer(clock, num_samples=3)
    a, b = make_trial(0), make_trial(1, cls=QuietTrial)
    trials = [a, b]
    p.on_trial_start(iteration=0, trials=trials, trial=a)
    p.on_trial_start(iteration=0, trials=trials, trial=b)
    report(p, trials, a, [0.5, 0.5333])
    clock.now = 10
    p.on_trial_complete(iteration=0, trials=trials, trial=a)
    clock.now = 12
    p.on_trial_error(iteration=0, trials=trials, trial=b)
    p.on_trial_error(iteration=0, trials=trials, trial=b)  # told twice (Ray, then the accountant): counted once
    out = out_lines(capsys)
    assert "[    10s] stopped  trial_000_cnn_s3  after epoch 2/6 by ASHA  best val_balanced_accuracy=0.5333 (epoch 2), last 0.5333" in out
    assert "[    12s] errored  trial_001_cnn_s3  ValueError: bad dropout before its first report" in out
    assert out[-1] == ("[    12s] status   2/3 trials done (finished 0 | stopped 1 | diverged 0 | errored 1) | running 0"
                       " | elapsed 12s | ETA ~10s | best val_balanced_accuracy=0.5333 (trial_000_cnn_s3, epoch 2)")


def test_a_trial_the_accountant_announces_is_counted_once(capsys, monkeypatch):
    monkeypatch.setattr(progress, "trial_error_line", lambda trial: "RuntimeError: reset_config failed")
    clock = Clock()
    p = printer(clock, num_samples=2)
    accountant = TrialAccountant(SimpleNamespace(), [p], num_samples=2)
    lost = make_trial(0, cls=QuietTrial)
    accountant.on_step_begin(0, [lost])
    p.on_step_begin(iteration=0, trials=[lost])
    p.on_trial_start(iteration=0, trials=[lost], trial=lost)
    clock.now = 4
    lost.set_status(Trial.ERROR)  # Ray ended it without a word
    accountant.on_step_end(1, [lost])
    accountant.on_step_end(2, [lost])
    status = [line for line in out_lines(capsys) if "status" in line]
    assert status == ["[     4s] status   1/2 trials done (finished 0 | stopped 0 | diverged 0 | errored 1) | running 0"
                      " | elapsed 4s | ETA ~5s"]


def test_a_resumed_run_counts_the_trials_done_before_it(capsys):
    clock = Clock()
    p = printer(clock, num_samples=5)
    old_finished, old_stopped, waiting = make_trial(0), make_trial(1), make_trial(2)
    for trial, scores in ((old_finished, [0.6, 0.8, 0.7, 0.7, 0.75, 0.7]), (old_stopped, [0.5])):
        for epoch, score in enumerate(scores, start=1):
            trial.update_last_result({METRIC: score, "epoch": epoch})
        trial.set_status(Trial.TERMINATED)
    trials = [old_finished, old_stopped, waiting]
    p.on_step_begin(iteration=0, trials=trials)
    assert out_lines(capsys) == [
        "[     0s] resumed  2 trial(s) ended in the earlier run(s) and count as done",
        "[     0s] status   2/5 trials done (finished 1 | stopped 1 | diverged 0 | errored 0) | running 0 | elapsed 0s"
        " | ETA unknown | best val_balanced_accuracy=0.8000 (trial_000_cnn_s3)",
    ]
    p.on_trial_start(iteration=1, trials=trials, trial=waiting)
    report(p, trials, waiting, [0.55, 0.6])
    clock.now = 20
    p.on_trial_complete(iteration=1, trials=trials, trial=waiting)
    assert lines(capsys, "status")[-1] == (
        "[    20s] status   3/5 trials done (finished 1 | stopped 2 | diverged 0 | errored 0) | running 0 | elapsed 20s"
        " | ETA ~20s | best val_balanced_accuracy=0.8000 (trial_000_cnn_s3)")
    p.on_step_begin(iteration=2, trials=trials)  # the baseline is taken once
    assert capsys.readouterr().out == ""


def test_a_resumed_trial_keeps_its_best_from_before_the_resume(capsys):
    clock = Clock()
    p = printer(clock)
    trial = make_trial(4)
    trial.update_last_result({METRIC: 0.7, "epoch": 2})  # reported before the run stopped; restarted from its checkpoint
    trials = [trial]
    p.on_step_begin(iteration=0, trials=trials)
    p.on_trial_start(iteration=0, trials=trials, trial=trial)
    report(p, trials, trial, [0.6, 0.65, 0.6, 0.62], first_epoch=3)
    p.on_trial_complete(iteration=0, trials=trials, trial=trial)
    out = out_lines(capsys)
    assert "[     0s] finished trial_004_cnn_s3  after epoch 6/6  best val_balanced_accuracy=0.7000, last 0.6200" in out
    assert out[-1].endswith("| best val_balanced_accuracy=0.7000 (trial_004_cnn_s3)")


def test_the_eta_is_unknown_until_a_trial_ends_then_counts_running_trials_and_the_time_limit(capsys):
    clock = Clock()
    p = printer(clock, num_samples=10, max_concurrent=2, time_limit_s=900)
    a, b, c = make_trial(0), make_trial(1), make_trial(2)
    trials = [a, b, c]
    p.on_trial_start(iteration=0, trials=trials, trial=a)
    p.on_trial_start(iteration=0, trials=trials, trial=b)
    p._status()
    assert lines(capsys, "status")[-1].endswith("| running 2 | elapsed 0s | ETA unknown (time limit in 15m00s)")
    clock.now = 60
    report(p, trials, a, [0.5] * 6)
    p.on_trial_complete(iteration=0, trials=trials, trial=a)  # 60 s
    p.on_trial_start(iteration=0, trials=trials, trial=c)
    clock.now = 90
    p._status()
    # mean 60 s: 7 not started (420 s) + b's 0 s left + c's 30 s left, over 2 slots = 225 s
    assert "| running 2 | elapsed 1m30s | ETA ~4m |" in lines(capsys, "status")[-1]
    clock.now = 200  # b has outlived the mean: its own pace, 200 s for its 2 epochs, 4 epochs left: 400 s;
    # 7 not started (420 s) + 400 s + c past the mean with no epoch (0 s), over 2 slots: 410 s
    report(p, trials, b, [0.5, 0.5])
    p._status()
    assert "| elapsed 3m20s | ETA ~7m |" in lines(capsys, "status")[-1]
    clock.now = 850
    p._status()
    assert "| elapsed 14m10s | ETA ~50s (time limit) |" in lines(capsys, "status")[-1]


def test_only_trials_slower_than_a_minute_per_epoch_get_a_line_per_epoch(capsys):
    clock = Clock()
    p = printer(clock, max_epochs=10)
    slow, fast = make_trial(1, "mobilenet_v2"), make_trial(2)
    trials = [slow, fast]
    for trial in trials:
        p.on_trial_start(iteration=0, trials=trials, trial=trial)
    clock.now = 100
    report(p, trials, slow, [0.55, 0.63, 0.61], epoch_s=72.4)
    report(p, trials, fast, [0.55, 0.63, 0.61], epoch_s=SLOW_EPOCH_S - 1)
    assert lines(capsys, "epoch") == [
        "[   100s] epoch    trial_001_mobilenet_v2  1/10  val_balanced_accuracy=0.5500 (best 0.5500)  72s/epoch",
        "[   100s] epoch    trial_001_mobilenet_v2  2/10  val_balanced_accuracy=0.6300 (best 0.6300)  72s/epoch",
        "[   100s] epoch    trial_001_mobilenet_v2  3/10  val_balanced_accuracy=0.6100 (best 0.6300)  72s/epoch",
    ]


def test_the_first_epoch_s_set_up_does_not_make_a_trial_slow(capsys):
    """``epoch_s`` (the epoch itself) decides, not Ray's ``time_this_iter_s`` (which holds the set-up before epoch 1)."""
    clock = Clock()
    p = printer(clock)
    trial = make_trial(0)
    p.on_trial_start(iteration=0, trials=[trial], trial=trial)
    result = {METRIC: 0.5, "epoch": 1, "epoch_s": 2.0, "time_this_iter_s": 95.0}
    p.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)
    assert lines(capsys, "epoch") == []


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (250, "4m10s"), (7500, "2h05m")])
def test_durations(seconds, text):
    assert progress._duration(seconds) == text


@pytest.mark.parametrize("seconds, text", [(0, "~5s"), (42, "~40s"), (250, "~4m"), (4800, "~1h20m")])
def test_estimates_are_rounded_as_rough_as_they_are(seconds, text):
    assert progress._rough(seconds) == text


def test_next_steps_name_the_report_command_for_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = next_steps(StudyFolder("runs", "quickstart"))
    assert steps[0] == "next: python -m analysis.report runs/quickstart   (or: medsearch report runs/quickstart)"
    assert "--evaluate" in steps[1]
    elsewhere = StudyFolder(tmp_path.parent / "other runs", "quickstart")
    assert f"report '{tmp_path.parent / 'other runs' / 'quickstart'}'" in next_steps(elsewhere)[0]


def test_next_steps_for_a_bucket_copy_it_first():
    folder = SimpleNamespace(is_local=False, name="melanoma", uri=lambda: "s3://bucket/runs/melanoma")
    steps = next_steps(folder)
    assert "s3://bucket/runs/melanoma" in steps[0]
    assert steps[1] == """  python -c 'import pyarrow.fs as fs; fs.copy_files("s3://bucket/runs/melanoma", "melanoma")'"""
    assert steps[2] == "  python -m analysis.report melanoma   (or: medsearch report melanoma)"


def test_every_line_is_one_plain_line_with_the_elapsed_prefix(capsys):
    clock = Clock()
    p = printer(clock)
    trial = make_trial(0)
    p.on_trial_start(iteration=0, trials=[trial], trial=trial)
    report(p, [trial], trial, [0.5] * 6, epoch_s=80)
    p.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    for line in out_lines(capsys):
        assert re.fullmatch(r"\[ {0,5}\d+s\] (start|epoch|status|finished) {1,5}\S.*", line), line
        assert "\x1b" not in line  # no terminal control codes: a Ray job log reads the same


def test_the_printer_pickles_as_ray_needs():
    p = ProgressPrinter(metric=METRIC, mode="max", max_epochs=6, num_samples=4)
    assert pickle.loads(pickle.dumps(p)).clock is p.clock


def test_the_summary_says_the_top_score_flatters_and_how_to_correct_it(tmp_path, monkeypatch):
    import pandas as pd

    from search.progress import selection_note

    monkeypatch.chdir(tmp_path)
    board = pd.DataFrame({"best_val_auc": [0.9, 0.8, None]})
    note = selection_note(StudyFolder("runs", "s"), board, "val_auc")
    assert note.startswith("note: the top best_val_auc is the best of 2 trials on the same validation images")
    assert "python -m analysis.evaluate runs/s --split val " in note  # a command that runs, in this folder
    assert selection_note(StudyFolder("runs", "s"), board.head(1), "val_auc") is None  # one trial: nothing chosen
