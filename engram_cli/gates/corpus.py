"""Corpus mode of ``engram inspect-gates``: the gates of every token of a corpus, aggregated
exactly and in streaming fashion (:class:`GateAggregator`, :func:`inspect_corpus`).

Per canonical n-gram ending at a position (n = 1..max_n, never crossing a document start): its
count and mean gate, and the n-grams with the highest and lowest mean gate; per gate row a
histogram over [0, 1]; the mean gate by token frequency (log-spaced buckets [2^k, 2^(k+1))).
The n-grams are keyed, sorted and reduced with ``engram_cli.tables.keys`` (``KeyLayout``,
``group_rows``), the same packing build-tables counts with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.core.artifacts import artifact_dir, check_output_dir
from engram_cli.core.errors import ConfigError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.spec import CorpusStats
from engram_cli.corpus.stream import corpus_fingerprint, iter_tokenized
from engram_cli.gates.config import (
    FREQUENCY_FILE,
    FREQUENCY_PNG,
    HISTOGRAM_FILE,
    HISTOGRAM_PNG,
    NGRAMS_FILE,
    InspectGatesConfig,
    config_record,
    run_record,
)
from engram_cli.gates.forward import document_gates, load_run_model
from engram_cli.gates.plots import plot_gate_by_frequency, plot_gate_histogram
from engram_cli.gates.text import row_labels
from engram_cli.tables.keys import KeyLayout, group_rows, id_bits
from engram_cli.train.runs import LoadedRun


class GateAggregator:
    """Streaming sums of the gates of a corpus, exact and in memory bounded by distinct n-grams.

    ``add(docs)`` takes, per document, its original ids, canonical ids and gates (T, R). Kept:

    * per canonical n-gram ending at a position (n = 1..max_n, never crossing a document start):
      occurrences, the sum of the gates at its last token, and the original ids of its first
      occurrence (for display);
    * per original token id: occurrences and the sum and sum of squares of its gates;
    * per gate row: a histogram over [0, 1].
    """

    _MERGE_ROWS = 1 << 21   # partial n-gram reductions are merged once they hold this many rows

    def __init__(self, max_n: int, n_rows: int, canonical_vocab_size: int, original_vocab_size: int, bins: int):
        self.max_n, self.n_rows, self.bins = max_n, n_rows, bins
        self.layouts = {n: KeyLayout(n, id_bits(canonical_vocab_size)) for n in range(1, max_n + 1)}
        self.id_count = np.zeros(original_vocab_size, dtype=np.int64)
        self.id_sum = np.zeros((original_vocab_size, n_rows), dtype=np.float64)
        self.id_sumsq = np.zeros((original_vocab_size, n_rows), dtype=np.float64)
        self.hist = np.zeros((n_rows, bins), dtype=np.int64)
        self.tokens = 0
        self.documents = 0
        self._parts: dict[int, list[tuple]] = {n: [] for n in range(1, max_n + 1)}
        self._part_rows = dict.fromkeys(range(1, max_n + 1), 0)

    def add(self, docs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        docs = [d for d in docs if len(d[0])]
        if not docs:
            return
        orig = np.concatenate([d[0] for d in docs]).astype(np.int64, copy=False)
        canon = np.concatenate([d[1] for d in docs]).astype(np.int64, copy=False)
        gates = np.concatenate([d[2] for d in docs]).astype(np.float64, copy=False)  # (N, R)
        lengths = np.array([len(d[0]) for d in docs])
        self.tokens += int(orig.size)
        self.documents += len(docs)
        V = self.id_count.shape[0]
        self.id_count += np.bincount(orig, minlength=V)
        for r in range(self.n_rows):
            self.id_sum[:, r] += np.bincount(orig, weights=gates[:, r], minlength=V)
            self.id_sumsq[:, r] += np.bincount(orig, weights=gates[:, r] ** 2, minlength=V)
            b = np.clip((gates[:, r] * self.bins).astype(np.int64), 0, self.bins - 1)
            self.hist[r] += np.bincount(b, minlength=self.bins)
        # position of each token inside its document
        pos = np.arange(orig.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        for n in range(1, self.max_n + 1):
            ends = np.flatnonzero(pos >= n - 1)  # n-grams that start inside the document
            if ends.size == 0:
                continue
            span = ends[:, None] + np.arange(1 - n, 1)[None, :]  # (K, n) positions, oldest first
            grams, examples = canon[span], orig[span]
            self._reduce_into(n, grams, examples, np.ones(ends.size, dtype=np.int64), gates[ends])

    def _reduce_into(self, n: int, grams, examples, counts, sums) -> None:
        part = self._reduce(grams, examples, counts, sums)
        self._parts[n].append(part)
        self._part_rows[n] += part[0].shape[0]
        if self._part_rows[n] > self._MERGE_ROWS and len(self._parts[n]) > 1:
            self._parts[n] = [self._merge(self._parts[n])]
            self._part_rows[n] = self._parts[n][0][0].shape[0]

    def _reduce(self, grams, examples, counts, sums) -> tuple:
        """Rows of equal n-grams combined, sorted by n-gram: (grams, first-occurrence examples,
        counts, sums). Sums add up in input order (as ``np.bincount`` does)."""
        order, starts = group_rows(self.layouts[grams.shape[1]].pack(grams))
        first = order[starts]
        inverse = np.empty(order.size, dtype=np.intp)
        inverse[order] = np.repeat(np.arange(starts.size), np.diff(np.append(starts, order.size)))
        k = starts.size
        c = np.bincount(inverse, weights=counts, minlength=k).astype(np.int64)
        s = np.stack([np.bincount(inverse, weights=sums[:, r], minlength=k) for r in range(sums.shape[1])], axis=1)
        return grams[first], examples[first], c, s

    def _merge(self, parts: list[tuple]) -> tuple:
        if len(parts) == 1:
            return parts[0]
        # earlier parts come first, so the first occurrence of a group is the corpus's first occurrence
        return self._reduce(*(np.concatenate([p[i] for p in parts]) for i in range(4)))

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All n-grams of order n: (canonical ids (K, n), example original ids (K, n), counts, gate sums (K, R))."""
        if not self._parts[n]:
            return (np.empty((0, n), np.int64), np.empty((0, n), np.int64), np.empty(0, np.int64),
                    np.empty((0, self.n_rows)))
        merged = self._merge(self._parts[n])
        self._parts[n] = [merged]
        return merged


