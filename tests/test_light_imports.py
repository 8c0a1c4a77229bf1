"""Writing and checking a study, and every command's ``--help``, import neither TensorFlow, Keras nor Ray.

Those take seconds to import (and TensorFlow grabs GPU memory); a study file, its
validation and a usage message need none of them. Each case runs in a fresh
interpreter, so nothing an earlier test imported can hide an import.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "ray")
# Printed last by every case: the heavy top-level packages the interpreter loaded.
_REPORT = f"\nimport sys\nprint('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
CLIS = ("search.run", "search.predict", "analysis.predict", "search.weights",
        "analysis.report", "analysis.evaluate", "analysis.export", "analysis.leaderboard", "search.cli")


def _heavy_modules(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter at the repository root: (heavy packages loaded, its output)."""
    done = subprocess.run([sys.executable, "-c", code + _REPORT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY "), done.stdout[-3000:]
    return eval(last.removeprefix("HEAVY ")), done.stdout  # noqa: S307 (a list of names we printed)


@pytest.mark.parametrize("module", CLIS)
def test_help_imports_no_heavy_framework(module):
    code = (f"import runpy, sys\nsys.argv = [{module!r}, '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n")
    heavy, out = _heavy_modules(code)
    assert "usage:" in out  # the help itself was printed
    assert heavy == [], f"python -m {module} --help imported {heavy}"


@pytest.mark.parametrize("code", [
    "import search",
    "from search import Dataset, Study, StudyError, load_study",
    "import trainables, trainables.hparams, trainables.backbones, trainables.augment, trainables.metrics",
])
def test_the_package_imports_no_heavy_framework(code):
    heavy, _ = _heavy_modules(code)
    assert heavy == [], f"{code!r} imported {heavy}"


def test_loading_and_validating_a_study_imports_no_heavy_framework():
    # melanoma's space checks backbones, unfreeze depths against their layer counts,
    # augment policies, ImageNet weights, the loader, the split protocol and the metric.
    code = ("from search import load_study\nfrom search.study import imagenet_backbones\n"
            "study = load_study('spaces/melanoma.py')\nprint(study.name, imagenet_backbones(study))\n")
    heavy, out = _heavy_modules(code)
    assert "melanoma ['efficientnet_b0', 'efficientnet_lite0', 'mobilenet_v2']" in out
    assert heavy == [], f"load_study imported {heavy}"


def test_a_bad_study_is_explained_without_heavy_frameworks(tmp_path):
    study = tmp_path / "typo.py"
    study.write_text("from search import Dataset, Study\n"
                     "STUDY = Study(name='t', space=lambda t: {'backbone': 'mobilenetv2', 'augment': 'light'})\n")
    code = ("from search import StudyError, load_study\n"
            f"try:\n    load_study({str(study)!r})\nexcept StudyError as exc:\n    print(exc)\n")
    heavy, out = _heavy_modules(code)
    assert "unknown backbone 'mobilenetv2'; did you mean 'mobilenet_v2'?" in out
    assert heavy == [], f"a StudyError imported {heavy}"
