"""A short reporting checklist for the model card: the TRIPOD+AI and CLAIM topics a reviewer looks for.

Each item is "present" with where the folder holds it, or "not recorded" with how
to add it. Only what the folder's files show counts as present; nothing is
filled in. Topics, not item numbers: both guidelines number differently across
versions, and a wrong number is worse than none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

__all__ = ["Item", "checklist", "checklist_frame"]

BASE_SPLIT_COLUMNS = {"path", "label", "label_index", "group", "origin", "split", "fold"}


@dataclasses.dataclass(frozen=True)
class Item:
    topic: str
    present: bool
    where: str  # where it is (present) or how to add it (not recorded)


def checklist(run_dir: Path, study: dict, evaluation: dict, final_model: dict) -> list[Item]:
    """The items, from the folder's files: study.json's study, the latest final evaluation, final_model.json."""
    ds = study.get("dataset") or {}
    splits = run_dir / "splits.parquet"
    columns = set(pd.read_parquet(splits).columns) if splits.is_file() else set()
    metadata = sorted(columns - BASE_SPLIT_COLUMNS)
    grouped = ds.get("split") == "grouped"
    audited = (run_dir / "near_duplicates.parquet").is_file()
    chosen = next((m for m in (evaluation.get("final") or {}).get("models") or []
                   if m.get("label") == (evaluation.get("final") or {}).get("model")), {})
    op = chosen.get("operating_point") or {}

    def item(topic, present, where, how):
        return Item(topic, bool(present), where if present else how)

    return [
        item("Intended use, users and setting", study.get("intended_use"), "Intended use (study.json)",
             "set Study(intended_use=..., intended_users=..., not_for=...)"),
        item("Prevalence in the intended setting", study.get("prevalence") is not None, "Results: PPV and NPV at it",
             "set Study(prevalence=...) or pass --prevalence P to analysis.evaluate"),
        item("Data source and eligibility", ds.get("loader"), "Data (study.json: loader, options, skipped images)",
             "name the dataset in the study file"),
        item("Reference standard (how labels were obtained)", "dx_type" in columns,
             "splits.parquet: dx_type", "describe it in Study(description=...); the folder does not record it"),
        item("Data partitions, fixed before training", splits.is_file(), "Protocol (splits.parquet, split seed)",
             "run the study with search.run, which writes splits.parquet"),
        item("Leakage control (patients, lesions, near-duplicates)", grouped or audited,
             "Protocol: " + ", ".join(x for x, on in (("grouped split", grouped), ("near-duplicate audit", audited))
                                      if on),
             "Dataset(split='grouped') with patient or lesion ids, and the near-duplicate audit"),
        item("Model and hyperparameters, tuned on validation only", final_model.get("trials"),
             "Model (final_model.json, leaderboard.parquet)", "run python -m analysis.evaluate"),
        item("Performance with confidence intervals", chosen.get("ci"), "Results (bootstrap intervals)",
             "run python -m analysis.evaluate"),
        item("Operating point chosen before test", op, "Results: operating point (fitted on validation)",
             "set dataset.positive_class, and --target-sensitivity S for a screening threshold"),
        item("Calibration", chosen.get("calibration"), "Calibration", "run python -m analysis.evaluate"),
        item("Subgroup performance", metadata, f"Subgroups ({', '.join(metadata)} in splits.parquet)",
             "give per-image metadata (HAM10000 has age, sex, site; a folder study: a metadata CSV)"),
        item("Failure analysis", chosen, "Failure modes (test_predictions.parquet)", "run python -m analysis.evaluate"),
        item("External validation (another site or device)", False, "",
             "evaluate the exported model on data from another site; the folder holds one dataset only"),
        item("Software and versions", True, "Software (study.json)", ""),
    ]


def checklist_frame(items: list[Item]) -> pd.DataFrame:
    return pd.DataFrame([{"topic": i.topic, "status": "present" if i.present else "not recorded",
                          "where / how to add it": i.where} for i in items])
