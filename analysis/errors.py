"""The errors of ``analysis``: each message names the file or flag, the bad value and the fix.

They are siblings, not one hierarchy: a command catches what it can report and
lets the rest through (a report notes a lost checkpoint, but stops on a full disk).
"""

from __future__ import annotations

__all__ = ["AnalysisError", "ResultsFolderError", "EvaluateError"]


class AnalysisError(ValueError):
    """The folder is not a results folder, or lacks what an analysis needs."""


class ResultsFolderError(ValueError):
    """The folder is not a results folder, a file in it is damaged, or it lacks what was asked for."""


class EvaluateError(ValueError):
    """Something about the results folder or the evaluation request is wrong."""
