"""Exception types for errors the user can fix.

Every error raised on purpose by the library is an :class:`EngramError`. It carries a one-line
message naming the problem and a ``hint`` naming the fix (usually the command that produces the
missing thing). The command-line layer prints ``message`` and ``hint`` on one red line on stderr
and exits with status 1; the traceback is shown only when ``ENGRAM_DEBUG=1``.
"""

from __future__ import annotations

import signal


class EngramError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, message then fix
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(EngramError):
    """An input file or value is missing, unreadable or malformed."""


class ArtifactError(EngramError):
    """An artifact directory is missing, incomplete, of the wrong format or from other inputs."""


class ConfigError(EngramError):
    """A configuration value is impossible (e.g. top-k larger than the number of experts)."""


class TrainingError(EngramError):
    """Training cannot go on (e.g. the loss became NaN)."""


class Interrupted(BaseException):
    """The process got SIGINT (Ctrl-C) or SIGTERM while the command line ran.

    A ``BaseException`` like ``KeyboardInterrupt`` (so ordinary ``except Exception`` handlers do
    not swallow it). Library code that knows what survived (the trainer: the latest checkpoint)
    catches it, records the interruption and re-raises it with ``message`` and ``hint`` set; the
    command line prints them on one line and exits 128 + the signal number.
    """

    def __init__(self, signum: int, message: str | None = None, hint: str | None = None):

        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.message = message or f"interrupted by {self.signal_name}"
        self.hint = hint or "outputs already written are intact; an unfinished output was discarded"


def first_line(e: BaseException) -> str:
    """An exception as one short line for an error message: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__
