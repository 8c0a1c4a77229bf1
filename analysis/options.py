"""The options that choose the final model, shared by ``analysis.evaluate`` and ``analysis.report --evaluate``.

One owner for their flags, help, checks and the names ``evaluate_top_k`` takes them by.
"""

from __future__ import annotations

from analysis.errors import EvaluateError
from analysis.final_model import TTA_MODES
from analysis.prevalence import PrevalenceError, check_prevalence
from analysis.selection import TTA_AUTO, parse_ensemble
from analysis.splits import DATA_DIR_HELP

__all__ = ["FINAL_MODEL_OPTIONS", "add_final_model_arguments", "check_final_model_arguments", "final_model_options"]

FINAL_MODEL_OPTIONS = ("ensemble", "tta", "target_sensitivity", "target_specificity", "positive_class", "prevalence",
                       "data_dir", "refit")


def add_final_model_arguments(parser) -> None:
    """The options that choose the final model (and find the images), shared by analysis.report --evaluate."""
    parser.add_argument("--data-dir", metavar="DIR", default=None, help=DATA_DIR_HELP)
    final = parser.add_argument_group(
        "the final model", "fitted on the validation split only, written to RUN_DIR/final_model.json (used by "
        "python -m search.predict), then scored on the test split beside the single best trial")
    final.add_argument("--ensemble", metavar="K|auto", default=None,
                       help="also score the mean of the top K trials' probabilities; auto: K (1-5) chosen on "
                       "validation by the study's metric. With auto (here or in --tta) the final model is the "
                       "candidate that scores best on validation; otherwise it is the combination asked for")
    final.add_argument("--tta", choices=(*TTA_MODES, TTA_AUTO), default=None,
                       help="also score test-time augmentation: flips (4 views: mirrored left-right, up-down, both) "
                       "or dihedral (8 views: also rotated by 90 degrees; for images with no up, e.g. dermoscopy); "
                       "auto: with and without dihedral, whichever scores higher on validation")
    final.add_argument("--target-sensitivity", type=float, metavar="S", default=None,
                       help="threshold: the highest whose validation sensitivity for the positive class is >= S "
                       "(e.g. 0.95 for screening); default: Youden's J")
    final.add_argument("--target-specificity", type=float, metavar="S", default=None,
                       help="threshold: the lowest whose validation specificity is >= S")
    final.add_argument("--prevalence", type=float, metavar="P", default=None,
                       help="the positive class's share where the model will be used (e.g. 0.02): PPV and NPV are "
                       "reported at it beside the test set's own; default: the study's prevalence, else 1%%, 5%% "
                       "and 20%%")
    final.add_argument("--refit", action="store_true",
                       help="once everything is chosen and fitted on validation, train the final model's members "
                       "again on train + val for their best epoch count and ship those (temperature and threshold "
                       "kept); the model before the refit is scored beside it. Needs a test split")
    final.add_argument("--positive-class", metavar="NAME", default=None,
                       help="the class the threshold is for (default: the study's positive_class; for more than two "
                       "classes, naming one adds a threshold for it, e.g. mel)")


def check_final_model_arguments(parser, args) -> None:
    """``parser.error`` on a bad final-model option; ``args.ensemble`` parsed."""
    for flag in ("target_sensitivity", "target_specificity"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be strictly between 0 and 1, got {value}; e.g. 0.95")
    try:
        check_prevalence(args.prevalence)
    except PrevalenceError as exc:
        parser.error(str(exc))
    try:
        args.ensemble = parse_ensemble(args.ensemble)
    except EvaluateError as exc:
        parser.error(str(exc))


def final_model_options(args) -> dict:
    """The final-model options of parsed ``args``, as ``evaluate_top_k`` takes them."""
    return {name: getattr(args, name) for name in FINAL_MODEL_OPTIONS}