@dataclass
class CorpusGateResult:
    """Result of corpus mode."""

    out: str | None
    model: str
    run_dir: str | None
    step: int | None
    rows: list[str]                       # gate rows: L1 (or L1.b0, L1.b1 ...)
    layer_ids: list[int]
    hc_mult: int
    documents: int
    tokens: int
    unknown_tokens: int                   # tokens fed as the model's UNK
    mean: dict[str, float]                # per row: mean gate over all tokens
    std: dict[str, float]
    distinct_ngrams: dict[int, int]       # per order: distinct n-grams seen
    ranked_ngrams: dict[int, int]         # per order: those seen >= min_count times
    min_count: int
    extremes: list[dict[str, Any]]        # highest / lowest mean gate n-grams per layer and order
    histogram: dict[str, list[int]]       # per row: counts in `bins` equal bins over [0, 1]
    frequency: list[dict[str, Any]]       # mean gate by token-frequency bucket, per row
    corpus: dict[str, Any]                # CorpusStats figures
    seconds: float
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.model if self.step is None else f"{self.model} (step {self.step})"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["distinct_ngrams"] = {str(k): v for k, v in self.distinct_ngrams.items()}
        d["ranked_ngrams"] = {str(k): v for k, v in self.ranked_ngrams.items()}
        d["tokens_per_second"] = self.tokens / self.seconds if self.seconds > 0 else None
        return d


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """Log-spaced bucket of a token frequency: k for frequencies in [2^k, 2^(k+1)); -1 for unseen."""
    out = np.full(counts.shape, -1, dtype=np.int64)
    seen = counts > 0
    out[seen] = np.floor(np.log2(counts[seen])).astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# corpus mode


