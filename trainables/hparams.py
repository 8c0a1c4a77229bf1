"""The trial hyperparameters: names, defaults, valid values, and what a trial really trains with.

The one owner of these facts. It imports no Keras, so study validation
(``search.study``), the leaderboard (``search.results``) and ``analysis`` use it
cheaply; the trial itself (``trainables.train``) trains with ``effective_hparams``.
"""

from __future__ import annotations

from typing import Callable

from trainables.checks import is_int, is_number, is_one_of, unknown_name_message

# Hyperparameters a trial understands, with the values used when a study leaves them out.
DEFAULTS = {
    "backbone": "mobilenet_v2",
    "weights": None,  # None or "imagenet"
    "unfreeze": "all",  # 0 = frozen backbone, k = top k layers, "all"
    "warmup_epochs": 0,  # epochs training the head alone before unfreezing (pretrained only)
    "learning_rate": 1e-3,  # head, or whole model when nothing is frozen
    "fine_tune_lr": 1e-5,  # unfrozen backbone layers, after the warm-up
    "dropout": 0.2,
    "head_units": 0,  # 0 = no hidden dense layer in the head
    "pooling": "avg",  # one of POOLINGS (the reference studies' small CNNs flatten)
    "augment": "none",  # a policy of trainables.augment: "none", "light" or "heavy"
    "class_weight": False,  # balanced class weights in the loss
    "label_smoothing": 0.0,  # share of each target spread evenly over all classes (0: none)
    "batch_size": 32,
}
HPARAM_NAMES = tuple(DEFAULTS)
POOLINGS = ("avg", "flatten")
# Where a trial ran: reported every epoch by the trial, kept in the leaderboard.
PLACEMENT = ("node_id", "gpu", "precision")


def _backbones() -> list[str]:
    from trainables.backbones import list_backbones  # the registry lists names without importing Keras

    return list_backbones()


def _augments() -> list[str]:
    from trainables.augment import POLICIES

    return list(POLICIES)


MAX_HEAD_UNITS, MAX_BATCH_SIZE = 16_384, 65_536

# Hyperparameters with a fixed set of valid values: functions, as backbones may be registered later.
_CHOICES: dict[str, Callable[[], list]] = {
    "backbone": _backbones,
    "augment": _augments,
    "weights": lambda: [None, "imagenet"],
    "pooling": lambda: list(POOLINGS),
    "class_weight": lambda: [True, False],
}
# The others: whether a value is valid, and the fix when it is not.
_RATE = (lambda v: is_number(v) and 0 < v < 1, "use a number in (0, 1)")
_COUNT = (lambda v: is_int(v, low=0), "use a non-negative integer")
_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "unfreeze": (lambda v: v == "all" or is_int(v, low=0), "use 0 (frozen), a layer count k > 0, or 'all'"),
    "learning_rate": _RATE,
    "fine_tune_lr": _RATE,
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "use a number in [0, 1)"),
    # Upper bounds: a hidden layer or a batch this large cannot fit in any memory; a trial would only
    # die of it after Ray started (an out-of-memory error, or a machine swapping to a halt).
    "head_units": (lambda v: is_int(v, low=0) and v <= MAX_HEAD_UNITS,
                   f"use 0 (no hidden layer) or a width up to {MAX_HEAD_UNITS}, e.g. 128 or 256"),
    "warmup_epochs": _COUNT,
    "label_smoothing": (lambda v: is_number(v) and 0 <= v < 1, "use a number in [0, 1), e.g. 0.1 (0: none)"),
    "batch_size": (lambda v: is_int(v, low=1) and v <= MAX_BATCH_SIZE,
                   f"use a positive integer up to {MAX_BATCH_SIZE}, e.g. 16 or 32"),
}


def valid_values(name: str) -> list | None:
    """The values hyperparameter ``name`` may take, for those with a fixed set; None for the others."""
    choices = _CHOICES.get(name)
    return choices() if choices else None


def hparam_problem(name: str, value) -> str | None:
    """What is wrong with hyperparameter ``name = value``, naming the fix; None when a trial can use it.

    Each value is judged alone; whether an ``unfreeze`` depth fits its backbone is ``search.study``'s check.
    """
    if name not in DEFAULTS:
        return unknown_name_message("hyperparameter", name, DEFAULTS)
    valid = valid_values(name)
    if valid is not None and not is_one_of(value, valid):
        return unknown_name_message(name, value, [str(v) for v in valid])
    if name in _RULES and not _RULES[name][0](value):
        return f"{name}: bad value {value!r}; {_RULES[name][1]}"
    return None


def resolve_hparams(config: dict, max_epochs: int | None = None, random_init: tuple[str, ...] = ()) -> dict:
    """Defaults overlaid with the trial's config; unknown keys are kept but unused."""
    return effective_hparams(config, max_epochs, random_init)[0]


def effective_hparams(config: dict, max_epochs: int | None = None,
                      random_init: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """What a trial given ``config`` really trains with, and a note for each value that differs from it.

    The one place these adjustments are made: the trial trains with the values, and the
    leaderboard records them (``search.results``), so it never shows what did not run.
    """
    hp, notes = {**DEFAULTS, **config}, []

    def adjust(key: str, value, why: str) -> None:
        if hp[key] != value:
            notes.append(f"{key} {hp[key]!r} -> {value!r}: {why}")
            hp[key] = value

    if hp["backbone"] in random_init:
        adjust("weights", None, "its ImageNet weights were unavailable (--smoke)")
    if hp["weights"] is None:
        adjust("warmup_epochs", 0, "nothing pretrained to protect from a cold head")
    if max_epochs is not None and hp["warmup_epochs"] >= max_epochs and hp["unfreeze"] not in (0, "0"):
        adjust("unfreeze", 0, f"the warm-up ({hp['warmup_epochs']} epochs) fills max_epochs ({max_epochs})")
    return hp, notes
