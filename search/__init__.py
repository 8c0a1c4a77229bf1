"""Study files, the study runner and its results.

A study file does ``from search import Study, Dataset`` and defines ``STUDY``;
a notebook runs one with ``run_study(study)`` and reads it with ``load_results(folder)``.
"""

import search.tf_env  # noqa: E402,F401  TensorFlow's log level, before TensorFlow is first imported
from search.study import Dataset, Study, StudyError, load_study

__all__ = ["Dataset", "Study", "StudyError", "load_study", "run_study", "load_results", "StudyInterrupted",
           "StudyFailed"]


def __getattr__(name: str):
    """The runner and the results reader, imported when first asked for: a study file needs neither."""
    if name == "run_study":
        from search.api import run_study

        return run_study
    if name == "load_results":
        from analysis.results import load_results

        return load_results
    if name in ("StudyInterrupted", "StudyFailed"):
        from search import run

        return getattr(run, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