def inspect_corpus(config: InspectGatesConfig, progress: ProgressFn | None = None) -> CorpusGateResult:
    """Run the model over ``config.corpus`` and aggregate its gates (see :class:`GateAggregator`).

    Writes, with ``config.out``, an ``engram.gates`` artifact: ``ngrams.parquet`` (n-grams seen
    at least ``min_count`` times, with count and mean gate per layer/branch), ``histogram.parquet``,
    ``frequency.parquet``, ``gate_histogram.png``, ``gate_by_frequency.png`` and the manifest.
    """
    progress = report(progress)
    if config.corpus is None:
        raise ConfigError("corpus mode needs a corpus", "pass --corpus SOURCES...")
    if config.min_count < 1 or config.top < 1 or config.bins < 2:
        raise ConfigError("--min-count and --top must be >= 1 and --bins >= 2", "e.g. --min-count 5 --top 15")
    if config.out is not None:
        check_output_dir(config.out, config.force, "engram.gates")
    t0 = time.perf_counter()
    run = load_run_model(config.model, config.step, config.device)
    labels = row_labels(run.layer_ids, run.hc_mult)
    agg, stats, unknown = _aggregate(run, config, len(labels), progress)
    mean = {lab: float(agg.id_sum[:, r].sum() / agg.tokens) for r, lab in enumerate(labels)}
    std = {lab: math.sqrt(max(float(agg.id_sumsq[:, r].sum() / agg.tokens) - mean[lab] ** 2, 0.0))
           for r, lab in enumerate(labels)}
    distinct, ranked, extremes, tables = _rank_ngrams(agg, run, config)
    freq = _frequency_table(agg, labels)
    result = CorpusGateResult(
        out=str(config.out) if config.out is not None else None, model=run.name, run_dir=str(run.run_dir),
        step=run.step, rows=labels, layer_ids=list(run.layer_ids), hc_mult=run.hc_mult, documents=agg.documents,
        tokens=agg.tokens, unknown_tokens=unknown, mean=mean, std=std, distinct_ngrams=distinct,
        ranked_ngrams=ranked, min_count=config.min_count, extremes=extremes,
        histogram={lab: agg.hist[r].tolist() for r, lab in enumerate(labels)}, frequency=freq,
        corpus=stats.to_dict(), seconds=0.0)
    if unknown:
        result.warnings.append(f"{unknown:,} of {agg.tokens:,} tokens are outside the model's vocabulary "
                               "and were fed as its UNK token")
    if config.out is not None:
        _write_corpus_artifact(config, run, agg, tables, result, t0)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _aggregate(run: LoadedRun, config: InspectGatesConfig, n_rows: int, progress: ProgressFn):
    """Tokenize the corpus, run the model over each batch of documents and aggregate the gates:
    (the aggregator, the corpus's CorpusStats, tokens fed as UNK)."""

    spec = config.corpus
    agg = GateAggregator(run.plan.max_ngram_size, n_rows, run.vocab.canonical_vocab_size,
                         run.vocab.original_vocab_size, config.bins)
    stats = CorpusStats()
    unknown = 0
    for batch in iter_tokenized(spec, run.tokenizer.tokenizer, stats=stats, progress=progress):
        batch = [d.astype(np.int64) for d in batch if len(d)]
        model_ids, canon, gates = document_gates(run, batch, separator=config.separator, overlap=config.overlap,
                                                 batch_windows=config.batch_windows)
        if run.unk_id is not None:
            unknown += sum(int((m == run.unk_id).sum()) for m in model_ids)
        agg.add(list(zip(batch, canon, gates)))
        progress("gates", agg.tokens, spec.max_tokens, tokens=agg.tokens, documents=agg.documents)
    if agg.tokens == 0:
        raise InputError(f"corpus has no tokens: {', '.join(spec.sources)}", "check the inputs and --text-column")
    return agg, stats, unknown


