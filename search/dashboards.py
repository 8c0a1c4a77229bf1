"""The dashboards users already run, fed by a study: optuna-dashboard, TensorBoard and (opt-in) MLflow.

- **optuna-dashboard**: the results folder holds ``optuna.db``, an SQLite copy of the
  search's Optuna study (``search.optuna_mirror.OptunaMirror`` keeps it up to date),
  so ``optuna-dashboard sqlite:///runs/<study>/optuna.db`` and ``optuna.load_study``
  work while the study runs and after. Only a local (or shared) folder has one: SQLite
  cannot live in a bucket.
- **TensorBoard**: Ray Tune writes event files (metrics per epoch, hyperparameters
  at the end) into each trial's folder: ``tensorboard --logdir runs/<study>``.
- **MLflow**: ``--mlflow-uri URI`` logs each trial as an MLflow run (params, metrics
  per epoch) through Ray's ``MLflowLoggerCallback``; needs ``pip install 'medsearch[mlflow]'``.

Nothing heavy is imported here at module level: ``search.run`` checks the MLflow flag
with this module before Ray starts.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

from search.study import StudyError

__all__ = ["OPTUNA_DB", "DASHBOARDS_EXTRA", "MLflowUnavailableError", "installed", "check_mlflow", "mlflow_callback", "optuna_db_url",
           "dashboards_line", "is_file_store"]

OPTUNA_DB = "optuna.db"  # in the results folder, next to leaderboard.parquet
MLFLOW_EXTRA = "pip install 'medsearch[mlflow]'"
DASHBOARDS_EXTRA = "pip install 'medsearch[dashboards]'"
# each dashboard the start line names -> the module its command needs
DASHBOARD_MODULES = {"optuna-dashboard": "optuna_dashboard", "tensorboard": "tensorboard"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class MLflowUnavailableError(StudyError):
    """``--mlflow-uri`` was given but MLflow is not installed: raised before Ray starts."""


def check_mlflow(uri: str) -> None:
    """Refuse ``--mlflow-uri`` early, naming the install command, when MLflow cannot be imported."""
    if importlib.util.find_spec("mlflow") is None:
        raise MLflowUnavailableError(f"--mlflow-uri {uri!r} logs the trials to MLflow, which is not installed "
                                     f"here: {MLFLOW_EXTRA} (or leave the flag out)")


def is_file_store(uri: str) -> bool:
    """Whether ``uri`` names MLflow's file store (``file://...`` or a plain folder) rather than a server or DB."""
    return uri.startswith("file:") or "://" not in uri


def mlflow_callback(uri: str, study_name: str):
    """Ray's ``MLflowLoggerCallback``: one MLflow run per trial in the experiment named after the study.

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a ``file://`` URI
    (or a plain folder) given on purpose opts in, for this process (the driver logs the runs).
    """
    check_mlflow(uri)
    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=study_name, tags={"medsearch_study": study_name},
                                save_artifact=False)


def optuna_db_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of an SQLite file, e.g. ``sqlite:///runs/quickstart/optuna.db`` (4 slashes if absolute)."""
    return f"sqlite:///{Path(path).as_posix()}"


def _shown(path: str) -> str:
    """``path`` relative to the current folder when it lies below it (shorter to copy), else as it is."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def dashboards_line(folder, *, mlflow_uri: str | None = None, have=installed) -> str:
    """One line saying how to watch the study: the commands to copy, where MLflow logs, and the install command
    when a dashboard is not installed here (``have(module)``: whether it is).

    ``folder``: the study's ``search.storage.StudyFolder``.
    """
    parts = []
    if folder.is_local:
        parts.append(f"optuna-dashboard {shlex.quote(optuna_db_url(_shown(f'{folder.path}/{OPTUNA_DB}')))}")
        parts.append(f"tensorboard --logdir {shlex.quote(_shown(folder.path))}")
    else:
        parts.append(f"tensorboard --logdir {shlex.quote(folder.uri())}")
    if mlflow_uri:
        parts.append(f"MLflow experiment {folder.name!r} at {mlflow_uri}")
    line = "dashboards: " + "  |  ".join(parts)
    if not folder.is_local:
        line += f"  (no {OPTUNA_DB} for optuna-dashboard: SQLite needs a local results folder, not a bucket)"
    named = {part.split(" ", 1)[0] for part in parts}
    missing = [name for name, module in DASHBOARD_MODULES.items() if name in named and not have(module)]
    if missing:
        line += f"  ({' and '.join(missing)} not installed here: {DASHBOARDS_EXTRA})"
    return line
