""":func:`evaluate`, the one library call behind ``engram eval``: load and check the runs, score
each on its text (with the memory on and, with a knockout, off; with ``table_dtype``, also with the
tables stored at that dtype), bucket the tokens, summarize, and write the ``engram.eval`` artifact
when asked."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.core.artifacts import artifact_dir, check_output_dir
from engram_cli.core.errors import ConfigError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.stream import corpus_fingerprint
from engram_cli.eval import buckets as B
from engram_cli.eval import texts as X
from engram_cli.eval.config import (
    BUCKETS_FILE,
    COUNT_BUCKETS,
    DEFAULT_BUCKET_N,
    FILES,
    FORMAT,
    KIND_ALL,
    KIND_COUNT,
    KIND_EXPOSURE,
    KIND_SCRIPT,
    KNOCKOUTS,
    PLOT_PNG,
    PLOT_SVG,
    REFERENCE_DTYPE,
    SCRIPT_BUCKETS,
    EvalConfig,
    config_record,
)
from engram_cli.eval.losses import bits_per_byte, mean_ci95, token_losses, window_sums
from engram_cli.eval.plots import plot_eval
from engram_cli.model.quant import check_table_dtype, head_quantization_errors, quantized_tables
from engram_cli.tables.counting import MAX_ORDER
from engram_cli.train.runs import LoadedRun, load_run


@dataclass
class BucketLoss:
    """Mean loss of the tokens of one bucket (NaN losses for an empty bucket)."""

    kind: str                          # "all", "count", "script" or "exposure"
    bucket: str                        # e.g. "unseen", "≥100", "CJK", "3"
    tokens: int
    loss: float                        # nats per token
    knockout_loss: float | None        # nats per token with every Engram module switched off
    delta: float | None                # knockout_loss - loss: what the memory is worth here
    delta_ci95: tuple[float, float] | None = None  # paired over the windows (their tokens of this bucket)
    quant_loss: float | None = None    # nats per token with the tables stored at the result's table_dtype
    quant_delta: float | None = None   # quant_loss - loss: what storing the tables so costs here
    quant_delta_ci95: tuple[float, float] | None = None  # paired over the windows, as delta_ci95


@dataclass
class RunEval:
    """One run scored on one text."""

    model: str                         # run name (directory name)
    run_dir: str
    step: int
    engram_layers: list[int]           # empty: a pure-MoE run
    text: str                          # "held-out" or "corpus"
    tokens: int                        # targets scored
    windows: int                       # windows of block_size they were scored in
    block_size: int
    bytes: int                         # UTF-8 bytes of the scored targets' text
    unknown_tokens: int                # targets outside the run's sub-vocabulary (scored as UNK)
    train_tokens: int                  # tokens of the training split the counts come from
    bucket_n: int                      # order of the n-gram the count buckets are keyed on
    loss: float                        # nats per token
    loss_ci95: tuple[float, float]
    bits_per_byte: float
    knockout_loss: float | None = None
    knockout_ci95: tuple[float, float] | None = None
    knockout_bits_per_byte: float | None = None
    delta: float | None = None         # knockout_loss - loss
    delta_ci95: tuple[float, float] | None = None  # paired over the same windows
    table_dtype: str = REFERENCE_DTYPE  # the dtype quant_* scored the tables at (fp32: not scored)
    quant_loss: float | None = None     # nats per token with the tables at table_dtype
    quant_ci95: tuple[float, float] | None = None
    quant_bits_per_byte: float | None = None
    quant_delta: float | None = None    # quant_loss - loss (paired over the same windows)
    quant_delta_ci95: tuple[float, float] | None = None
    # per Engram layer and head: {"layer", "head", "order", "rel_l2", "max_abs"} of the stored rows
    quant_errors: list[dict[str, Any]] = field(default_factory=list)
    exposure_layer: int | None = None   # the Engram layer whose heads the exposure buckets count (None: no plan)
    exposure_heads: int = 0             # its heads over all orders: the largest exposure
    buckets: list[BucketLoss] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model} (step {self.step})"

    def bucket(self, kind: str, name: str) -> BucketLoss:
        return next(b for b in self.buckets if b.kind == kind and b.bucket == name)

    def find_bucket(self, kind: str, name: str) -> BucketLoss | None:
        """The bucket, or None when this run has none of that name (exposure buckets follow each run's plan)."""
        return next((b for b in self.buckets if b.kind == kind and b.bucket == name), None)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns."""

    text: str                          # "held-out" or "corpus"
    bucket_n: int
    knockout: str | None
    runs: list[RunEval]
    table_dtype: str = REFERENCE_DTYPE  # bf16 / fp8-e4m3: every run also scored with its tables so stored
    corpus: dict[str, Any] | None = None   # reading figures of the corpus (corpus mode)
    seconds: float = 0.0
    out: str | None = None
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN (an empty bucket, an interval of one window) becomes None."""
        d = asdict(self)
        for r, run in zip(d["runs"], self.runs):
            r["label"] = run.label
        return _json_safe(d)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# the library call


def evaluate(config: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    """Score every run of ``config`` (see the package docstring); write ``config.out`` if set."""

    progress = report(progress)
    _check_config(config)
    if config.out is not None:
        check_output_dir(config.out, config.force, FORMAT)  # before any model runs
    t0 = time.perf_counter()
    runs = [load_run(r, device=config.device, verify=False) for r in config.runs]
    n = _check_runs(runs, config)
    docs, corpus = (None, None)
    if config.corpus is not None:
        docs, corpus = X.read_corpus(config.corpus, runs[0].tokenizer, progress)
    result = EvalResult(text=config.text, bucket_n=n, knockout=config.knockout, corpus=corpus,
                        table_dtype=config.table_dtype, runs=[evaluate_run(r, config, n, docs, progress) for r in runs])
    result.warnings += [f"{r.unknown_tokens:,} of {r.tokens:,} scored tokens are outside the vocabulary of "
                        f"{r.label} and were scored as its UNK token" for r in result.runs if r.unknown_tokens]
    if config.out is not None:
        _write_artifact(config, runs, result, t0)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def evaluate_run(run: LoadedRun, config: EvalConfig, n: int, docs, progress: ProgressFn) -> RunEval:
    """Score one run: its held-out split (``docs`` None) or the corpus documents ``docs``."""
    split = X.training_split(run, config.cache_dir, progress)
    text = X.heldout_text(run, split) if docs is None else X.corpus_text(docs, run.separator_id)
    windows = X.plan_windows(text.ranges, run.block_size, config.max_windows)
    positions = X.target_positions(windows)
    lengths = windows[:, 1] - windows[:, 0]
    kw = {"batch_windows": config.batch_windows, "progress": progress}
    loss = token_losses(run, text.stream, windows, **kw)
    knocked = token_losses(run, text.stream, windows, knockout=True, **kw) if config.knockout else None
    quant = None
    if config.table_dtype != REFERENCE_DTYPE:
        with quantized_tables(run.model, config.table_dtype):
            quant = token_losses(run, text.stream, windows, **kw)
    canonical = run.vocab.table
    plan = run.plan
    restart = (plan.separator_id, plan.canonical_pad_id) if plan is not None and plan.restarts else None
    orders = {n} | (set(range(2, plan.max_ngram_size + 1)) if plan is not None else set())
    train = B.training_ngram_tables(split.stream, split.train, canonical, orders, run.vocab.canonical_vocab_size,
                                    progress, restart)
    train_ngrams, train_counts = train[n]
    grams, valid = B.context_ngrams(text.stream, positions, canonical, n, restart)
    counts = np.where(valid, B.lookup_counts(train_ngrams, train_counts, grams, run.vocab.canonical_vocab_size), 0)
    targets = np.asarray(text.stream[positions])
    kinds = {KIND_ALL: (np.zeros(positions.size, dtype=np.int64), ("all",)),
             KIND_COUNT: (B.count_buckets(counts), COUNT_BUCKETS),
             KIND_SCRIPT: (B.token_scripts(run.tokenizer, targets), SCRIPT_BUCKETS)}
    if plan is not None:  # a pure-MoE run reads no rows: no exposure
        read = {k: B.read_ngrams(text.stream, windows, canonical, k, plan.canonical_pad_id, restart)
                for k in range(2, plan.max_ngram_size + 1)}
        layer = plan.layer_ids[0]
        progress("collision exposure", 0, 1)
        kinds[KIND_EXPOSURE] = (B.collision_exposure(read, train, plan, layer, run.vocab.canonical_vocab_size),
                                B.exposure_buckets(plan))
        progress("collision exposure", 1, 1)
    n_bytes = X.utf8_bytes(run.tokenizer, text.stream, positions)
    mean, ci, bpb = _loss_summary(loss, lengths, n_bytes)
    res = RunEval(model=run.name, run_dir=str(run.run_dir), step=run.step, engram_layers=list(run.layer_ids),
                  text=text.kind, tokens=int(positions.size), windows=int(windows.shape[0]),
                  block_size=run.block_size, bytes=n_bytes,
                  unknown_tokens=int((run.to_model_ids(targets) == run.unk_id).sum()),
                  train_tokens=split.train_tokens, bucket_n=n, loss=mean, loss_ci95=ci, bits_per_byte=bpb,
                  table_dtype=config.table_dtype)
    if plan is not None:
        res.exposure_layer, res.exposure_heads = plan.layer_ids[0], plan.total_heads
    if knocked is not None:
        res.knockout_loss, res.knockout_ci95, res.knockout_bits_per_byte = _loss_summary(knocked, lengths, n_bytes)
        res.delta, *delta_ci = mean_ci95(window_sums(knocked - loss, lengths), lengths)  # paired by window
        res.delta_ci95 = tuple(delta_ci)
    if quant is not None:
        res.quant_loss, res.quant_ci95, res.quant_bits_per_byte = _loss_summary(quant, lengths, n_bytes)
        res.quant_delta, *quant_ci = mean_ci95(window_sums(quant - loss, lengths), lengths)
        res.quant_delta_ci95 = tuple(quant_ci)
        res.quant_errors = table_quantization_errors(run, config.table_dtype)
    res.buckets = [b for kind, (index, names) in kinds.items()
                   for b in bucket_losses(kind, names, index, loss, knocked, lengths, quant)]
    return res


def table_quantization_errors(run: LoadedRun, dtype: str) -> list[dict[str, Any]]:
    """Relative L2 and largest absolute error of every head's table of every Engram layer at ``dtype``."""
    plan, out = run.plan, []
    for layer in run.layer_ids:
        tables = run.model.blocks[layer].engram.tables
        if tables.store_backed:  # a store run: its rows streamed from the store, a block at a time
            rows = tables.store.gather
            weight = lambda a, b, rows=rows: rows(np.arange(a, b, dtype=np.int64))  # noqa: E731
        else:
            weight = tables.embedding.weight
        errors = head_quantization_errors(weight, plan.head_sizes(layer), dtype)
        for h, (rel, mx) in enumerate(errors):
            out.append({"layer": layer, "head": h, "order": 2 + h // plan.n_head_per_ngram, "rel_l2": rel,
                        "max_abs": mx})
    return out


def _loss_summary(loss: np.ndarray, lengths: np.ndarray, n_bytes: int) -> tuple[float, tuple[float, float], float]:
    """Mean nats per token, its 95% interval over the windows, bits per byte."""
    mean, lo, hi = mean_ci95(window_sums(loss, lengths), lengths)
    return mean, (lo, hi), bits_per_byte(float(loss.sum()), n_bytes)


def bucket_losses(kind: str, names, index: np.ndarray, loss: np.ndarray, knocked: np.ndarray | None,
                  lengths: np.ndarray, quant: np.ndarray | None = None) -> list[BucketLoss]:
    """Per bucket (``index`` into ``names`` for every token, tokens laid out window after window,
    ``lengths`` tokens per window): tokens, mean loss, and with a knockout (``knocked``) or the
    tables at another dtype (``quant``) their loss and the difference from ``loss`` with a 95%
    interval over the windows."""
    k = len(names)
    tokens = np.bincount(index, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(index, weights=loss, minlength=k) / tokens
    ko = None if knocked is None else _paired(index, k, knocked, loss, lengths, tokens)
    qu = None if quant is None else _paired(index, k, quant, loss, lengths, tokens)
    out = []
    for i, name in enumerate(names):
        b = BucketLoss(kind=kind, bucket=name, tokens=int(tokens[i]), loss=float(mean[i]),
                       knockout_loss=None if ko is None else ko[i][0], delta=None if ko is None else ko[i][1],
                       delta_ci95=None if ko is None else ko[i][2])
        if qu is not None:
            b.quant_loss, b.quant_delta, b.quant_delta_ci95 = qu[i]
        out.append(b)
    return out


def _paired(index: np.ndarray, k: int, other: np.ndarray, loss: np.ndarray, lengths: np.ndarray,
            tokens: np.ndarray) -> list[tuple[float, float, tuple[float, float] | None]]:
    """Per bucket: the mean of ``other``, its difference from ``loss`` and the difference's 95%
    interval over the windows (each window's tokens of the bucket; None for an empty bucket)."""
    m = lengths.size
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.bincount(index, weights=other, minlength=k) / tokens
        base = np.bincount(index, weights=loss, minlength=k) / tokens
    cell = np.repeat(np.arange(m), lengths) * k + index   # per (window, bucket): difference sums, tokens
    cell_sums = np.bincount(cell, weights=other - loss, minlength=m * k).reshape(m, k)
    cell_counts = np.bincount(cell, minlength=m * k).reshape(m, k)
    out = []
    for i in range(k):
        ci = None
        if tokens[i]:
            _, lo, hi = mean_ci95(cell_sums[:, i], cell_counts[:, i])
            ci = (lo, hi)
        out.append((float(means[i]), float(means[i] - base[i]), ci))
    return out


# ---------------------------------------------------------------------------------------------
# the checks


def _check_config(config: EvalConfig) -> None:
    if not config.runs:
        raise ConfigError("no run given", "pass one or more run directories: engram eval RUN...")
    if config.knockout is not None and config.knockout not in KNOCKOUTS:
        raise ConfigError(f"unknown knockout {config.knockout!r}", f"use one of: {', '.join(KNOCKOUTS)}")
    check_table_dtype(config.table_dtype)
    if config.bucket_n is not None and not 1 <= config.bucket_n <= MAX_ORDER:
        raise ConfigError(f"bucket n must be between 1 and {MAX_ORDER}, got {config.bucket_n}",
                          "pass e.g. --bucket-n 3")
    if config.max_windows is not None and config.max_windows < 1 or config.batch_windows < 1:
        raise ConfigError("--max-windows and the batch size must be at least 1", "pass a positive number")


def _check_runs(runs: list[LoadedRun], config: EvalConfig) -> int:
    """Refuse runs of different tokenizers, a knockout of a run without Engram layers, a bucket n
    the plans do not allow; returns the bucket n (default: the smallest plan's max_ngram_size)."""
    first = runs[0]
    for r in runs[1:]:
        if r.tokenizer.fingerprint != first.tokenizer.fingerprint:
            raise ConfigError(f"{first.label} and {r.label} were trained with different tokenizers (sha256 "
                              f"{first.tokenizer.fingerprint[:12]}… vs {r.tokenizer.fingerprint[:12]}…)",
                              "evaluate runs of one tokenizer together; bits per byte compare separate calls")
    if config.knockout == "engram":
        for r in runs:
            if not r.layer_ids:
                raise ConfigError(f"--knockout engram: {r.label} has no Engram layers (a pure-MoE baseline, "
                                  "allocation 1.0), so there is no memory to switch off",
                                  "leave that run out of the knockout, or drop --knockout")
    if config.table_dtype != REFERENCE_DTYPE:
        for r in runs:
            if not r.layer_ids:
                raise ConfigError(f"--table-dtype {config.table_dtype}: {r.label} has no Engram layers (a pure-MoE "
                                  "baseline, allocation 1.0), so there are no tables to quantize",
                                  "leave that run out, or drop --table-dtype")
    plans = [(r, r.plan.max_ngram_size) for r in runs if r.plan is not None]
    if config.bucket_n is None:
        return min((m for _, m in plans), default=DEFAULT_BUCKET_N)
    for r, m in plans:
        if config.bucket_n > m:
            raise ConfigError(f"bucket n {config.bucket_n} is larger than the table plan of {r.label} allows "
                              f"(its largest n-gram order is {m})", f"pass --bucket-n {m} or less")
    return config.bucket_n


# ---------------------------------------------------------------------------------------------
# the artifact


def bucket_table(result: EvalResult):
    """The per-bucket rows of every run as one Arrow table (``buckets.parquet``); ``delta_lo`` /
    ``delta_hi`` and ``quant_delta_lo`` / ``quant_delta_hi`` are the 95% intervals; ``table_dtype``
    names the dtype of the ``quant_*`` columns (null without --table-dtype)."""

    def ci(v, i):
        return None if v is None else _num(v[i])

    quant = result.table_dtype if result.table_dtype != REFERENCE_DTYPE else None
    rows = [{"run": r.model, "step": r.step, "run_dir": r.run_dir, "kind": b.kind, "bucket": b.bucket,
             "tokens": b.tokens, "loss": _num(b.loss), "knockout_loss": _num(b.knockout_loss), "delta": _num(b.delta),
             "delta_lo": ci(b.delta_ci95, 0), "delta_hi": ci(b.delta_ci95, 1), "table_dtype": quant,
             "quant_loss": _num(b.quant_loss), "quant_delta": _num(b.quant_delta),
             "quant_delta_lo": ci(b.quant_delta_ci95, 0), "quant_delta_hi": ci(b.quant_delta_ci95, 1)}
            for r in result.runs for b in r.buckets]
    schema = pa.schema([("run", pa.string()), ("step", pa.int64()), ("run_dir", pa.string()), ("kind", pa.string()),
                        ("bucket", pa.string()), ("tokens", pa.int64()), ("loss", pa.float64()),
                        ("knockout_loss", pa.float64()), ("delta", pa.float64()), ("delta_lo", pa.float64()),
                        ("delta_hi", pa.float64()), ("table_dtype", pa.string()), ("quant_loss", pa.float64()),
                        ("quant_delta", pa.float64()), ("quant_delta_lo", pa.float64()),
                        ("quant_delta_hi", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def _write_artifact(config: EvalConfig, runs: list[LoadedRun], result: EvalResult, t0: float) -> None:


    with artifact_dir(config.out, FORMAT, force=config.force) as w:
        pq.write_table(bucket_table(result), w.path(BUCKETS_FILE))
        result.warnings += plot_eval(result, w.path(PLOT_PNG), w.path(PLOT_SVG))
        w.config = config_record(config)
        w.inputs = {"runs": [{"run_dir": str(r.run_dir), "name": r.name, "step": r.step,
                              "vocab_sha256": r.vocab.fingerprint, "tokenizer_sha256": r.tokenizer.fingerprint}
                             for r in runs], "tokenizer": runs[0].tokenizer.describe()}
        if config.corpus is not None:

            w.inputs["corpus"] = corpus_fingerprint(config.corpus)
        w.summary = {"text": result.text, "bucket_n": result.bucket_n, "knockout": result.knockout,
                     "table_dtype": result.table_dtype,
                     "runs": [_json_safe({k: v for k, v in asdict(r).items() if k != "buckets"}) for r in result.runs],
                     "seconds": round(time.perf_counter() - t0, 3)}
    result.out = str(config.out)
    result.files = [str(Path(config.out) / f) for f in FILES]