def _rank_ngrams(agg: GateAggregator, run: LoadedRun, config: InspectGatesConfig):
    """Per order: distinct and ranked (>= min_count) n-grams, the extremes per layer, and the rows
    of ngrams.parquet (by count, then by n-gram) with their decoded text."""
    tok = run.tokenizer.tokenizer
    distinct, ranked, extremes, tables = {}, {}, [], []
    for n in range(1, run.plan.max_ngram_size + 1):
        grams, examples, counts, sums = agg.ngrams(n)
        distinct[n] = int(counts.size)
        keep = np.flatnonzero(counts >= config.min_count)
        ranked[n] = int(keep.size)
        order = keep[np.lexsort((np.arange(keep.size), -counts[keep]))]  # by count, then by n-gram
        texts_list = tok.decode_batch([examples[i].tolist() for i in order], skip_special_tokens=False) \
            if order.size else []
        texts = {tuple(examples[i].tolist()): s for i, s in zip(order, texts_list)}
        extremes += _extremes(n, grams, examples, counts, sums, run.layer_ids, run.hc_mult,
                              config.min_count, config.top, texts)
        tables.append((n, grams[order], examples[order], texts_list, counts[order], sums[order]))
    return distinct, ranked, extremes, tables


def _extremes(n: int, grams, examples, counts, sums, layer_ids, hc, min_count: int, top: int,
              texts: dict[tuple[int, ...], str]) -> list[dict[str, Any]]:
    keep = np.flatnonzero(counts >= min_count)
    out: list[dict[str, Any]] = []
    for li, layer in enumerate(layer_ids):
        mean = sums[keep, li * hc:(li + 1) * hc].sum(axis=1) / (counts[keep] * hc)
        for kind, order in (("highest", np.lexsort((-counts[keep], -mean))),
                            ("lowest", np.lexsort((-counts[keep], mean)))):
            for rank, j in enumerate(order[:top], start=1):
                i = keep[j]
                out.append({"layer": int(layer), "n": n, "kind": kind, "rank": rank,
                            "text": texts[tuple(examples[i].tolist())],
                            "canonical_ids": grams[i].tolist(), "count": int(counts[i]), "gate": float(mean[j])})
    return out


def _frequency_table(agg: GateAggregator, labels: list[str]) -> list[dict[str, Any]]:
    bucket = frequency_buckets(agg.id_count)
    rows = []
    for k in range(int(bucket.max()) + 1 if (bucket >= 0).any() else 0):
        ids = np.flatnonzero(bucket == k)
        if ids.size == 0:
            continue
        n = int(agg.id_count[ids].sum())
        for r, lab in enumerate(labels):
            s, ss = float(agg.id_sum[ids, r].sum()), float(agg.id_sumsq[ids, r].sum())
            mean = s / n
            rows.append({"row": lab, "freq_lo": 2 ** k, "freq_hi": 2 ** (k + 1) - 1, "tokens": n,
                         "distinct_tokens": int(ids.size), "mean_gate": mean,
                         "std_gate": math.sqrt(max(ss / n - mean * mean, 0.0))})
    return rows


# ---------------------------------------------------------------------------------------------
# the artifact


