"""One-line errors for the command-line tools.

Expected failures (bad config, bad data, unknown names, unusable checkpoints, a non-finite loss)
are raised as the exception types collected here; ``run_cli`` prints them as a single
``error: ...`` line and exits with status 2, instead of a traceback. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys


class UnitsError(ValueError):
    """Units that resolve to no layer, or a module name the model does not have."""


def user_errors() -> tuple:
    from selectivity.data.datasets import DataError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .models import ModelError
    from .trainer import TrainingError
    return DataError, ConfigError, ModelError, CheckpointError, TrainingError, UnitsError


def run_cli(main, argv=None) -> None:
    try:
        main(argv)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
