"""The ``engram`` command: a Typer app whose commands live in ``engram_cli.commands``.

Errors: an :class:`~engram_cli.core.errors.EngramError` raised by the library, or a usage error from
the option parser, is printed as ONE red line on stderr (problem, then the fix) and the process
exits with status 1. ``ENGRAM_DEBUG=1`` re-raises instead, showing the traceback. This is done in
:class:`EngramGroup.main`, which both the console script and Typer's ``CliRunner`` go through.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from engram_cli import __version__
from engram_cli.core.errors import EngramError, Interrupted


def _parser_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The parser's exception class ``name``: Typer ≥ 0.20 vendors click, older ones use it."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_USAGE_ERRORS = _parser_exceptions("UsageError")
_CLICK_ERRORS = _parser_exceptions("ClickException")
_ABORTS = _parser_exceptions("Abort")


def debug_enabled() -> bool:
    return os.environ.get("ENGRAM_DEBUG", "") not in ("", "0")


def print_error(message: str, hint: str | None = None) -> None:
    """One red line on stderr: ``error: <problem> — <fix>``."""
    from rich.console import Console
    from rich.markup import escape

    line = f"[bold red]error:[/] [red]{escape(message)}[/]"
    if hint:
        line += f" [dim]—[/] {escape(hint)}"
    Console(stderr=True, soft_wrap=True, highlight=False).print(line)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def _interrupts_as_exceptions():
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while a command runs
    (Typer would turn a KeyboardInterrupt into a silent exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def disk_error_line(e: OSError) -> tuple[str, str]:
    """One line for an OS error (disk full, read-only, permissions...): what, where, the errno."""
    name = errno.errorcode.get(e.errno or 0, "OSError")
    where = f" on {e.filename}" if e.filename else ""
    fixes = {errno.ENOSPC: "free disk space or write elsewhere (--out)",
             errno.EDQUOT: "free disk space or write elsewhere (--out)",
             errno.EROFS: "write to a writable location (--out)",
             errno.EACCES: "check the permissions, or write elsewhere (--out)",
             errno.EPERM: "check the permissions, or write elsewhere (--out)"}
    return f"{e.strerror or e}{where} ({name})", fixes.get(e.errno, "check the path and the disk")


class EngramGroup(TyperGroup):
    """Typer group that turns user errors into one line + exit 1 (see module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with _interrupts_as_exceptions():
                rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except Interrupted as e:
            if debug_enabled():
                import traceback

                traceback.print_exc()
            print_error(e.message, e.hint)
            rv = 128 + e.signum
        except EngramError as e:
            if debug_enabled():
                raise
            print_error(e.message, e.hint)
            rv = 1
        except _USAGE_ERRORS as e:
            if debug_enabled():
                raise
            path = e.ctx.command_path if getattr(e, "ctx", None) is not None else "engram"
            print_error(e.format_message().replace("\n", " "), f"see `{path} --help`")
            rv = 1
        except _CLICK_ERRORS as e:
            print_error(e.format_message())
            rv = 1
        except _ABORTS:
            print_error("aborted")
            rv = 1
        except KeyboardInterrupt:
            print_error("interrupted; artifacts already written are intact")
            rv = 130
        except OSError as e:
            if debug_enabled():
                raise
            print_error(*disk_error_line(e))
            rv = 1
        except MemoryError:
            if debug_enabled():
                raise
            print_error("out of memory", "use a smaller configuration (batch size, model or table sizes)")
            rv = 1
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=EngramGroup,
    name="engram",
    help="Build and analyze Engram tables: conditional N-gram memory for LLMs (arXiv 2601.07372).\n\n"
    "The pipeline: normalize-vocab → build-tables → train → inspect-gates; each stage's output "
    "directory is the next one's input. eval scores runs; sweep trains many at controlled budgets.",
    epilog="Example: engram normalize-vocab --out out/vocab",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"engram {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Build and analyze Engram tables."""


def _register() -> None:
    from engram_cli.commands import COMMANDS, examples_epilog

    for name, module, func in COMMANDS:
        if isinstance(getattr(module, "app", None), typer.Typer):  # a command with subcommands
            app.add_typer(module.app, name=name, epilog=examples_epilog(module.EXAMPLES))
        else:
            app.command(name, epilog=examples_epilog(module.EXAMPLES))(func)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
