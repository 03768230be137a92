"""What every command-line tool shares: expected failures become one line on stderr and a non-zero exit.

A user who mistypes a path, passes a screen without a column, or points an output at their data needs one line
saying what is wrong, where, and what to do, not a traceback. `--debug` (or `CDCL_HF_DEBUG=1`) shows the traceback;
errors that are not expected (bugs) always show it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

__all__ = ["EXPECTED_ERRORS", "add_debug_argument", "command_errors", "one_line"]

# Failures caused by the input, the environment or the settings, each with a message written for the user.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, FloatingPointError, TypeError)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or set CDCL_HF_DEBUG=1)"
    )


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes repr adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(str(message).split()) or type(error).__name__
    return message


@contextlib.contextmanager
def command_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn expected failures inside the block into `SystemExit("<prog>: error: <message>")` (exit status 1)."""
    debug = debug or os.environ.get("CDCL_HF_DEBUG", "") not in ("", "0")
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(f"{prog}: interrupted") from None
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {one_line(error)}") from None
