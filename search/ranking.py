"""The one rule that orders trials, and so decides "the best trial" everywhere.

By ``best_<metric>`` (the study's mode), ties (common for accuracies on small
validation sets) to the lower validation loss at the best epoch, then the
order the rows came in. The leaderboard is written in this order, and
``analysis.reader`` takes its first trial with a checkpoint for search.predict, analysis.evaluate,
analysis.export, analysis.results and the report.
"""

from __future__ import annotations

__all__ = ["rank"]


def rank(board, column: str, mode: str):
    """``board`` sorted best first by ``column`` with the tie rule above; rows without a value last."""
    keys, ascending = [column], [mode == "min"]
    if column != "best_val_loss" and "best_val_loss" in board.columns:
        keys.append("best_val_loss")
        ascending.append(True)
    return board.sort_values(keys, ascending=ascending, na_position="last", kind="stable")
