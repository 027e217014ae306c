"""The expected failures, and how the command-line tools report them.

Expected failures (bad config, bad data, unknown names, unusable checkpoints, a failed write, a
non-finite loss) are raised as the exception types defined here; ``selectivity.cli.run_cli`` prints them as a
single ``error: ...`` line and exits with status 2, instead of a traceback. A Ctrl-C is one line
and status 130 (128 + SIGINT, the shell's convention). Anything else is a bug and keeps its
traceback.

This module sits at the bottom of the layering: it imports nothing of the project, so every
module can raise these without import cycles. The classes stay importable from the modules that
raised them first (``selectivity.train.config.ConfigError`` and so on).
"""
from __future__ import annotations



class ConfigError(ValueError):
    """A bad configuration value or key; the message names it and the fix."""


class DataError(ValueError):
    """Bad or missing input data; the message names the problem and the fix."""


class ModelError(ValueError):
    """Unknown model or bad model option; the message lists the valid choices."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a file write failed; the message says which file and why."""


class WriteError(CheckpointError):
    """A file could not be written (disk full, permissions, a library's failure underneath);
    ``cannot write <path>: <reason>``. A CheckpointError, so code catching that still catches it."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, run directory in use, …); the message says why."""


class AblationError(ValueError):
    """A bad ablation request (unknown layer, k out of range, bad mode); the message says which."""


class UnitsError(ValueError):
    """Units that resolve to no layer, or a module name the model does not have."""


class Interrupted(Exception):
    """Ctrl-C, reported as one line (where the run stopped and how to go on), exit status 130."""


def user_errors() -> tuple:
    return (DataError, ConfigError, ModelError, CheckpointError, TrainingError, AblationError,
            UnitsError)


def one_line(e: BaseException) -> str:
    """The error's message as one line. An error raised in a DataLoader worker reaches the main
    process re-raised with the worker's whole traceback in its message; its last line is the
    original ``Class: message``."""
    text = str(e).strip()
    if "Traceback (most recent call last)" not in text:
        return " ".join(text.split("\n"))
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else last
