"""Figure helpers every drawing module shares: the ``Plot`` a report shows, a new figure, and saving it whole.

Drawing takes data and returns a ``Plot``; nothing here reads the results folder.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from analysis.files import write_file

__all__ = ["FIGSIZE", "DPI", "Plot", "figure", "save"]

FIGSIZE = (7.0, 4.2)
DPI = 100


@dataclasses.dataclass
class Plot:
    name: str  # file stem, e.g. "learning_curves"
    title: str
    path: Path | None  # None when skipped
    note: str = ""


def figure(figsize=FIGSIZE):
    """A matplotlib ``Figure`` (no pyplot state), constrained layout."""
    from matplotlib.figure import Figure  # matplotlib only where a figure is drawn

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def save(fig, out_dir: Path, name: str) -> Path:
    """Render in memory, then write whole: a full disk leaves no half PNG (``AnalysisError`` instead)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_file(Path(out_dir) / f"{name}.png", buffer.getvalue())
