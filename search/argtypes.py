"""Argument types for every command line: each refuses a bad value with the value and what it must be."""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_int", "positive_int", "non_negative_float", "positive_float", "probability", "non_empty"]


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):  # float() reads "nan" and "inf"; neither is a resource request
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text!r}")
    return value


def non_empty(text: str) -> str:
    """A path or address: an empty one would silently mean the current folder, or no flag at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}; leave the flag out for its default")
    return text
