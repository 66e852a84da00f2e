"""Engram table inspection (``engram inspect-tables``): open a trained memory and show what it stored,
where, and what collisions cost.

Reads a run (any checkpoint step) and the tables artifact its plan comes from (the n-gram counts),
and lays the counts over the run's rows through the one hashing (``engram_cli.tables``):

* **whole-table report** (per layer, order and head): rows addressed by the corpus, updated in
  training (the optimizer's row state), never touched; each row's movement from its initial value
  (rebuilt exactly as the trainer drew it); norm and movement against the summed count of the
  n-grams in the row (hexbin + binned table); the spectrum of the updated rows against a random
  table of the same shape, near-duplicate rows; the collision load (rows holding 1, 2, 3+ n-grams,
  token-weighted); the rows that moved most, with their n-grams;
* **queries**: ``--ngram TEXT`` (its slot in every head, the n-grams sharing it, each row's figures,
  the memory's logit lens in full and per order) and ``--row LAYER:HEAD:SLOT``.

The modules, in dependency order:

* ``config``: :class:`InspectTablesConfig`, the files written, the ``--row`` address;
* ``rows``: the trained rows in blocks (:class:`TableRows`), :func:`initial_rows`, :func:`updated_rows`;
* ``ngrams``: the counts over one layer's rows (:func:`layer_ngrams`: load and summed count per row);
* ``lens``: :class:`MemoryLens`, W_V -> final norm -> LM head of a memory vector;
* ``survey``: the whole-table report, streamed (:func:`survey_layer`);
* ``queries``: ``--ngram`` and ``--row``;
* ``plots``: the pictures (``engram_cli.core.plotting``);
* ``report``: :func:`inspect_tables` (the command's one library call) and the artifact.

The library never prints.

Imports: ``core`` .. ``train`` (a run through ``engram_cli.train.runs``); never ``gates``, ``eval`` or ``sweep``.

>>> res = inspect_tables(InspectTablesConfig(run=Path("out/run"), ngrams=["new york"]))   # doctest: +SKIP
>>> res.queries[0]["layers"][0]["lens"][:3]                                              # doctest: +SKIP
"""

from __future__ import annotations

from engram_cli.inspect_tables.config import (
    FORMAT,
    FREQUENCY_FILE,
    FREQUENCY_PNG,
    HEADS_FILE,
    QUERIES_FILE,
    REPORT_FILES,
    SPECTRUM_FILE,
    SPECTRUM_PNG,
    SUMMARY_FILE,
    TOP_ROWS_FILE,
    InspectTablesConfig,
    RowAddress,
    parse_row,
)
from engram_cli.inspect_tables.lens import LensToken, MemoryLens
from engram_cli.inspect_tables.ngrams import HeadInfo, LayerNgrams, layer_heads, layer_ngrams, ngram_records
from engram_cli.inspect_tables.queries import check_row, query_ngram, query_row
from engram_cli.inspect_tables.report import LENS_NOTE, TablesInspection, check_tables, collision_check, inspect_tables
from engram_cli.inspect_tables.rows import TableRows, initial_rows, table_key, updated_rows
from engram_cli.inspect_tables.survey import (
    HeadSurvey,
    LayerSurvey,
    count_bin,
    effective_rank,
    frequency_rows,
    near_duplicates,
    survey_layer,
)

__all__ = [
    "InspectTablesConfig", "inspect_tables", "TablesInspection", "RowAddress", "parse_row", "check_tables",
    "collision_check", "LENS_NOTE", "TableRows", "initial_rows", "updated_rows", "table_key", "HeadInfo",
    "LayerNgrams", "layer_heads", "layer_ngrams", "ngram_records", "LensToken", "MemoryLens", "HeadSurvey",
    "LayerSurvey", "survey_layer", "count_bin", "effective_rank", "frequency_rows", "near_duplicates",
    "query_ngram", "query_row", "check_row", "FORMAT", "HEADS_FILE", "FREQUENCY_FILE", "SPECTRUM_FILE",
    "TOP_ROWS_FILE", "QUERIES_FILE", "SUMMARY_FILE", "FREQUENCY_PNG", "SPECTRUM_PNG", "REPORT_FILES",
]
