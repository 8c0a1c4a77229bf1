# Two commands do all the set-up on a fresh machine:
#   make quickstart   install into .venv, then run spaces/quickstart.py (no download needed)
#   make test         install into .venv, then run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-fast

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

quickstart: install
	$(PY) -m search.run spaces/quickstart.py

test: install
	$(PY) -m pytest

# The fast tier: everything but the end-to-end runs with real Ray.
test-fast: install
	$(PY) -m pytest -m "not e2e"
