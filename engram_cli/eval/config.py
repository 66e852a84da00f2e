"""What ``engram eval`` is asked to do (:class:`EvalConfig`), the buckets it reports, the files it
writes and how the config is recorded in its manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram_cli.core.artifacts import artifact_format
from engram_cli.core.errors import ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.train.distributed import check_device
from engram_cli.train.runs import RUN_FORMAT, load_run

FORMAT = "engram.eval"
BUCKETS_FILE = "buckets.parquet"
PLOT_PNG = "eval.png"
PLOT_SVG = "eval.svg"
FILES = ("manifest.json", BUCKETS_FILE, PLOT_PNG, PLOT_SVG)

#: the bucket kinds of the breakdown, in the order they are reported
KIND_ALL = "all"          # one bucket: every evaluated token
KIND_COUNT = "count"      # by the training count of the n-gram (n-1 preceding tokens + the target)
KIND_SCRIPT = "script"    # by the script of the target token
KIND_EXPOSURE = "exposure"  # by how many heads share the row read with a more frequent n-gram (0 .. H)
#: training-count buckets: count 0, 1, 2-9, 10-99, >= 100 (edges are the lowest count of buckets 1..4)
COUNT_BUCKETS = ("unseen", "1", "2–9", "10–99", "≥100")
COUNT_EDGES = (1, 2, 10, 100)
#: script buckets of the target token's text (engram_cli.eval.buckets.script_of)
SCRIPT_BUCKETS = ("Latin", "CJK", "digits & punctuation", "other")
#: order of the bucket n-gram when no run has a table plan (the reference's max_ngram_size)
DEFAULT_BUCKET_N = 3
KNOCKOUTS = ("engram",)   # what --knockout can switch off
REFERENCE_DTYPE = "fp32"  # the tables as trained; --table-dtype scores another dtype beside it


@dataclass
class EvalConfig:
    """Options of ``engram eval``: the runs, the text they are scored on, the breakdown and outputs."""

    runs: list[Path]                          # run directories written by `engram train` (same tokenizer)
    corpus: CorpusSpec | None = None          # score this corpus; None: each run's own held-out split
    bucket_n: int | None = None               # order of the bucket n-gram; None: the plans' max_ngram_size
    knockout: str | None = None               # "engram": also score with every Engram module switched off
    table_dtype: str = REFERENCE_DTYPE        # bf16 / fp8-e4m3: also score with the tables stored so (quant.py)
    out: Path | None = None                   # artifact directory (Parquet, picture, manifest)
    force: bool = False                       # replace an existing --out directory
    max_windows: int | None = None            # score at most this many windows per run, evenly spread
    batch_windows: int = 16                   # windows per forward call
    cache_dir: Path | None = None             # token cache of the runs (None: where each run recorded it)
    device: str = "cpu"                       # torch device of the models: auto, cpu, cuda or cuda:N

    def __post_init__(self) -> None:
        self.device = check_device(self.device)  # the one --device check (train, sweep, eval, inspect-gates)

    @property
    def text(self) -> str:
        """What is scored: ``held-out`` (each run's own split) or ``corpus``."""
        return "held-out" if self.corpus is None else "corpus"


def config_record(config: EvalConfig) -> dict[str, Any]:
    """The config as the manifest records it (paths as strings)."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in ("force", "out"):
            continue
        v = getattr(config, f.name)
        if isinstance(v, CorpusSpec):
            v = dataclasses.asdict(v)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, list):
            v = [str(x) for x in v]
        d[f.name] = v
    d["text"] = config.text
    return d


def split_arguments(args: list[str]) -> tuple[list[Path], list[str]]:
    """``RUN... [CORPUS...]`` -> (run directories, corpus sources): the leading arguments that are
    run artifacts (``engram.run``) are the runs, the rest the corpus. A first argument that is not
    a run gets the run loader's own error (missing, not a run, no checkpoint...)."""

    if not args:
        raise InputError("no run given", "pass one or more run directories: engram eval RUN... [CORPUS...]")
    k = 0
    while k < len(args) and artifact_format(args[k]) == RUN_FORMAT:
        k += 1
    if k == 0:
        load_run(args[0], with_model=False)  # raises the loader's error for this directory
        raise InputError(f"{args[0]} is not a run directory", "pass a run written by `engram train` first")
    late = [a for a in args[k:] if artifact_format(a) == RUN_FORMAT]
    if late:
        raise ConfigError(f"run {late[0]} comes after the corpus {args[k]}", "list the runs first: RUN... CORPUS...")
    return [Path(a) for a in args[:k]], list(args[k:])
