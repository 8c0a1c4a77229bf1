"""Everything after the search, from a study's results folder (``runs/<study>/``); no Ray needed.

Command lines:

    python -m analysis.report RUN_DIR [--evaluate] [--top-k 3]   # RUN_DIR/report.md and self-contained report.html
    python -m analysis.evaluate RUN_DIR [--top-k 3] [--ensemble K|auto] [--tta flips|dihedral]
                                [--target-sensitivity S]          # the final model, fitted on validation, scored on test
    python -m analysis.export RUN_DIR --format keras|savedmodel|tflite|onnx  # the calibrated best model, verified
    python -m analysis.model_card RUN_DIR                         # model_card.md from the folder's files
    python -m analysis.leaderboard RUN_DIR... [--out FILE]        # one row per study x backbone, Parquet + Markdown

Modules:

- ``reader``: the one reader of a results folder: its record, leaderboard, "the best trial" and its model
  (``search.predict``, ``evaluate``, ``export``, ``results`` and the report all open a run here);
- ``results``: ``load_results(folder)``, the Python API's view of a finished or partial run;
- ``tables``: best trial per backbone and per backbone x unfreeze depth, best-so-far against compute,
  the budget ASHA saved (pure pandas);
- ``plots``: learning curves, hyperparameter plots, Optuna parameter importance, test confusion matrix,
  best-so-far (matplotlib PNGs);
- ``evaluate``: the final model (ensemble, test-time augmentation, temperature, threshold; fitted on
  validation) and the top-k trials on the held-out test split, with bootstrap confidence intervals;
- ``calibration``, ``operating_point``: temperature scaling and calibration error; thresholds for a target
  sensitivity or specificity, and the metrics at them;
- ``model_card``: ``model_card.md``, stated from the folder's files only;
- ``report``: the Markdown and HTML report;
- ``leaderboard``: the cross-study leaderboard;
- ``published``: published rows of the reference studies, and ours beside them;
- ``export``: a deployable copy of a trial's model, checked against the checkpoint.

Submodules are imported on use (``from analysis import tables``), so importing
``analysis`` alone loads neither matplotlib nor TensorFlow.
"""

__all__ = ["reader", "results", "tables", "plots", "evaluate", "calibration", "operating_point", "model_card",
           "report", "leaderboard", "published", "export"]
