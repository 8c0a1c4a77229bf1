"""``run_study``: what ``python -m search.run`` does, from Python, raising instead of exiting.

    from search import Dataset, Study, load_results, run_study

    results = run_study(study, storage="runs", max_concurrent=2)   # a Study, or a study file's path
    results.leaderboard, results.best_trial
    model = results.load_model()

Errors found before Ray starts are raised as ``StudyError``, ``DatasetError``,
``StorageError`` or ``WeightsUnavailableError``; an interrupted run raises
``StudyInterrupted`` and a failed one ``StudyFailed``, each with the way to resume.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_study"]


def run_study(study, *, storage: str = "runs", resume: bool = False, force: bool = False,
              num_samples: int | None = None, max_epochs: int | None = None, seed: int | None = None,
              max_concurrent: int | None = None, cpus_per_trial: float | None = None,
              gpus_per_trial: float | None = None, data_dir: str | None = None, weights_dir: str | None = None,
              address: str | None = None, name: str | None = None, activation_cache: bool | None = None, smoke: bool = False,
              skip_corrupt: bool = False, verbose: bool = False, mlflow_uri: str | None = None,
              callbacks=(), deadline: float | None = None):
    """Run ``study`` (a ``Study`` or a study file's path) and return its ``analysis.results.Results``
    (for a bucket ``storage``, the results folder's URI).

    The keyword arguments are the command line's flags (``python -m search.run --help``), with the
    same checks. ``callbacks``: extra Ray Tune callbacks. ``deadline``: a wall-clock time (``time.time()``)
    after which no trial starts, counting data loading and Ray's start. A ``Study`` built in code has no file to
    compare a resume with: ``resume=True`` continues the folder's search with the ``Study`` you pass,
    so pass the same one.
    """
    from analysis.results import load_results
    from search.run import execute, parse_args
    from search.study import Study, StudyError

    if isinstance(study, (str, Path)):
        study_file, given = str(study), None
    elif isinstance(study, Study):
        study_file, given = study.source, study
    else:
        raise StudyError(f"run_study: study must be a Study or a study file's path, got {type(study).__name__}")
    argv = [study_file or "<Study built in code>", "--storage", str(storage)]
    for flag, value in (("--num-samples", num_samples), ("--max-epochs", max_epochs), ("--seed", seed),
                        ("--max-concurrent", max_concurrent), ("--cpus-per-trial", cpus_per_trial),
                        ("--gpus-per-trial", gpus_per_trial), ("--data-dir", data_dir),
                        ("--weights-dir", weights_dir), ("--address", address), ("--name", name),
                        ("--mlflow-uri", mlflow_uri)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--resume", resume), ("--force", force), ("--smoke", smoke),
                                   ("--skip-corrupt", skip_corrupt), ("--verbose", verbose),
                                   ("--no-activation-cache", activation_cache is False)) if on]
    try:
        args = parse_args(argv)  # the command line's own checks, as errors instead of exits
    except SystemExit:
        raise StudyError(f"run_study: bad arguments {argv[1:]} (see the message above)") from None
    args.study_file = study_file
    folder = execute(args, study=given, callbacks=tuple(callbacks), deadline=deadline)
    return load_results(folder.path) if folder.is_local else folder.uri()
