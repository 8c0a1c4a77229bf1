"""A CLI that forgives (issue 29.5): a mistyped flag gets a did-you-mean, and usage lines say what the user typed."""

import pytest

from search import argtypes
from search.cli import COMMANDS, main as medsearch


@pytest.fixture(autouse=True)
def fresh_invocations(monkeypatch):
    monkeypatch.setattr(argtypes, "INVOKED_AS", {})


def refused(call, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 2
    return capsys.readouterr().err


# Each command's positional arguments, so that argparse reaches the flags (nothing runs: the typo stops it).
POSITIONALS = {"run": ["study.py"], "report": ["runs/x"], "evaluate": ["runs/x"], "export": ["runs/x", "--format", "keras"],
               "predict": ["runs/x", "images"], "weights": ["check", "weights_dir"], "leaderboard": ["runs/x"]}


def test_every_command_is_covered():
    assert set(POSITIONALS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_suggests_the_flag_and_names_itself_as_typed(command, capsys):
    err = refused(lambda: medsearch([command, *POSITIONALS[command], "--hlep"]), capsys)
    assert "unrecognized arguments: --hlep; did you mean --help?" in err
    assert err.startswith(f"usage: medsearch {command}")


def test_the_issues_own_typos(capsys):
    from analysis.report import main as report
    from search.run import main as run

    err = refused(lambda: run(["spaces/quickstart.py", "--num-sample", "3"]), capsys)
    assert "did you mean --num-samples?" in err and err.startswith("usage: python -m search.run ")
    err = refused(lambda: report(["runs/x", "--evalute"]), capsys)
    assert "did you mean --evaluate?" in err and err.startswith("usage: python -m analysis.report ")


def test_several_typos_are_each_answered_and_nonsense_gets_no_guess():
    flags = ["--num-samples", "--max-epochs", "--help"]
    assert argtypes.did_you_mean("unrecognized arguments: --num-sample 3 --max-epoch=2", flags) == \
        "; did you mean --num-samples (for --num-sample), --max-epochs (for --max-epoch)?"
    assert argtypes.did_you_mean("unrecognized arguments: --zzzzzz", flags) == ""
    assert argtypes.did_you_mean("the following arguments are required: run_dir", flags) == ""


def test_abbreviations_are_refused_not_guessed(capsys):
    from search.run import main as run

    err = refused(lambda: run(["spaces/quickstart.py", "--num", "3"]), capsys)
    assert "unrecognized arguments: --num" in err


def test_tensorflow_says_nothing_of_cuda_on_a_machine_without_a_gpu():
    import glob
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", "import search.tf_env, tensorflow as tf; tf.config.list_physical_devices()"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    if not glob.glob("/dev/nvidia[0-9]*"):
        assert "failed call to cuInit" not in done.stderr
