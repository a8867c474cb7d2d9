"""What every command-line entry point shares (`mmdit-probe`, its sweep commands, `python -m
mmdit_probe.segmentation`): argparse with one-line errors, option types, and the one mapping of
errors to exit codes — 2 for bad input (`InvalidInput`), 1 for a failure while running, each as one
line `prog: error: ...`; `--debug` re-raises with the traceback. Torch-free, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

from .validation import InvalidInput


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with exit code 2 like any other bad input."""

    def error(self, message: str):
        fail(self.prog, message, 2)


def run_command(prog: str, command: Callable[[], None], *, debug: bool = False) -> None:
    """Run an entry point's command with the one mapping of errors to exit codes: bad input (`InvalidInput`)
    exits 2 and any other failure 1, each as one line `prog: error: ...` on stderr; `debug` re-raises instead."""
    try:
        command()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        fail(prog, error, 2 if isinstance(error, InvalidInput) else 1)


@contextlib.contextmanager
def checking():
    """Errors raised while checking arguments (loading the model included) are bad input: `InvalidInput`.
    A model that cannot be loaded, a word not in the prompt, are the user's to fix, whatever their type."""
    try:
        yield
    except InvalidInput:
        raise
    except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise InvalidInput(message) from error


def _parsed(text: str, convert: Callable[[str], Any], what: str) -> Any:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive(text: str) -> int:
    """argparse type of a count: a whole number >= 1 (0 never means the default)."""
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number >= 1 (or leave it out for "
                                         f"the preset's default)")
    return value


def fraction(text: str) -> float:
    """argparse type of a share of the steps or a threshold: a number in [0, 1]."""
    value = _parsed(text, float, "a number")
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not allowed: give a number in [0, 1]")
    return value


def fail(prog: str, error: BaseException | str, code: int) -> None:
    """Print `prog: error: ...` on one line (a failure while running also names its type) and exit with `code`."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(str(message).split()) or type(error).__name__
    kind = "" if code == 2 else f"{type(error).__name__}: "
    hint = "" if code == 2 else " (run with --debug for the traceback)"
    print(f"{prog}: error: {kind}{message}{hint}", file=sys.stderr)
    raise SystemExit(code)
