""":func:`inspect_tables`, the one library call behind ``engram inspect-tables``: it loads and checks
the run and its tables artifact, answers ``--ngram`` / ``--row`` queries or writes the whole-table
report, and the ``engram.tables_inspection`` artifact with ``--out``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.core.artifacts import artifact_dir, check_output_dir, holds_output_lock
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.inspect_tables.config import (
    FORMAT,
    FREQUENCY_FILE,
    FREQUENCY_PNG,
    HEADS_FILE,
    QUERIES_FILE,
    SPECTRUM_FILE,
    SPECTRUM_PNG,
    SUMMARY_FILE,
    TOP_ROWS_FILE,
    InspectTablesConfig,
    config_record,
)
from engram_cli.inspect_tables.lens import MemoryLens
from engram_cli.inspect_tables.ngrams import LayerNgrams, layer_ngrams
from engram_cli.inspect_tables.plots import plot_norm_vs_count, plot_spectrum
from engram_cli.inspect_tables.queries import query_ngram, query_row
from engram_cli.inspect_tables.rows import TableRows, updated_rows
from engram_cli.inspect_tables.survey import LayerSurvey, survey_layer
from engram_cli.tables.build import COLLISIONS_FILE, NGRAMS_DIR, TablesArtifact, load_tables
from engram_cli.tables.plan import vocab_fields
from engram_cli.tables.stats import NgramStats
from engram_cli.train.runs import LoadedRun, load_run, plan_fingerprint

LENS_NOTE = ("logit lens of the memory: W_V (with its bias) of the retrieved rows -> final norm -> LM head; "
             "the gate, the short convolution and the layers after the Engram block are left out")


@dataclass
class TablesInspection:
    """What :func:`inspect_tables` found (report mode: the surveys; query mode: the answers)."""

    mode: str
    run: str                                   # run label ("name (step N)")
    tables: str
    layers: list[LayerSurvey] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    collision_check: str | None = None         # the row loads against build-tables' measurement
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    out: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "run": self.run, "tables": self.tables, "lens": LENS_NOTE,
                "collision_check": self.collision_check, "layers": [s.summary() for s in self.layers],
                "heads": [h.record() for s in self.layers for h in s.heads], "seconds": round(self.seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "frequency": [r for s in self.layers for r in s.frequency],
                "top_rows": [r for s in self.layers for r in s.top_rows], "queries": self.queries,
                "files": self.files, "warnings": self.warnings, "out": self.out}


@holds_output_lock(lambda config: config.out)
def inspect_tables(config: InspectTablesConfig, progress: ProgressFn | None = None) -> TablesInspection:
    """What ``engram inspect-tables`` does: query mode (``--ngram`` / ``--row``) or the whole-table report."""
    progress = report(progress)
    t0 = time.perf_counter()
    for name, v in (("--top", config.top), ("--sharing", config.sharing), ("--block-rows", config.block_rows)):
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}", f"pass {name} 1 or more")
    if config.out is not None:
        check_output_dir(config.out, config.force, FORMAT)  # before the long part
    run = load_run(config.run, config.step, with_model=False, verify=False, vocab_dir=config.vocab)
    if not run.layer_ids:
        raise ConfigError(f"{run.name} has no Engram layers: it is a pure-MoE baseline, so it has no tables to "
                          "inspect", "pass a run trained with Engram tables (allocation < 1)")
    tables = load_tables(config.tables if config.tables is not None else Path(run.config["run"]["tables"]),
                         config.vocab)
    check_tables(run, tables)
    stats = NgramStats.load(tables.path / NGRAMS_DIR)
    if stats.max_n < run.plan.max_ngram_size:
        raise ArtifactError(f"tables {tables.path} count n-grams up to order {stats.max_n}, the run hashes up to "
                            f"{run.plan.max_ngram_size}", "pass the tables the run was trained from (--tables)")
    layers = {layer: layer_ngrams(stats, run.plan, layer) for layer in run.layer_ids}
    result = TablesInspection(mode=config.mode, run=run.label, tables=str(tables.path))
    with TableRows(run) as table:
        for layer, ln in layers.items():
            if table.shape(layer) != (ln.rows, run.plan.embed_dim_per_head):
                raise ArtifactError(f"checkpoint {run.checkpoint.path}: the table of layer {layer} is "
                                    f"{table.shape(layer)}, its plan says ({ln.rows}, {run.plan.embed_dim_per_head})",
                                    "pass --step of another checkpoint, or retrain with `engram train`")
        if config.mode == "query":
            updated = {layer: updated_rows(run, layer, ln.rows) for layer, ln in layers.items()}
            lens = MemoryLens(run)
            kw = {"top": config.top, "sharing": config.sharing}
            seen = stats.ngrams[1][:, 0]
            result.queries = [{"kind": "ngram", **query_ngram(t, run, layers, updated, table, lens, seen, **kw)}
                              for t in config.ngrams]
            result.queries += [{"kind": "row", **query_row(r, run, layers, updated, table, lens, **kw)}
                               for r in config.rows]
        else:
            result.layers = [survey_layer(run, table, ln, run.vocab, block_rows=config.block_rows, top=config.top,
                                          sharing=config.sharing, duplicate_rows=config.duplicate_rows,
                                          duplicate_cosine=config.duplicate_cosine, progress=progress)
                             for ln in layers.values()]
            result.collision_check = collision_check(run, tables, layers)
    result.seconds = time.perf_counter() - t0
    if config.out is not None:
        _write(config, run, tables, result)
    return result


def check_tables(run: LoadedRun, tables: TablesArtifact) -> None:
    """The tables artifact must be the one the run's plan comes from: the same plan (when the run
    trained on the tables' plan as it is), or the template of its re-planned / derived plan (same
    vocabulary, pad and separator ids, boundary rule and seed), over the same vocab map."""
    name = f"tables {tables.path}"
    fix = "pass the tables the run was trained from (--tables; the run records them in its config.json)"
    if tables.vocab.fingerprint != run.vocab.fingerprint:
        raise ArtifactError(f"{name} were built with another vocab map than run {run.name}", fix)
    source = run.manifest.get("plan", {}).get("source")
    if source == "tables":
        same = plan_fingerprint(tables.plan) == plan_fingerprint(run.plan)
    else:
        same = vocab_fields(tables.plan) == vocab_fields(run.plan) and tables.plan.seed == run.plan.seed
    if not same:
        raise ArtifactError(f"{name} have another table plan than run {run.name} was trained with", fix)


def collision_check(run: LoadedRun, tables: TablesArtifact, layers: dict[int, LayerNgrams]) -> str:
    """Compare every head's colliding n-grams (from the row loads) with build-tables' measurement."""
    if plan_fingerprint(tables.plan) != plan_fingerprint(run.plan):
        return "not compared: the run's plan is derived from the tables' (other table sizes)"
    path = tables.path / COLLISIONS_FILE
    measured = {(r["layer"], r["n"], r["head"]): r["colliding"]
                for r in pq.ParquetFile(path).read().to_pylist() if r["head"] is not None}
    ours = {}
    for layer, ln in layers.items():
        for h in ln.heads:
            load = ln.load[h.offset:h.offset + h.size]
            ours[(layer, h.n, h.order_head)] = int(load[load >= 2].sum())
    bad = [k for k, v in ours.items() if measured.get(k) != v]
    if bad:
        return f"differs from build-tables' measurement in {len(bad)} heads (first: layer/order/head {bad[0]})"
    return f"matches build-tables' measurement ({len(ours)} heads)"


def _write(config: InspectTablesConfig, run: LoadedRun, tables: TablesArtifact, result: TablesInspection) -> None:
    with artifact_dir(config.out, FORMAT, force=config.force) as w:
        names = []
        if result.mode == "query":
            w.write_json(QUERIES_FILE, {"lens": LENS_NOTE, "queries": result.queries})
            names.append(QUERIES_FILE)
        else:
            heads = [h.record() for s in result.layers for h in s.heads]
            pq.write_table(pa.Table.from_pylist(heads), w.path(HEADS_FILE))
            pq.write_table(pa.Table.from_pylist([r for s in result.layers for r in s.frequency]),
                           w.path(FREQUENCY_FILE))
            spectrum = [{"layer": h.layer, "head": h.head, "n": h.n, "index": i, "singular_value": float(a),
                         "singular_value_init": float(b)}
                        for s in result.layers for h in s.heads
                        for i, (a, b) in enumerate(zip(h.singular_values, h.singular_values_init))]
            pq.write_table(pa.Table.from_pylist(spectrum), w.path(SPECTRUM_FILE))
            top = [{**{k: v for k, v in r.items() if k != "ngrams"},
                    "ngrams": [g["ngram"] for g in r["ngrams"]], "ngram_counts": [g["count"] for g in r["ngrams"]]}
                   for s in result.layers for r in s.top_rows]
            pq.write_table(pa.Table.from_pylist(top, schema=_top_schema()), w.path(TOP_ROWS_FILE))
            w.write_json(SUMMARY_FILE, result.summary())
            result.warnings += plot_norm_vs_count(result.layers, w.path(FREQUENCY_PNG))
            result.warnings += plot_spectrum(result.layers, w.path(SPECTRUM_PNG))
            names += [HEADS_FILE, FREQUENCY_FILE, SPECTRUM_FILE, TOP_ROWS_FILE, SUMMARY_FILE, FREQUENCY_PNG,
                      SPECTRUM_PNG]
        w.config = config_record(config)
        w.inputs = {"run": {"run_dir": str(run.run_dir), "step": run.step, "plan_sha256": plan_fingerprint(run.plan)},
                    "tables": {"path": str(tables.path), "plan_sha256": plan_fingerprint(tables.plan)}}
        w.summary = result.summary()
    result.out = str(config.out)
    result.files = [str(Path(config.out) / f) for f in ["manifest.json", *names]]


def _top_schema() -> pa.Schema:
    return pa.schema([("layer", pa.int64()), ("head", pa.int64()), ("n", pa.int64()), ("rank", pa.int64()),
                      ("slot", pa.int64()), ("row", pa.int64()), ("movement", pa.float64()), ("norm", pa.float64()),
                      ("updated", pa.bool_()), ("load", pa.int64()), ("count", pa.int64()),
                      ("ngrams", pa.list_(pa.string())), ("ngram_counts", pa.list_(pa.int64()))])


__all__ = ["TablesInspection", "inspect_tables", "check_tables", "collision_check", "LENS_NOTE"]
