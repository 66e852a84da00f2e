"""Rendering helpers for commands: consoles, progress bars, readable token text, JSON."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console

#: results go to stdout; progress and logs to stderr. Piped output (logs, CI) gets 140 columns
#: instead of Rich's 80 so that wide report tables stay readable; a terminal keeps its width.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)

def show_token(text: str, max_len: int = 40) -> str:
    """Readable form of a token's text (see ``engram_cli.core.text.display_token``)."""
    from engram_cli.core.text import display_token

    return display_token(text, max_len=max_len)


def count(x: int | None) -> str:
    """A parameter or row count in short form: 4.68M, 10.32k, 1.20B ("–" when unknown)."""
    from engram_cli.core.text import short_count

    return short_count(x)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


class RichProgress:
    """A ``ProgressFn`` that draws one Rich progress bar per task on stderr.

    Use as a context manager; ``info`` keyword figures are shown after the bar, and a
    ``rate_key`` (e.g. ``tokens``) also gets a per-second rate.
    """

    def __init__(self, enabled: bool = True, rate_key: str | None = None):
        self.enabled = enabled and not err.is_dumb_terminal
        self.rate_key = rate_key
        self._tasks: dict[str, int] = {}
        self._t0: dict[str, float] = {}
        self._progress = None
        self._start = time.perf_counter()

    def __enter__(self) -> RichProgress:
        self._start = time.perf_counter()
        return self

    def _start_display(self) -> None:
        # started on the first report, so a command that fails early prints nothing but its error
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[info]}"), console=err, transient=False)
        self._progress.__enter__()

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, task: str, completed: float, total: float | None = None, **info: Any) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._start_display()
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total, info="")
            self._t0[task] = self._start
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        dt = time.perf_counter() - self._t0[task]
        if self.rate_key and self.rate_key in info and dt > 0.2:
            text += f"  {_fmt(round(info[self.rate_key] / dt))} {self.rate_key}/s"
        self._progress.update(self._tasks[task], completed=completed, total=total, info=text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def run_command(library_fn: Any, config: Any, render: Any, *, json_out: bool, quiet: bool,
                rate_key: str | None = None) -> Any:
    """What every command does after building its config: call the one library function with Rich
    progress bars on stderr (unless ``quiet`` or ``json_out``), then print the result as JSON
    (``json_out``) or through ``render``, and any ``result.warnings`` in yellow on stderr."""
    with RichProgress(enabled=not quiet and not json_out, rate_key=rate_key) as progress:
        result = library_fn(config, progress=progress)
    if json_out:
        print_json(result.to_dict())
    else:
        render(result)
    for w in getattr(result, "warnings", None) or []:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    return result
