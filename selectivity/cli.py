"""Command-line support for the tools: the one-line error handling every tool's ``main`` runs under.

A user error (``errors.user_errors()``) is printed as ``error: <one line>`` with exit status 2,
before anything is written; ``Interrupted`` and Ctrl-C exit with 130. Everything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys

from selectivity.errors import Interrupted, one_line, user_errors

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def run_cli(main, argv=None) -> None:
    """Run a tool's ``main(argv)``; an int it returns is the exit status (0 otherwise)."""
    try:
        status = main(argv)
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(status, int) and not isinstance(status, bool) and status:
        sys.exit(status)
