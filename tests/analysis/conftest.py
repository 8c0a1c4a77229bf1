"""A small finished study folder, run once with real Ray, for every analysis test."""

import os

import pytest

from fixtures.studies import TINY_STUDY
from search.run import main

INTENDED_USE = "a test of the tooling on generated lesions"  # what the card and the report must carry
NOT_FOR = "any patient"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """``runs/tiny``: 4 trials of at most 3 epochs on the embedded dataset (stratified train/val/test)."""
    folder = tmp_path_factory.mktemp("analysis")
    study = folder / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", "4").replace("MAX_EPOCHS", "3")
                     .replace('name="tiny",', f'name="tiny", intended_use="{INTENDED_USE}", not_for="{NOT_FOR}",'))
    here = os.getcwd()
    os.chdir(folder)  # typed as a user types them, relative: study.json records the command as typed
    try:
        assert main(["tiny.py", "--storage", "runs", "--seed", "0"]) == 0  # seed 0 draws both backbones
    finally:
        os.chdir(here)
    return folder / "runs" / "tiny"
