"""Text and compare mode of ``engram inspect-gates``, and :func:`inspect_gates`, the one library
call behind the command: it checks the options, runs the mode the config asks for and writes
what was asked (CSV / Parquet per-token tables, the ``engram.gates`` artifact)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from engram_cli.core.artifacts import (
    artifact_dir,
    atomic_output,
    check_output_dir,
    check_output_file,
    holds_output_lock,
)
from engram_cli.core.errors import ConfigError, InputError
from engram_cli.core.progress import ProgressFn
from engram_cli.gates.config import HEATMAP_PNG, HEATMAP_SVG, TOKENS_FILE, InspectGatesConfig, config_record, run_record
from engram_cli.gates.corpus import CorpusGateResult, inspect_corpus
from engram_cli.gates.forward import GateTrace, load_run_model, trace_text
from engram_cli.gates.plots import plot_gate_heatmap
from engram_cli.train.runs import LoadedRun


@dataclass
class GateReport:
    """Result of text / compare mode: one trace per run, and what was written."""

    mode: str
    traces: list[GateTrace]
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "runs": [t.to_dict() for t in self.traces], "files": self.files,
                "warnings": self.warnings, "out": self.out}


@holds_output_lock(lambda config: config.out)
def inspect_gates(config: InspectGatesConfig, progress: ProgressFn | None = None) -> GateReport | CorpusGateResult:
    """What ``engram inspect-gates`` does: text, compare or corpus mode, by the config.

    Returns a :class:`GateReport` (text/compare) or a :class:`CorpusGateResult` (corpus).
    """
    if config.corpus is not None:
        _check_corpus_options(config)
        return inspect_corpus(config, progress=progress)
    if config.csv is not None and config.parquet is not None:
        raise ConfigError("pass either --csv or --parquet, not both", "choose one export format")
    if config.wrap < 1:
        raise ConfigError(f"--wrap must be at least 1, got {config.wrap}", "e.g. --wrap 40")
    text = _read_text(config)
    if not text.strip():
        raise InputError("the text is empty: there is nothing to inspect", "pass a non-empty TEXT, --file F or -")
    if config.out is not None:
        check_output_dir(config.out, config.force, "engram.gates")  # before the model runs
    export = config.csv if config.csv is not None else config.parquet
    if export is not None:
        inputs = [p for p in (config.text_file, config.model, config.compare) if p is not None]
        check_output_file(export, config.force, inputs)
    t0 = time.perf_counter()
    runs = _load_runs(config)
    traces = [trace_text(r, text, separator=config.separator, overlap=config.overlap,
                         batch_windows=config.batch_windows, progress=progress) for r in runs]
    report = GateReport(mode=config.mode, traces=traces)
    report.warnings += [f"{t.unknown} of {len(t.tokens)} tokens are outside the vocabulary of {t.label} and were "
                        "fed as its UNK token" for t in traces if t.unknown]
    if config.csv is not None or config.parquet is not None:
        dest = Path(config.csv if config.csv is not None else config.parquet)
        _write_table(trace_table(traces), dest, csv=config.csv is not None)
        report.files.append(str(dest))
    if config.out is not None:
        _write_text_artifact(config, runs, report, t0)
    return report


def inspect_text(config: InspectGatesConfig, progress: ProgressFn | None = None) -> GateTrace:
    """The gates of the run ``config.model`` (at ``config.step``) on the configured text."""
    text = _read_text(config)
    run = load_run_model(config.model, config.step, config.device)
    return trace_text(run, text, separator=config.separator, overlap=config.overlap,
                      batch_windows=config.batch_windows, progress=progress)


def trace_table(traces: Sequence[GateTrace]):
    """Per-token values of one or more traces as one Arrow table (a ``run`` column tells them apart)."""

    labels = sorted({lab for t in traces for lab in t.row_labels}, key=_label_order)
    cols: dict[str, list] = {k: [] for k in ("run", "step", "index", "token", "id", "canonical_id", "model_id")}
    gate_cols: dict[str, list] = {f"gate_{lab.replace('.', '_')}": [] for lab in labels}
    for t in traces:
        n = len(t.tokens)
        cols["run"] += [t.model] * n
        cols["step"] += [t.step] * n
        cols["index"] += list(range(n))
        cols["token"] += t.tokens
        cols["id"] += t.ids.tolist()
        cols["canonical_id"] += t.canonical_ids.tolist()
        cols["model_id"] += t.model_ids.tolist()
        mine = dict(zip(t.row_labels, t.gates))
        for lab in labels:
            vals = mine.get(lab)
            gate_cols[f"gate_{lab.replace('.', '_')}"] += vals.tolist() if vals is not None else [None] * n
    types = {"run": pa.string(), "step": pa.int64(), "index": pa.int64(), "token": pa.string(), "id": pa.int64(),
             "canonical_id": pa.int64(), "model_id": pa.int64()}
    arrays = {k: pa.array(v, type=types[k]) for k, v in cols.items()}
    arrays.update({k: pa.array(v, type=pa.float32()) for k, v in gate_cols.items()})
    return pa.table(arrays)


def _label_order(label: str) -> tuple[int, int]:
    layer, _, branch = label[1:].partition(".b")
    return int(layer), int(branch or 0)


# ---------------------------------------------------------------------------------------------
# inputs: options, the text, the runs


def _check_corpus_options(config: InspectGatesConfig) -> None:
    """Corpus mode reads the corpus only and writes its tables to --out."""
    if config.text is not None or config.text_file is not None:
        raise ConfigError("corpus mode reads --corpus only, but a TEXT or --file was given too",
                          "drop the text, or drop --corpus")
    if config.compare is not None or config.compare_step is not None:
        raise ConfigError("--compare works on a text, not with --corpus", "drop one of them")
    if config.csv is not None or config.parquet is not None:
        raise ConfigError("--csv/--parquet export per-token values of a text; corpus mode writes its "
                          "tables to --out", "drop --csv/--parquet and pass --out DIR")


def _read_text(config: InspectGatesConfig) -> str:
    if config.text is not None and config.text_file is not None:
        raise ConfigError("both TEXT and --file were given", "pass one of them")
    if config.text_file is not None:
        path = Path(config.text_file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"text file {path} does not exist", "check the --file path") from None
        except OSError as e:
            raise InputError(f"cannot read text file {path}: {e.strerror}", "check the path and permissions") from e
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text file {path} is not UTF-8 (byte {e.start})", "convert it to UTF-8") from None
    if config.text is None:
        raise InputError("no text given", "pass TEXT, --file F, - (stdin), or --corpus SOURCES for corpus mode")
    return config.text


def _load_runs(config: InspectGatesConfig) -> list[LoadedRun]:
    """The run (and, to compare, the second run or step); compared runs must share tokenizer and vocab."""
    runs = [load_run_model(config.model, config.step, config.device)]
    if config.compare is not None or config.compare_step is not None:
        other = config.compare if config.compare is not None else config.model
        runs.append(load_run_model(other, config.compare_step, config.device))
        a, b = runs
        if a.tokenizer.fingerprint != b.tokenizer.fingerprint:
            raise ConfigError(
                f"{a.label} and {b.label} use different tokenizers (sha256 {a.tokenizer.fingerprint[:12]}… vs "
                f"{b.tokenizer.fingerprint[:12]}…), so their tokens cannot be lined up",
                "compare runs trained with the same tokenizer")
        if a.vocab.fingerprint and b.vocab.fingerprint and a.vocab.fingerprint != b.vocab.fingerprint:
            raise ConfigError(f"{a.label} and {b.label} use different vocab maps (canonical ids differ)",
                              "compare runs trained with the same vocab artifact")
    return runs


# ---------------------------------------------------------------------------------------------
# outputs


def _write_text_artifact(config: InspectGatesConfig, runs: list[LoadedRun], report: GateReport, t0: float) -> None:
    """The ``engram.gates`` artifact of text / compare mode: tokens.parquet, the heatmap, the manifest."""


    traces = report.traces
    with artifact_dir(config.out, "engram.gates", force=config.force) as w:
        pq.write_table(trace_table(traces), w.path(TOKENS_FILE))
        report.warnings += plot_gate_heatmap(traces, w.path(HEATMAP_PNG), w.path(HEATMAP_SVG), wrap=config.wrap)
        w.config = config_record(config)
        w.inputs = {"runs": [run_record(r) for r in runs], "tokenizer": runs[0].tokenizer.describe()}
        w.summary = {"mode": config.mode, "tokens": len(traces[0].tokens),
                     "runs": [{"model": t.model, "step": t.step, "gates": t.summary()} for t in traces],
                     "seconds": round(time.perf_counter() - t0, 3)}
    report.out = str(config.out)
    report.files += [str(Path(config.out) / f) for f in ("manifest.json", TOKENS_FILE, HEATMAP_PNG, HEATMAP_SVG)]


def _write_table(table, dest: Path, *, csv: bool) -> None:
    try:
        with atomic_output(dest) as tmp:
            if csv:

                pcsv.write_csv(table, tmp)
            else:

                pq.write_table(table, tmp)
    except OSError as e:
        raise InputError(f"cannot write {dest}: {e}", "check the path and permissions") from e
