"""Option definitions shared by several commands (``Annotated`` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Force = Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout instead of tables.")]
Tokenizer = Annotated[str, typer.Option(
    "--tokenizer", "-t", metavar="SPEC",
    help="`deepseek` (the bundled DeepSeek 128k tokenizer), a tokenizer.json path or a directory holding one, "
         "or hf:ORG/NAME (needs a network).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def out_option(help: str) -> object:
    return typer.Option("--out", "-o", help=help, metavar="DIR")


OutDir = Annotated[Path, out_option("Output artifact directory.")]
