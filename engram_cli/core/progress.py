"""Progress reporting from the library without printing.

Library functions that take more than a second accept ``progress: ProgressFn | None``. They call
``progress(task, completed, total, **info)``: ``task`` is a short stable name ("tokenize",
"count", "hash"...), ``completed`` how much of that task is done so far (absolute, not an
increment), ``total`` the expected amount or None when unknown, and ``info`` extra figures to show
(e.g. ``tokens=...``, ``loss=...``). The command-line layer turns these calls into Rich progress
bars on stderr (``engram_cli.commands.render.RichProgress``); tests pass nothing or a list appender.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, completed: float, total: float | None = None, **info: Any) -> None: ...


def null_progress(task: str, completed: float, total: float | None = None, **info: Any) -> None:
    """A progress callback that does nothing."""


def report(progress: ProgressFn | None) -> ProgressFn:
    """Return ``progress`` or :func:`null_progress` when None."""
    return progress if progress is not None else null_progress
