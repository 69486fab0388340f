"""One exception type for bad user input, and one-line warnings.

Commands catch `UserError` at the top and print its message on one line (no traceback), so every check that
can fail on user input raises it with a message that says what is wrong and where.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input or a refused operation; the message is shown to the user as one line."""


def warn(msg: str) -> None:
    """Print a one-line warning on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def fail(msg: str):
    """End a command with ``error: msg`` on stderr and exit status 2 (both CLIs' way out on bad input)."""
    import typer

    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)
