"""Errors abnexp reports to the user as one clear message (the CLI prints them without a traceback)."""
from __future__ import annotations

import sys
from typing import NoReturn


class AbnexpError(Exception):
    """Base class of errors whose message alone tells the user what is wrong and how to fix it."""


class ConfigError(AbnexpError):
    """A configuration value is invalid (raised before any work starts)."""


class DatasetError(AbnexpError):
    """A dataset root is missing or malformed, or a file in it cannot be read."""


def error_line(error: BaseException) -> str:
    """The one line the CLI prints for ``error``: ``abnexp: error: <message>`` (an error raised in a
    DataLoader worker keeps only its final line, not the worker's traceback)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return f"abnexp: error: {message}"


def exit_with(error: BaseException) -> NoReturn:
    """The CLI's error handler: prints :func:`error_line` to stderr and exits with status 1 (used by
    ``abnexp.cli.main`` and, inside Hydra's main where exceptions would print a traceback, by the
    training job)."""
    print(error_line(error), file=sys.stderr)
    sys.exit(1)
