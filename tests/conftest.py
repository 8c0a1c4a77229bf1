"""Shared test setup: make ``tests/fixtures`` importable as ``fixtures``."""

import sys
from pathlib import Path

# pytest's default "prepend" import mode already puts tests/ on sys.path for this conftest;
# doing it explicitly keeps ``from fixtures.datasets import ...`` working under --import-mode=importlib too.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
