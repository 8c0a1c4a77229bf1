"""Everything after the search, from a study's results folder (``runs/<study>/``); no Ray needed.

Command lines:

    python -m analysis.evaluate RUN_DIR [--top-k 3] [--ensemble K|auto] [--tta flips|dihedral|auto]
                                [--target-sensitivity S] [--prevalence P] [--data-dir DIR]
                                                                  # the final model, fitted on validation, scored on test
    python -m analysis.report RUN_DIR [--evaluate [evaluate's options]]  # report.md and self-contained report.html
    python -m analysis.predict RUN_DIR IMAGES_DIR                 # = search.predict: the final model on new images
    python -m analysis.export RUN_DIR --format keras|savedmodel|tflite|onnx  # the final model, verified on val
    python -m analysis.model_card RUN_DIR                         # model_card.md from the folder's files
    python -m analysis.leaderboard RUN_DIR... [--out FILE]        # one row per study x backbone, Parquet + Markdown

The layers, each importing only from those above it in this list:

- ground: ``errors`` (the error types), ``files`` (the folder's file names, writing a file whole, how outside
  paths are shown), ``reader`` (the record, the leaderboard, "the best trial" and its model), ``bootstrap``
  (metrics and percentile intervals), ``calibration``, ``operating_point``, ``records`` (the evaluation records
  read back), ``figures`` (``Plot`` and saving), ``splits`` (the evaluated splits, where their images are, and the
  test-split log), ``prevalence`` (PPV and NPV where the model is used), ``intended_use``;
- the run: ``tables`` (pure pandas), ``efficiency``, ``final_model`` (``FinalModel``: the one model a study
  ships, which everything below serves), ``selection`` (choosing it on validation), ``document``;
- features: ``plots``, ``curves``, ``explain``, ``ood`` (out-of-distribution warnings), ``subgroups``,
  ``headline`` (the answer first), ``checklist`` (TRIPOD+AI / CLAIM), ``model_card``, ``published``, ``results``
  (``load_results``);
- commands: ``evaluate``, ``export``, ``predict``, ``report`` (with ``report_evaluation``), ``leaderboard``.

Submodules are imported on use (``from analysis import tables``), so importing
``analysis`` alone loads neither matplotlib nor TensorFlow.
"""

__all__ = ["errors", "files", "reader", "bootstrap", "calibration", "operating_point", "records", "figures", "splits",
           "prevalence", "intended_use", "tables", "efficiency", "final_model", "selection", "document", "plots",
           "curves", "explain", "ood", "subgroups", "headline", "checklist", "model_card", "published", "results", "evaluate", "export", "predict", "report", "report_evaluation",
           "leaderboard"]
