"""Option definitions shared by several commands (``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Force = Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout instead of tables.")]
Tokenizer = Annotated[str, typer.Option(
    "--tokenizer", "-t", metavar="SPEC",
    help="`deepseek` (the bundled DeepSeek 128k tokenizer), a tokenizer.json path or a directory holding one, "
         "or hf:ORG/NAME (needs a network).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

# Corpus inputs, shared by every command that reads a corpus (see docs/corpus.md)
TextColumn = Annotated[str, typer.Option("--text-column", help="Text field of JSONL/Parquet/datasets inputs.")]
DocMode = Annotated[str, typer.Option("--doc-mode", help="Plain-text files: `file` (one document each) or `line` (one per line).")]
HfSplit = Annotated[str, typer.Option("--hf-split", help="Split of a `datasets` directory or hub dataset.")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")]

# Scale-out, shared by build-tables and sweep (docs/scale-out.md)
Engine = Annotated[str, typer.Option(
    "--engine", metavar="ENGINE",
    help="Where the work runs: `local` (this machine) or `ray` (tasks on a Ray cluster; pip install 'engram-cli[ray]').")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", metavar="ADDR",
    help="The Ray cluster to join (HOST:PORT as `ray start --head` printed; default: RAY_ADDRESS, a cluster "
         "started on this machine, else a new local one).")]
