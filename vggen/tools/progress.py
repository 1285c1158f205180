"""How the command line talks while it works.

Results (tables, JSON, the path of a file written) go to stdout.  Progress
and information go through :mod:`logging` under the ``vggen`` logger, to
stderr: ``-q`` keeps only warnings and errors, ``-v`` adds debug detail.
Progress bars (tqdm) are drawn only for a person watching: not when
``TQDM_DISABLE`` is set, not when stderr is not a terminal (a log file gets
one line per epoch instead of a bar redrawn many times a second), and not
under ``-q``.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "vggen"
FALSE_WORDS = ("", "0", "false", "no", "off")


class _Formatter(logging.Formatter):
    """Information as it is; warnings and errors prefixed like the CLI's errors."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"vggen: {record.levelname.lower()}: {message}"
        return message


def verbosity_level(verbose: int, quiet: int) -> int:
    """``-v``/``-q`` counts as a logging level: INFO by default."""
    step = verbose - quiet
    if step >= 1:
        return logging.DEBUG
    return {0: logging.INFO, -1: logging.WARNING}.get(step, logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not to the
    stream of the moment it was made (a caller, or a test, may replace it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: int) -> logging.Handler:
    """Send the ``vggen`` logger's records at ``level`` and above to stderr;
    replaces the handler an earlier call installed."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def progress_bars_enabled(stream=None) -> bool:
    """Whether to draw progress bars on ``stream`` (stderr): see the module docstring."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in FALSE_WORDS:
        return False
    if not logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # no isatty, or a closed stream
        return False
