"""Study files, the study runner and its results.

A study file does ``from search import Study, Dataset`` and defines ``STUDY``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported, by search.study

from search.study import Dataset, Study, StudyError, load_study

__all__ = ["Dataset", "Study", "StudyError", "load_study"]
