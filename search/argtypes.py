"""Every command line's parser and argument types: each refuses a bad value with the value and what it must be.

``ArgumentParser`` is argparse's, as every medsearch command uses it: no abbreviated
flags (a flag means what it says), the usage line in the form the user typed
(``medsearch run ...`` when the console script ran it, ``python -m search.run ...``
otherwise: ``INVOKED_AS``, set by ``search.cli``), and a did-you-mean for a
mistyped flag (argparse's own suggestions come only with Python 3.14).
"""

from __future__ import annotations

import argparse
import difflib
import math

__all__ = ["ArgumentParser", "INVOKED_AS", "did_you_mean", "non_negative_int", "positive_int", "non_negative_float",
           "positive_float", "probability", "non_empty"]

# module -> how the user typed the command, for a module run by the ``medsearch`` console script (search.cli)
INVOKED_AS: dict[str, str] = {}
MODULE_PROG = "python -m "


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without abbreviations, with the typed usage line and a did-you-mean."""

    def __init__(self, *args, prog: str | None = None, allow_abbrev: bool = False, **kwargs):
        if prog and prog.startswith(MODULE_PROG):
            prog = INVOKED_AS.get(prog.removeprefix(MODULE_PROG), prog)
        super().__init__(*args, prog=prog, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str):
        flags = [flag for action in self._actions for flag in action.option_strings]
        super().error(message + did_you_mean(message, flags))


def did_you_mean(message: str, flags: list[str]) -> str:
    """``"; did you mean --num-samples?"`` for argparse's "unrecognized arguments: --num-sample 3"; else ""."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return ""
    long_flags = [f for f in flags if f.startswith("--")]
    hints = []
    for word in message.removeprefix(prefix).split():
        typed = word.split("=", 1)[0]
        if typed.startswith("--"):
            close = difflib.get_close_matches(typed, long_flags, n=1, cutoff=0.6)
            if close:
                hints.append((typed, close[0]))
    if not hints:
        return ""
    if len(hints) == 1:
        return f"; did you mean {hints[0][1]}?"
    return "; did you mean " + ", ".join(f"{right} (for {typed})" for typed, right in hints) + "?"


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
