"""``medsearch COMMAND``: the installed console script reaches every tool."""

import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import COMMANDS

SCRIPT = Path(sys.executable).parent / "medsearch"


def medsearch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_version_and_usage():
    from importlib.metadata import version

    assert medsearch("--version").stdout.strip() == f"medsearch {version('medsearch')}"
    usage = medsearch("--help")
    assert usage.returncode == 0 and all(name in usage.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_answers_help_with_its_modules_flags(command):
    done = medsearch(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: medsearch {command} ")  # the module's own parser, named as typed


def test_a_misspelt_command_gets_a_did_you_mean():
    done = medsearch("reprot")
    assert done.returncode == 2 and "did you mean 'report'" in done.stderr
