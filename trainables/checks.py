"""How bad input is explained: did-you-mean messages and value tests that tell ``True`` from ``1``.

Study validation, the command lines and every registry (backbones, loaders, split
protocols, augmentation policies) use these, often before anything else has been
imported, so this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import difflib


def unknown_name_message(what: str, name: object, valid) -> str:
    """``unknown backbone 'mobilenetv2'; did you mean 'mobilenet_v2'?`` with the valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}{hint} Valid: {', '.join(valid)}"


def is_int(value, *, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low  # True is an int to Python


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_one_of(value, choices) -> bool:
    """``value in choices``, except that 1 is not True and 0.0 is not False (Python says they are equal)."""
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)
