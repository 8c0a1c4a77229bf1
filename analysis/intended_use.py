"""What a study's model is for, and what its numbers do not cover: read from ``study.json``, shown everywhere.

``Study(intended_use=..., intended_users=..., not_for=..., prevalence=...)``
records the intended setting; a study on generated images (a loader registered
``synthetic=True``, such as ``embedded``) is marked ``SYNTHETIC`` in the model
card, the report and every export sidecar, so a quickstart model is never
mistaken for a clinical one.
"""

from __future__ import annotations

__all__ = ["SYNTHETIC", "FIELDS", "is_synthetic", "intended_use"]

SYNTHETIC = "synthetic data: not for clinical use"
FIELDS = ("intended_use", "intended_users", "not_for")


def is_synthetic(study: dict) -> bool:
    """Whether the study's loader generates its images (``register_loader(..., synthetic=True)``)."""
    from trainables.datasets import get_loader

    loader = (study.get("dataset") or {}).get("loader")
    try:
        return bool(get_loader(loader).synthetic)
    except ValueError:  # a loader this install does not have (registered by a study file): not known to be synthetic
        return False


def intended_use(study: dict) -> dict:
    """``intended_use``, ``intended_users``, ``not_for`` (None where not recorded), ``prevalence`` and
    ``synthetic``, with ``warning`` = ``SYNTHETIC`` for generated data."""
    synthetic = is_synthetic(study)
    return {**{f: study.get(f) or None for f in FIELDS}, "prevalence": study.get("prevalence"),
            "synthetic": synthetic, "warning": SYNTHETIC if synthetic else None}
