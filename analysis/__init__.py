"""Reports from a study's results folder (``runs/<study>/``); no Ray needed.

Command lines:

    python -m analysis.report RUN_DIR [--evaluate] [--top-k 3]   # RUN_DIR/report.md and self-contained report.html
    python -m analysis.leaderboard RUN_DIR... [--out FILE]        # one row per study x backbone, Parquet + Markdown
    python -m analysis.evaluate RUN_DIR [--top-k 3]               # top-k trials on the held-out test split
    python -m analysis.export RUN_DIR --format keras|tflite|savedmodel  # a deployable copy of the best model

Modules:

- ``tables``: load a folder (``load_run``), best trial per backbone and per backbone x unfreeze depth,
  best-so-far against compute, the budget ASHA saved (pure pandas);
- ``plots``: learning curves, hyperparameter plots, Optuna parameter importance, test confusion matrix,
  best-so-far (matplotlib PNGs);
- ``report``: the Markdown and HTML report;
- ``leaderboard``: the cross-study leaderboard;
- ``published``: published rows of the reference studies, and ours beside them;
- ``evaluate``: held-out test evaluation of the top-k trials, with bootstrap confidence intervals;
- ``export``: a deployable copy of a trial's model (Keras, SavedModel, TFLite), checked against the checkpoint.

Submodules are imported on use (``from analysis import tables``), so importing
``analysis`` alone loads neither matplotlib nor TensorFlow.
"""

__all__ = ["tables", "plots", "report", "leaderboard", "published", "evaluate", "export"]