def _write_corpus_artifact(config: InspectGatesConfig, run: LoadedRun, agg: GateAggregator, tables,
                           result: CorpusGateResult, t0: float) -> None:


    labels = result.rows
    with artifact_dir(config.out, "engram.gates", force=config.force) as w:
        pq.write_table(_ngram_table(tables, run.layer_ids, run.hc_mult), w.path(NGRAMS_FILE))
        pq.write_table(_histogram_table(agg.hist, labels, config.bins), w.path(HISTOGRAM_FILE))
        pq.write_table(_rows_table(result.frequency), w.path(FREQUENCY_FILE))
        sub = f"{run.label} · {agg.documents:,} documents, {agg.tokens:,} tokens"
        plot_gate_histogram(agg.hist, labels, w.path(HISTOGRAM_PNG), title="Engram gate α: distribution",
                            subtitle=sub)
        plot_gate_by_frequency(result.frequency, labels, w.path(FREQUENCY_PNG),
                               title="Engram gate α by token frequency", subtitle=sub + " · band: ±1 s.d.")
        result.seconds = round(time.perf_counter() - t0, 3)
        w.config = config_record(config)
        w.inputs = {"run": run_record(run), "tokenizer": run.tokenizer.describe(),
                    "corpus": corpus_fingerprint(config.corpus)}
        w.summary = {"mode": "corpus", "documents": agg.documents, "tokens": agg.tokens,
                     "unknown_tokens": result.unknown_tokens, "mean": result.mean, "std": result.std,
                     "distinct_ngrams": {str(k): v for k, v in result.distinct_ngrams.items()},
                     "ranked_ngrams": {str(k): v for k, v in result.ranked_ngrams.items()},
                     "extremes": [e for e in result.extremes if e["rank"] <= 5], "seconds": result.seconds}
    result.files = [str(Path(config.out) / f) for f in ("manifest.json", NGRAMS_FILE, HISTOGRAM_FILE,
                                                       FREQUENCY_FILE, HISTOGRAM_PNG, FREQUENCY_PNG)]


def _ngram_table(tables, layer_ids, hc):

    cols: dict[str, list] = {"n": [], "canonical_ids": [], "example_ids": [], "text": [], "count": []}
    gate_cols = {f"gate_L{layer}": [] for layer in layer_ids}
    branch_cols = {f"gate_L{layer}_b{b}": [] for layer in layer_ids for b in range(hc)} if hc > 1 else {}
    for n, grams, examples, texts, counts, sums in tables:
        cols["n"] += [n] * counts.size
        cols["canonical_ids"] += grams.tolist()
        cols["example_ids"] += examples.tolist()
        cols["text"] += texts
        cols["count"] += counts.tolist()
        means = sums / np.maximum(counts, 1)[:, None]  # (K, R)
        for li, layer in enumerate(layer_ids):
            gate_cols[f"gate_L{layer}"] += means[:, li * hc:(li + 1) * hc].mean(axis=1).tolist()
            for b in range(hc if hc > 1 else 0):
                branch_cols[f"gate_L{layer}_b{b}"] += means[:, li * hc + b].tolist()
    arrays = {"n": pa.array(cols["n"], pa.int8()),
              "canonical_ids": pa.array(cols["canonical_ids"], pa.list_(pa.int64())),
              "example_ids": pa.array(cols["example_ids"], pa.list_(pa.int64())),
              "text": pa.array(cols["text"], pa.string()), "count": pa.array(cols["count"], pa.int64())}
    arrays.update({k: pa.array(v, pa.float64()) for k, v in {**gate_cols, **branch_cols}.items()})
    return pa.table(arrays)


def _histogram_table(hist: np.ndarray, labels: list[str], bins: int):

    edges = np.linspace(0.0, 1.0, bins + 1)
    return pa.table({"row": pa.array([lab for lab in labels for _ in range(bins)], pa.string()),
                     "bin_lo": pa.array(np.tile(edges[:-1], len(labels))),
                     "bin_hi": pa.array(np.tile(edges[1:], len(labels))),
                     "count": pa.array(hist.reshape(-1).astype(np.int64))})


def _rows_table(rows: list[dict[str, Any]]):

    return pa.Table.from_pylist(rows) if rows else pa.table({})

