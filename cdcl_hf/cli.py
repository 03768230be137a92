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

__all__ = [
    "CommandParser",
    "EXPECTED_ERRORS",
    "add_debug_argument",
    "command_errors",
    "one_line",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "fraction",
    "probability",
]

# Failures caused by the input, the environment or the settings, each with a message written for the user.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, FloatingPointError, TypeError)


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line, `<prog>: error: <message> (see <prog> --help)`, exit 2.

    argparse prints the whole usage block before the error; for a command with many options that buries the one line
    that says what is wrong. Sub-commands (`add_subparsers`) get the same class.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


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
    """Turn expected failures inside the block into `SystemExit("<prog>: error: <message>")` (exit status 1).

    A `SystemExit` with a message (a refusal raised deeper down) gets the same prefix.
    """
    debug = debug or os.environ.get("CDCL_HF_DEBUG", "") not in ("", "0")
    try:
        yield
    except SystemExit as exit_:
        if isinstance(exit_.code, str) and not exit_.code.startswith(f"{prog}:"):
            raise SystemExit(f"{prog}: error: {' '.join(exit_.code.split())}") from None
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(f"{prog}: interrupted") from None
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {one_line(error)}") from None


# ---- argparse types: numeric options are validated when the command line is parsed ----------------------------


def _number_type(kind: type, expectation: str, accept):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text}")
        return value

    parse.__name__ = expectation.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = _number_type(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number_type(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number_type(float, "a positive number", lambda v: v > 0 and v != float("inf"))
non_negative_float = _number_type(float, "a finite number >= 0", lambda v: 0 <= v < float("inf"))
fraction = _number_type(float, "a number between 0 and 1 (exclusive)", lambda v: 0 < v < 1)
probability = _number_type(float, "a number between 0 and 1", lambda v: 0 <= v <= 1)
