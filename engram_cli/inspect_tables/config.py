"""What ``engram inspect-tables`` is asked to do (:class:`InspectTablesConfig`), the files it writes,
and the ``--row LAYER:HEAD:SLOT`` address it reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_cli.core.errors import InputError

FORMAT = "engram.tables_inspection"
HEADS_FILE = "heads.parquet"            # per layer/order/head: use, movement, spectrum, collision load
FREQUENCY_FILE = "frequency.parquet"    # per layer/order and count bin: norm and movement of the rows
SPECTRUM_FILE = "spectrum.parquet"      # per head: singular values of the touched rows, trained and initial
TOP_ROWS_FILE = "top_rows.parquet"      # per head: the rows that moved most, with their n-grams
QUERIES_FILE = "queries.json"           # --ngram / --row answers
SUMMARY_FILE = "summary.json"           # the report's figures (also in the manifest)
FREQUENCY_PNG = "norm_vs_count.png"     # hexbin: norm and movement against the summed count
SPECTRUM_PNG = "spectrum.png"           # singular values per head, trained vs initial
#: the whole-table report's files, in the order they are written
REPORT_FILES = (HEADS_FILE, FREQUENCY_FILE, SPECTRUM_FILE, TOP_ROWS_FILE, SUMMARY_FILE, FREQUENCY_PNG, SPECTRUM_PNG)


@dataclass(frozen=True)
class RowAddress:
    """One table row: Engram layer ``layer``, head ``head`` (0..total_heads-1, order 2's heads first),
    slot ``slot`` in that head's table."""

    layer: int
    head: int
    slot: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.head}:{self.slot}"


def parse_row(text: str) -> RowAddress:
    """``"1:3:4812"`` -> RowAddress(1, 3, 4812); anything else is one InputError."""
    parts = text.strip().split(":")
    try:
        layer, head, slot = (int(p.replace(",", "").replace("_", "")) for p in parts)
    except ValueError:
        raise InputError(f"--row {text!r} is not LAYER:HEAD:SLOT", "e.g. --row 1:0:4812 (layer 1, head 0, slot 4812)"
                         ) from None
    return RowAddress(layer, head, slot)


@dataclass
class InspectTablesConfig:
    """Options of ``engram inspect-tables``: the run, its tables, and what to show."""

    run: Path                                   # run directory written by `engram train`
    tables: Path | None = None                  # engram.tables artifact (None: the one the run recorded)
    step: int | None = None                     # checkpoint step (None: the latest)
    ngrams: list[str] = field(default_factory=list)   # --ngram TEXT: ask about one n-gram (each)
    rows: list[str] = field(default_factory=list)     # --row L:H:S: ask about one row (each)
    out: Path | None = None                     # artifact directory
    force: bool = False                         # replace an existing --out artifact
    top: int = 10                               # rows listed per head (top moved); tokens per logit lens
    sharing: int = 8                            # n-grams listed per slot (--ngram / --row / top rows)
    block_rows: int = 1 << 16                   # rows read from the table per block (bounds memory)
    duplicate_rows: int = 2048                  # near-duplicates: among this many most-moved rows per head
    duplicate_cosine: float = 0.95              # ... a pair this similar counts as near-duplicate
    vocab: Path | None = None                   # vocab artifact, if not where the run recorded it

    @property
    def mode(self) -> str:
        return "query" if self.ngrams or self.rows else "report"


def config_record(config: InspectTablesConfig) -> dict[str, Any]:
    """The config as the manifest records it (paths as strings)."""
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("force", "out")}
    d = {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
    d["mode"] = config.mode
    return d
