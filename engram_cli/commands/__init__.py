"""One module per ``engram`` command; each is a thin layer over one library function.

A command parses options, builds the library's config object, calls the library function with a
progress callback that draws Rich bars on stderr, and renders the returned result object (Rich
tables on stdout, or JSON with ``--json``). No numeric work happens here. Heavy libraries are
imported inside the command functions so that ``engram --help`` stays fast.

Each command module defines ``EXAMPLES``: (command line, what it does) pairs shown in ``--help``.
A command with subcommands (``engram sweep``) defines ``app``, a Typer sub-app; its registry
function is the sub-app's callback (its help text).

Imports: any library package, but only inside the command functions, so that ``engram --help``
loads no heavy package; nothing in the library imports the commands.
"""

from types import ModuleType

from engram_cli.commands import build_tables, inspect_gates, inspect_tables, normalize_vocab, sweep, train
from engram_cli.commands import eval as eval_

#: (command name, module, function) in pipeline order
COMMANDS: list[tuple[str, ModuleType, object]] = [
    ("normalize-vocab", normalize_vocab, normalize_vocab.normalize_vocab_command),
    ("build-tables", build_tables, build_tables.build_tables_command),
    ("train", train, train.train_command),
    ("inspect-gates", inspect_gates, inspect_gates.inspect_gates_command),
    ("eval", eval_, eval_.eval_command),
    ("inspect-tables", inspect_tables, inspect_tables.inspect_tables_command),
    ("sweep", sweep, sweep.sweep_command),  # a group: its subcommands are sweep.app's
]


def examples_epilog(examples: list[tuple[str, str]]) -> str:
    """Format a module's EXAMPLES as a help epilog (one paragraph per example)."""
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  [cyan]{cmd}[/]  [dim]# {what}[/]" for cmd, what in examples)
