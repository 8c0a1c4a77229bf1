"""Study files, the study runner and its results.

A study file does ``from search import Study, Dataset`` and defines ``STUDY``.
"""

from search.study import Dataset, Study, StudyError, load_study

__all__ = ["Dataset", "Study", "StudyError", "load_study"]
