"""``medsearch COMMAND ...``: one command for every tool; ``python -m <module>`` works as well.

Each subcommand hands its arguments to the module's own ``main``, so flags,
help and exit codes are the module's. Nothing heavy is imported until a
subcommand runs.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# subcommand -> (module, what it does)
COMMANDS = {
    "run": ("search.run", "run or resume a study (Ray Tune + Optuna TPE + ASHA)"),
    "report": ("analysis.report", "write report.md and report.html for a results folder"),
    "evaluate": ("analysis.evaluate", "score the top trials on the held-out test split (the one reader of it)"),
    "export": ("analysis.export", "export the best trial's model (keras, savedmodel, tflite, onnx), calibrated, verified"),
    "predict": ("search.predict", "classify a folder of new images with the model a study ships"),
    "weights": ("search.weights", "download or check official Keras ImageNet weight files"),
    "leaderboard": ("analysis.leaderboard", "one table of the trials of one or more results folders"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"medsearch {version('medsearch')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from trainables.checks import unknown_name_message

        print(f"error: {unknown_name_message('command', command, list(COMMANDS))}\n\n{_usage()}", file=sys.stderr)
        return 2
    from search.argtypes import INVOKED_AS

    module = COMMANDS[command][0]
    INVOKED_AS[module] = f"medsearch {command}"  # its usage lines and errors say what the user typed
    return importlib.import_module(module).main(rest)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: medsearch COMMAND [ARGS...]   (medsearch COMMAND --help for its flags; medsearch --version)\n\n"
            "commands:\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
