"""Shared test set-up: caches in a per-session folder, quiet TensorFlow, study-file fixtures."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

# pytest's default "prepend" import mode already puts tests/ on sys.path for this conftest;
# doing it explicitly keeps ``from fixtures.datasets import ...`` working under --import-mode=importlib too.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Decoded arrays and generated datasets go to a throwaway folder, shared by the session."""
    root = tmp_path_factory.mktemp("medsearch")
    old = {k: os.environ.get(k) for k in ("MEDSEARCH_CACHE", "MEDSEARCH_DATA")}
    os.environ["MEDSEARCH_CACHE"] = str(root / "cache")
    os.environ["MEDSEARCH_DATA"] = str(root / "data")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def write_study(tmp_path):
    """``write_study(body)`` writes a study file whose ``body`` may use Study and Dataset."""

    def write(body: str, name: str = "study.py") -> Path:
        path = tmp_path / name
        path.write_text("from search import Dataset, Study\n" + body)
        return path

    return write
