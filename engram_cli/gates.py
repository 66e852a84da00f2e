"""Engram gate inspection (``engram inspect-gates``): what the memory gate does, token by token.

An Engram layer (DeepSeek, arXiv 2601.07372, Section 2.3) gates the memory it retrieves with a
scalar per token, computed from the hidden state h_t and the retrieved memory e_t::

    k_t = W_K e_t,   s_t = RMSNorm(h_t) . RMSNorm(k_t) / sqrt(d),
    alpha_t = sigmoid(sign(s_t) * sqrt(|s_t|))

alpha_t near 1: the layer lets the N-gram memory into the residual stream; near 0: it ignores
it. With hyper-connections (``engram_hc_mult`` > 1) every branch has its own gate.

Every value shown here is the alpha of the model's own forward pass: the model returns the gates
it computed (``EngramModel.forward(..., return_gates=True)``); nothing here re-implements the
gate. ``tests/test_gates.py`` checks this against a forward hook on the Engram modules.

Three views:

* **text** (:func:`inspect_text`): the gate of every token of a text at every Engram layer (and
  branch), as a :class:`GateTrace`; pictured by :func:`plot_gate_heatmap` (PNG + SVG);
* **compare**: two runs (or two steps of one run) on the same text, stacked in one picture;
* **corpus** (:func:`inspect_corpus`): over a corpus, the mean gate of every canonical n-gram
  ending at a position (n = 1..max_n), the gate histogram per layer and the mean gate by token
  frequency, written as an ``engram.gates`` artifact.

Long sequences are cut into windows of the model's ``block_size`` that overlap by ``overlap``
tokens (default half a block); each token's gate is taken from the window in which it has the
most left context, so after the first window every token sees at least ``overlap`` tokens
before it, and its n-grams are hashed from the real preceding ids (not the pad id).

The library never prints; matplotlib is imported only when a picture is drawn (Agg canvas, no
pyplot state).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.text import display_token  # noqa: F401  (re-exported: token text for display)

from engram_cli.artifacts import artifact_dir, check_output_dir
from engram_cli.errors import ArtifactError, ConfigError, InputError
from engram_cli.progress import ProgressFn, report
from engram_cli.runs import LoadedRun

TOKENS_FILE = "tokens.parquet"
HEATMAP_PNG = "gates.png"
HEATMAP_SVG = "gates.svg"
NGRAMS_FILE = "ngrams.parquet"
HISTOGRAM_FILE = "histogram.parquet"
FREQUENCY_FILE = "frequency.parquet"
HISTOGRAM_PNG = "gate_histogram.png"
FREQUENCY_PNG = "gate_by_frequency.png"

DPI = 200               # resolution of the PNGs (print quality)
COLORMAP = "viridis"    # perceptually uniform, readable in grey scale and by colour-blind readers
#: viridis sampled at 0, 0.1, ..., 1 (matplotlib's values): the terminal view shades with these
#: so that it matches the pictures without importing matplotlib
VIRIDIS_ANCHORS = ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884",
                   "#44bf70", "#7ad151", "#bddf26", "#fde725")
#: CJK fonts tried first, in order (any other installed font with CJK glyphs is found next)
CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Noto Sans CJK JP", "Noto Sans CJK TC", "Source Han Sans CN",
             "Droid Sans Fallback", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "SimHei",
             "Heiti SC", "AR PL UMing CN", "AR PL UKai CN")


# ---------------------------------------------------------------------------------------------
# a trained run, loaded for inference


def load_run_model(run_dir: str | os.PathLike, step: int | None = None, device: str = "cpu") -> LoadedRun:
    """Load a run directory written by ``engram train`` for inspection (:func:`engram_cli.runs.load_run`),
    refusing a run without Engram layers (it has no gates)."""
    from engram_cli.runs import load_run

    run = load_run(run_dir, step, device, verify=False)
    check_run(run)
    return run


def check_run(run: LoadedRun) -> None:
    """Refuse a run without Engram layers: a pure-MoE baseline has no gates to inspect."""
    if not run.layer_ids:
        raise ConfigError(f"this model has no Engram layers: {run.name} is a pure-MoE baseline "
                          "(allocation 1.0), so it has no gates to inspect",
                          "pass a run trained with Engram tables (allocation < 1)")


# ---------------------------------------------------------------------------------------------
# token text for display


def is_cjk(ch: str) -> bool:
    """True for CJK ideographs, kana, hangul and CJK punctuation / full-width forms."""
    cp = ord(ch)
    return (0x2E80 <= cp <= 0x9FFF or 0xAC00 <= cp <= 0xD7AF or 0xF900 <= cp <= 0xFAFF
            or 0xFE30 <= cp <= 0xFE4F or 0xFF00 <= cp <= 0xFFEF or 0x20000 <= cp <= 0x3FFFF)


def token_texts(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Each token's piece of ``text`` from the tokenizer's character offsets.

    When byte-level BPE splits one character over several tokens they share its span: the first
    gets the character, the others the empty string (shown as "·").
    """
    out, prev = [], None
    for a, b in offsets:
        out.append("" if (a, b) == prev else text[a:b])
        prev = (a, b)
    return out


def gate_rgb(value: float) -> tuple[int, int, int]:
    """Colour of a gate value in [0, 1] on the viridis scale (interpolated between anchors)."""
    v = min(max(float(value), 0.0), 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    i = min(int(v), len(VIRIDIS_ANCHORS) - 2)
    f = v - i
    a, b = (_hex_rgb(VIRIDIS_ANCHORS[i]), _hex_rgb(VIRIDIS_ANCHORS[i + 1]))
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))  # type: ignore[return-value]


def _hex_rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def readable_on(rgb: tuple[int, int, int]) -> str:
    """``black`` or ``white``: whichever reads better on the background ``rgb``."""
    r, g, b = (c / 255 for c in rgb)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


# ---------------------------------------------------------------------------------------------
# running the model: windows of block_size, gates straight from the forward pass


def plan_windows(length: int, block: int, overlap: int) -> list[tuple[int, int, int]]:
    """Cut ``length`` positions into windows of at most ``block``: ``(start, end, keep_from)``.

    The kept parts ``[keep_from, end)`` tile ``[0, length)``. Every window after the first
    starts at least ``overlap`` positions before its kept part (the last one is moved left to
    end at ``length``, which gives its tokens more context).
    """
    if length <= 0:
        return []
    if not 0 <= overlap < block:
        raise ConfigError(f"window overlap {overlap} must be in [0, block_size={block})",
                          "pass a smaller overlap")
    windows = [(0, min(block, length), 0)]
    while windows[-1][1] < length:
        kept = windows[-1][1]
        start = max(0, min(kept - overlap, length - block))
        windows.append((start, min(start + block, length), kept))
    return windows


def forward_gates(model: Any, model_ids: Sequence[np.ndarray], canonical_ids: Sequence[np.ndarray], *,
                  overlap: int | None = None, batch_windows: int = 16,
                  progress: ProgressFn | None = None) -> list[np.ndarray]:
    """The gates of every token of every sequence: one float32 array (T, L * hc) per sequence.

    Columns are layer-major (layer ``model.engram_layer_ids[i]``, branch ``b`` is column
    ``i * hc + b``). Sequences longer than ``block_size`` go through :func:`plan_windows`;
    windows are batched (right-padded: the model is causal and its MoE has no capacity limit, so
    padding after a token cannot change that token's gate).
    """
    import torch

    progress = report(progress)
    cfg = model.config
    block, hc = int(cfg.block_size), int(cfg.engram_hc_mult)
    layers = tuple(model.engram_layer_ids)
    overlap = block // 2 if overlap is None else int(overlap)
    pad_canon = int(model.plan.canonical_pad_id)
    device = next(model.parameters()).device
    out = [np.zeros((len(m), len(layers) * hc), dtype=np.float32) for m in model_ids]
    items = [(s, *w) for s, m in enumerate(model_ids) for w in plan_windows(len(m), block, overlap)]
    items.sort(key=lambda it: it[1] - it[2])  # similar lengths together: little padding
    total = sum(len(m) for m in model_ids)
    done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(items), batch_windows):
                batch = items[b0:b0 + batch_windows]
                width = max(end - start for _, start, end, _ in batch)
                idx = np.zeros((len(batch), width), dtype=np.int64)
                canon = np.full((len(batch), width), pad_canon, dtype=np.int64)
                for r, (s, start, end, _) in enumerate(batch):
                    idx[r, :end - start] = model_ids[s][start:end]
                    canon[r, :end - start] = canonical_ids[s][start:end]
                res = model(torch.from_numpy(idx).to(device), torch.from_numpy(canon).to(device),
                            return_gates=True)
                g = torch.stack([res.gates[layer] for layer in layers], dim=2)  # (B, W, L, hc)
                g = g.float().reshape(len(batch), width, len(layers) * hc).cpu().numpy()
                for r, (s, start, end, keep) in enumerate(batch):
                    out[s][keep:end] = g[r, keep - start:end - start]
                    done += end - keep
                progress("forward", done, total, tokens=done)
    finally:
        model.train(was_training)
    return out


def document_gates(run: LoadedRun, docs: Sequence[np.ndarray], *, separator: bool = True,
                   overlap: int | None = None, batch_windows: int = 16,
                   progress: ProgressFn | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Model ids, canonical ids and gates (T, L * hc) of documents given as original ids.

    With ``separator`` (and a run that has one) each document is read after the run's document
    separator, as in training, where every document follows an EOS token: the separator is fed
    first and its own gate dropped, so the first token's n-grams and attention see what they saw
    in training rather than the pad id and nothing.
    """
    sep = run.separator_id if separator else None
    model_ids = [np.asarray(run.to_model_ids(d), dtype=np.int64) for d in docs]
    canon = [np.asarray(run.vocab(d), dtype=np.int64) for d in docs]
    if sep is None:
        return model_ids, canon, forward_gates(run.model, model_ids, canon, overlap=overlap,
                                               batch_windows=batch_windows, progress=progress)
    sep_model = int(np.asarray(run.to_model_ids(np.array([sep])))[0])
    sep_canon = int(np.asarray(run.vocab(np.array([sep])))[0])
    gates = forward_gates(run.model, [np.concatenate([[sep_model], m]) for m in model_ids],
                          [np.concatenate([[sep_canon], c]) for c in canon], overlap=overlap,
                          batch_windows=batch_windows, progress=progress)
    return model_ids, canon, [g[1:] for g in gates]


def row_labels(layer_ids: Sequence[int], hc: int) -> list[str]:
    """Names of the gate rows: ``L1`` per layer, ``L1.b0``, ``L1.b1``... with hyper-connections."""
    return [f"L{layer}" if hc == 1 else f"L{layer}.b{b}" for layer in layer_ids for b in range(hc)]


# ---------------------------------------------------------------------------------------------
# text mode


@dataclass
class GateConfig:
    """Options of ``engram inspect-gates``."""

    model: Path                                # run directory written by `engram train`
    text: str | None = None                    # the text to inspect (text and compare mode)
    text_file: Path | None = None              # ... or a UTF-8 file holding it
    step: int | None = None                    # checkpoint step of --model (None: the latest)
    compare: Path | None = None                # a second run directory, shown beside the first
    compare_step: int | None = None            # its step; without `compare`: the same run at this step
    sources: list[str] = field(default_factory=list)  # corpus mode: files/globs/dirs/hf:NAME
    text_column: str = "text"                  # corpus: field of JSONL/Parquet/datasets inputs
    doc_mode: str = "file"                     # corpus: .txt/.md as one document per file or per line
    max_tokens: int | None = None              # corpus: stop after this many tokens
    out: Path | None = None                    # artifact directory (pictures, Parquet, manifest)
    force: bool = False                        # replace an existing --out directory
    csv: Path | None = None                    # text mode: per-token gates as CSV
    parquet: Path | None = None                # text mode: per-token gates as Parquet
    wrap: int = 40                             # tokens per row of the heatmap
    overlap: int | None = None                 # window overlap for sequences > block_size (None: half)
    separator: bool = True                     # read each text/document after the run's EOS, as trained
    min_count: int = 5                         # corpus: n-grams seen fewer times are not ranked or saved
    top: int = 15                              # corpus: n-grams listed per layer, order and end
    bins: int = 50                             # corpus: histogram bins over [0, 1]
    batch_windows: int = 16                    # windows per forward call
    device: str = "cpu"                        # torch device of the model

    @property
    def mode(self) -> str:
        return "corpus" if self.sources else ("compare" if self.compare_step is not None
                                              or self.compare is not None else "text")


@dataclass
class GateTrace:
    """The gates of one run on one text.

    ``gates`` is (R, T): row r is layer ``rows[r][0]``, branch ``rows[r][1]``; R = layers x hc.
    """

    model: str                        # run name (directory name)
    run_dir: str | None
    step: int | None
    text: str
    tokens: list[str]                 # each token's piece of the text ("" for byte continuations)
    ids: np.ndarray                   # (T,) original tokenizer ids
    model_ids: np.ndarray             # (T,) model-vocabulary ids (unknown tokens -> UNK)
    canonical_ids: np.ndarray         # (T,) canonical ids (what the tables hash)
    layer_ids: tuple[int, ...]
    hc_mult: int
    gates: np.ndarray                 # (R, T) float32 gate alpha in [0, 1]
    unknown: int = 0                  # tokens outside the model's vocabulary (fed as UNK)
    windows: int = 1                  # forward windows the text took

    @property
    def label(self) -> str:
        return self.model if self.step is None else f"{self.model} (step {self.step})"

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [(layer, b) for layer in self.layer_ids for b in range(self.hc_mult)]

    @property
    def row_labels(self) -> list[str]:
        return row_labels(self.layer_ids, self.hc_mult)

    def gate(self, layer: int, branch: int = 0) -> np.ndarray:
        """(T,) gates of one layer (and branch)."""
        return self.gates[self.rows.index((layer, branch))]

    def records(self) -> list[dict[str, Any]]:
        """Per-token records: index, token text, ids, and the gate of every layer/branch."""
        labels = self.row_labels
        return [{"index": i, "token": tok, "id": int(self.ids[i]), "canonical_id": int(self.canonical_ids[i]),
                 "model_id": int(self.model_ids[i]),
                 "gates": {lab: round(float(self.gates[r, i]), 6) for r, lab in enumerate(labels)}}
                for i, tok in enumerate(self.tokens)]

    def summary(self) -> dict[str, dict[str, float]]:
        return {lab: {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max())}
                for lab, g in zip(self.row_labels, self.gates)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "run_dir": self.run_dir, "step": self.step, "layer_ids": list(self.layer_ids),
                "hc_mult": self.hc_mult, "rows": self.row_labels, "tokens_count": len(self.tokens),
                "unknown_tokens": self.unknown, "windows": self.windows, "summary": self.summary(),
                "tokens": self.records()}


def encode_text(run: LoadedRun, text: str) -> tuple[np.ndarray, list[str]]:
    """Original ids and token pieces of ``text`` (no special tokens, as the corpus reader)."""
    enc = run.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, dtype=np.int64), token_texts(text, enc.offsets)


def trace_text(run: LoadedRun, text: str, *, separator: bool = True, overlap: int | None = None,
               batch_windows: int = 16, progress: ProgressFn | None = None) -> GateTrace:
    """Tokenize ``text`` with the run's tokenizer and record the gates of the run's forward pass
    (after the run's document separator unless ``separator=False``; see :func:`document_gates`)."""
    if not text or not text.strip():
        raise InputError("the text is empty: there is nothing to inspect", "pass a non-empty TEXT, --file F or -")
    ids, pieces = encode_text(run, text)
    if ids.size == 0:
        raise InputError("the text has no tokens", "pass a non-empty TEXT, --file F or -")
    (model_ids,), (canon,), (g,) = document_gates(run, [ids], separator=separator, overlap=overlap,
                                                  batch_windows=batch_windows, progress=progress)
    block = run.block_size
    fed = len(ids) + (1 if separator and run.separator_id is not None else 0)
    n_windows = len(plan_windows(fed, block, block // 2 if overlap is None else overlap))
    unknown = int((model_ids == run.unk_id).sum()) if run.unk_id is not None else 0
    return GateTrace(model=run.name, run_dir=str(run.run_dir) if run.run_dir else None, step=run.step, text=text,
                     tokens=pieces, ids=ids, model_ids=model_ids, canonical_ids=canon,
                     layer_ids=run.layer_ids, hc_mult=run.hc_mult, gates=np.ascontiguousarray(g.T),
                     unknown=unknown, windows=n_windows)


def _read_text(config: GateConfig) -> str:
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


def _load_runs(config: GateConfig) -> list[LoadedRun]:
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


def inspect_text(config: GateConfig, progress: ProgressFn | None = None) -> GateTrace:
    """The gates of the run ``config.model`` (at ``config.step``) on the configured text."""
    text = _read_text(config)
    run = load_run_model(config.model, config.step, config.device)
    return trace_text(run, text, separator=config.separator, overlap=config.overlap,
                      batch_windows=config.batch_windows, progress=progress)


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


def trace_table(traces: Sequence[GateTrace]):
    """Per-token values of one or more traces as one Arrow table (a ``run`` column tells them apart)."""
    import pyarrow as pa

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


def inspect_gates(config: GateConfig, progress: ProgressFn | None = None):
    """What ``engram inspect-gates`` does: text, compare or corpus mode, by the config.

    Returns a :class:`GateReport` (text/compare) or a :class:`CorpusGateResult` (corpus).
    """
    if config.sources:
        if config.text is not None or config.text_file is not None:
            raise ConfigError("corpus mode reads --corpus only, but a TEXT or --file was given too",
                              "drop the text, or drop --corpus")
        if config.compare is not None or config.compare_step is not None:
            raise ConfigError("--compare works on a text, not with --corpus", "drop one of them")
        if config.csv is not None or config.parquet is not None:
            raise ConfigError("--csv/--parquet export per-token values of a text; corpus mode writes its "
                              "tables to --out", "drop --csv/--parquet and pass --out DIR")
        return inspect_corpus(config, progress=progress)
    if config.csv is not None and config.parquet is not None:
        raise ConfigError("pass either --csv or --parquet, not both", "choose one export format")
    if config.wrap < 1:
        raise ConfigError(f"--wrap must be at least 1, got {config.wrap}", "e.g. --wrap 40")
    text = _read_text(config)
    if not text.strip():
        raise InputError("the text is empty: there is nothing to inspect", "pass a non-empty TEXT, --file F or -")
    if config.out is not None:
        check_output_dir(config.out, config.force)  # before the model runs
    t0 = time.perf_counter()
    runs = _load_runs(config)
    traces = [trace_text(r, text, separator=config.separator, overlap=config.overlap,
                         batch_windows=config.batch_windows, progress=progress) for r in runs]
    report_ = GateReport(mode=config.mode, traces=traces)
    if any(t.unknown for t in traces):
        for t in traces:
            if t.unknown:
                report_.warnings.append(f"{t.unknown} of {len(t.tokens)} tokens are outside the vocabulary of "
                                        f"{t.label} and were fed as its UNK token")
    if config.csv is not None or config.parquet is not None:
        table = trace_table(traces)
        dest = Path(config.csv if config.csv is not None else config.parquet)
        _write_table(table, dest, csv=config.csv is not None)
        report_.files.append(str(dest))
    if config.out is not None:
        import pyarrow.parquet as pq

        with artifact_dir(config.out, "engram.gates", force=config.force) as w:
            pq.write_table(trace_table(traces), w.path(TOKENS_FILE))
            report_.warnings += plot_gate_heatmap(traces, w.path(HEATMAP_PNG), w.path(HEATMAP_SVG), wrap=config.wrap)
            w.config = _config_record(config)
            w.inputs = {"runs": [_run_record(r) for r in runs],
                        "tokenizer": runs[0].tokenizer.describe()}
            w.summary = {"mode": config.mode, "tokens": len(traces[0].tokens),
                         "runs": [{"model": t.model, "step": t.step, "gates": t.summary()} for t in traces],
                         "seconds": round(time.perf_counter() - t0, 3)}
        report_.out = str(config.out)
        report_.files += [str(Path(config.out) / f) for f in ("manifest.json", TOKENS_FILE, HEATMAP_PNG, HEATMAP_SVG)]
    return report_


def _write_table(table, dest: Path, *, csv: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if csv:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, dest)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, dest)
    except OSError as e:
        raise InputError(f"cannot write {dest}: {e}", "check the path and permissions") from e


def _config_record(config: GateConfig) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()
         if k not in ("text", "force", "out")}
    d["mode"] = config.mode
    if config.text is not None:
        d["text_chars"] = len(config.text)
    return d


def _run_record(run: LoadedRun) -> dict[str, Any]:
    return {"run_dir": str(run.run_dir) if run.run_dir else None, "name": run.name, "step": run.step,
            "layer_ids": list(run.layer_ids), "hc_mult": run.hc_mult,
            "vocab_sha256": run.vocab.fingerprint, "tokenizer_sha256": run.tokenizer.fingerprint}


# ---------------------------------------------------------------------------------------------
# corpus mode: aggregates over every token of a corpus


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
        self.bits = max(1, (int(canonical_vocab_size) - 1).bit_length())
        self.id_count = np.zeros(original_vocab_size, dtype=np.int64)
        self.id_sum = np.zeros((original_vocab_size, n_rows), dtype=np.float64)
        self.id_sumsq = np.zeros((original_vocab_size, n_rows), dtype=np.float64)
        self.hist = np.zeros((n_rows, bins), dtype=np.int64)
        self.tokens = 0
        self.documents = 0
        self._parts: dict[int, list[tuple]] = {n: [] for n in range(1, max_n + 1)}
        self._part_rows = {n: 0 for n in range(1, max_n + 1)}

    def _keys(self, grams: np.ndarray) -> np.ndarray:
        """One sortable key per row of canonical ids (a packed uint64, or the row's bytes)."""
        n = grams.shape[1]
        if n * self.bits <= 64:
            key = np.zeros(grams.shape[0], dtype=np.uint64)
            for j in range(n):
                key = (key << np.uint64(self.bits)) | grams[:, j].astype(np.uint64)
            return key
        return np.ascontiguousarray(grams).view(np.dtype((np.void, 8 * n))).ravel()

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
        """Rows of equal n-grams combined: (grams, first-occurrence examples, counts, sums)."""
        _, first, inverse = np.unique(self._keys(grams), return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        k = first.size
        c = np.bincount(inverse, weights=counts, minlength=k).astype(np.int64)
        s = np.stack([np.bincount(inverse, weights=sums[:, r], minlength=k) for r in range(sums.shape[1])], axis=1)
        return grams[first], examples[first], c, s

    def _merge(self, parts: list[tuple]) -> tuple:
        if len(parts) == 1:
            return parts[0]
        # earlier parts come first, so np.unique's first occurrence is the corpus's first occurrence
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


def inspect_corpus(config: GateConfig, progress: ProgressFn | None = None) -> CorpusGateResult:
    """Run the model over a corpus and aggregate its gates (see :class:`GateAggregator`).

    Writes, with ``config.out``, an ``engram.gates`` artifact: ``ngrams.parquet`` (n-grams seen
    at least ``min_count`` times, with count and mean gate per layer/branch), ``histogram.parquet``,
    ``frequency.parquet``, ``gate_histogram.png``, ``gate_by_frequency.png`` and the manifest.
    """
    from engram_cli.corpus import CorpusSpec, CorpusStats, corpus_fingerprint, iter_tokenized

    progress = report(progress)
    if config.min_count < 1 or config.top < 1 or config.bins < 2:
        raise ConfigError("--min-count and --top must be >= 1 and --bins >= 2", "e.g. --min-count 5 --top 15")
    spec = CorpusSpec(sources=list(config.sources), text_column=config.text_column, doc_mode=config.doc_mode,
                      max_tokens=config.max_tokens)
    if config.out is not None:
        check_output_dir(config.out, config.force)
    t0 = time.perf_counter()
    run = load_run_model(config.model, config.step, config.device)
    plan = run.model.plan
    labels = row_labels(run.layer_ids, run.hc_mult)
    agg = GateAggregator(plan.max_ngram_size, len(labels), run.vocab.canonical_vocab_size,
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
        progress("gates", agg.tokens, config.max_tokens, tokens=agg.tokens, documents=agg.documents)
    if agg.tokens == 0:
        raise InputError(f"corpus has no tokens: {', '.join(spec.sources)}", "check the inputs and --text-column")

    tok = run.tokenizer.tokenizer
    total = agg.id_count.sum()
    mean = {lab: float(agg.id_sum[:, r].sum() / total) for r, lab in enumerate(labels)}
    std = {lab: math.sqrt(max(float(agg.id_sumsq[:, r].sum() / total) - mean[lab] ** 2, 0.0))
           for r, lab in enumerate(labels)}
    distinct, ranked, extremes, tables = {}, {}, [], []
    for n in range(1, plan.max_ngram_size + 1):
        grams, examples, counts, sums = agg.ngrams(n)
        distinct[n] = int(counts.size)
        keep = np.flatnonzero(counts >= config.min_count)
        ranked[n] = int(keep.size)
        order = keep[np.lexsort((np.arange(keep.size), -counts[keep]))]  # by count, then first seen
        texts_list = tok.decode_batch([examples[i].tolist() for i in order], skip_special_tokens=False) \
            if order.size else []
        texts = {tuple(examples[i].tolist()): s for i, s in zip(order, texts_list)}
        extremes += _extremes(n, grams, examples, counts, sums, run.layer_ids, run.hc_mult,
                              config.min_count, config.top, texts)
        tables.append((n, grams[order], examples[order], texts_list, counts[order], sums[order]))
    freq = _frequency_table(agg, labels)
    result = CorpusGateResult(
        out=str(config.out) if config.out is not None else None, model=run.name,
        run_dir=str(run.run_dir) if run.run_dir else None, step=run.step, rows=labels,
        layer_ids=list(run.layer_ids), hc_mult=run.hc_mult, documents=agg.documents, tokens=agg.tokens,
        unknown_tokens=unknown, mean=mean, std=std, distinct_ngrams=distinct, ranked_ngrams=ranked,
        min_count=config.min_count, extremes=extremes,
        histogram={lab: agg.hist[r].tolist() for r, lab in enumerate(labels)}, frequency=freq,
        corpus=stats.to_dict(), seconds=0.0)
    if unknown:
        result.warnings.append(f"{unknown:,} of {agg.tokens:,} tokens are outside the model's vocabulary "
                               "and were fed as its UNK token")
    if config.out is not None:
        import pyarrow.parquet as pq

        with artifact_dir(config.out, "engram.gates", force=config.force) as w:
            pq.write_table(_ngram_table(tables, run.layer_ids, run.hc_mult), w.path(NGRAMS_FILE))
            pq.write_table(_histogram_table(agg.hist, labels, config.bins), w.path(HISTOGRAM_FILE))
            pq.write_table(_rows_table(freq), w.path(FREQUENCY_FILE))
            sub = f"{run.label} · {agg.documents:,} documents, {agg.tokens:,} tokens"
            plot_gate_histogram(agg.hist, labels, w.path(HISTOGRAM_PNG), title="Engram gate α: distribution",
                                subtitle=sub)
            plot_gate_by_frequency(freq, labels, w.path(FREQUENCY_PNG), title="Engram gate α by token frequency",
                                   subtitle=sub + " · band: ±1 s.d.")
            result.seconds = round(time.perf_counter() - t0, 3)
            w.config = _config_record(config)
            w.inputs = {"run": _run_record(run), "tokenizer": run.tokenizer.describe(),
                        "corpus": corpus_fingerprint(spec)}
            w.summary = {"mode": "corpus", "documents": agg.documents, "tokens": agg.tokens,
                         "unknown_tokens": unknown, "mean": mean, "std": std,
                         "distinct_ngrams": {str(k): v for k, v in distinct.items()},
                         "ranked_ngrams": {str(k): v for k, v in ranked.items()},
                         "extremes": [e for e in extremes if e["rank"] <= 5], "seconds": result.seconds}
        result.files = [str(Path(config.out) / f) for f in ("manifest.json", NGRAMS_FILE, HISTOGRAM_FILE,
                                                           FREQUENCY_FILE, HISTOGRAM_PNG, FREQUENCY_PNG)]
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _ngram_table(tables, layer_ids, hc):
    import pyarrow as pa

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
    import pyarrow as pa

    edges = np.linspace(0.0, 1.0, bins + 1)
    return pa.table({"row": pa.array([lab for lab in labels for _ in range(bins)], pa.string()),
                     "bin_lo": pa.array(np.tile(edges[:-1], len(labels))),
                     "bin_hi": pa.array(np.tile(edges[1:], len(labels))),
                     "count": pa.array(hist.reshape(-1).astype(np.int64))})


def _rows_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows) if rows else pa.table({})


# ---------------------------------------------------------------------------------------------
# pictures (matplotlib imported lazily; Agg canvas, no pyplot state)

#: line colours of the corpus plots (Okabe & Ito's colour-blind-safe palette)
LINE_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_CJK_FONT_CACHE: dict[str, str | None] = {}


def find_cjk_font() -> str | None:
    """Family name of an installed font with CJK glyphs (matplotlib's font list), or None.

    Known good families (``CJK_FONTS``) are preferred; otherwise any font whose character map
    holds 中 and 的 is taken.
    """
    if "font" in _CJK_FONT_CACHE:
        return _CJK_FONT_CACHE["font"]
    from matplotlib import font_manager

    names = {f.name: f for f in font_manager.fontManager.ttflist}
    found = next((n for n in CJK_FONTS if n in names), None)
    if found is None:
        from matplotlib.ft2font import FT2Font

        for f in sorted(font_manager.fontManager.ttflist, key=lambda f: f.name):
            try:
                cmap = FT2Font(f.fname).get_charmap()
            except Exception:  # unreadable font file: skip it  # noqa: BLE001
                continue
            if ord("中") in cmap and ord("的") in cmap:
                found = f.name
                break
    _CJK_FONT_CACHE["font"] = found
    return found


def _font_rc(texts: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """rcParams for the pictures, with a CJK fallback font when a label needs one."""
    rc = {"font.family": ["DejaVu Sans"], "font.size": 7, "svg.fonttype": "path", "axes.linewidth": 0.6,
          "xtick.major.width": 0.6, "ytick.major.width": 0.6, "savefig.dpi": DPI}
    warnings = []
    if any(is_cjk(ch) for t in texts for ch in t):
        font = find_cjk_font()
        if font is None:
            warnings.append("no font with CJK glyphs is installed, so CJK tokens show as boxes in the pictures "
                            "(install one, e.g. `apt-get install fonts-noto-cjk`)")
        else:
            rc["font.family"] = ["DejaVu Sans", font]
    return rc, warnings


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, *paths: str | os.PathLike | None) -> list[str]:
    """Save to each path, turning matplotlib's missing-glyph warnings into one message."""
    import warnings as pywarnings

    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        for p in paths:
            if p is not None:
                fig.savefig(os.fspath(p), dpi=DPI, bbox_inches="tight", pad_inches=0.04)
    missing = sorted({str(w.message) for w in caught if "missing from" in str(w.message)})
    return [f"some characters have no glyph in the installed fonts ({len(missing)} kinds), shown as boxes"] \
        if missing else []


def _tick_label(text: str) -> tuple[str, bool]:
    """The x tick label of a token and whether it is set upright (CJK: characters stacked)."""
    shown = display_token(text, max_len=12)
    if shown and all(is_cjk(ch) for ch in shown):
        return "\n".join(shown[:6]), True
    return shown, False


def plot_gate_heatmap(traces: Sequence[GateTrace], path_png: str | os.PathLike | None,
                      path_svg: str | os.PathLike | None = None, *, wrap: int = 40) -> list[str]:
    """Heatmap of the gates of one or more traces on the same tokens: PNG (DPI 200) and/or SVG.

    Tokens run along x (their text below, whitespace made visible), wrapped every ``wrap``
    tokens into rows of panels; each panel stacks the layer (branch) rows of every trace, so
    compared runs share the token axis; one colour bar 0..1 (viridis). Returns warnings (e.g.
    no CJK font installed) instead of printing them.
    """
    if not traces:
        raise ConfigError("nothing to plot", "pass at least one trace")
    tokens = traces[0].tokens
    if any(t.tokens != tokens for t in traces[1:]):
        raise ConfigError("the traces to compare have different tokens", "inspect the same text with one tokenizer")
    from matplotlib import colormaps, rc_context
    from matplotlib.colors import Normalize

    T = len(tokens)
    wrap = max(1, min(wrap, T))
    chunks = [(s, min(s + wrap, T)) for s in range(0, T, wrap)]
    labels = [_tick_label(t) for t in tokens]
    rc, warnings = _font_rc([lab for lab, _ in labels] + [t.model for t in traces])

    # geometry in inches; the token labels of each panel row get the height of its longest label
    cell_w, row_h, trace_gap, chunk_gap = 0.2, 0.22, 0.08, 0.16
    many = len(traces) > 1
    run_names = [(_short(t.model, 22), "" if t.step is None else f"step {t.step}") for t in traces]
    left = 0.3 + 0.045 * max(len(lab) for t in traces for lab in t.row_labels)
    if many:
        left += 0.1 + 0.052 * max(len(part) for name in run_names for part in name)
    right = 0.85
    top = 0.36

    def label_height(upright_label: tuple[str, bool]) -> float:
        lab, upright = upright_label
        return 0.11 * (lab.count("\n") + 1) if upright else 0.058 * len(lab)

    label_h = [0.12 + max(label_height(labels[i]) for i in range(s, e)) for s, e in chunks]
    trace_h = [len(t.row_labels) * row_h for t in traces]
    panels_h = sum(trace_h) + trace_gap * (len(traces) - 1)
    width = left + wrap * cell_w + right
    height = top + len(chunks) * panels_h + sum(label_h) + (len(chunks) - 1) * chunk_gap + 0.05
    cmap, norm = colormaps[COLORMAP], Normalize(0.0, 1.0)

    with rc_context(rc):
        fig = _new_figure(width, height)

        def axes(x: float, y_top: float, w: float, h: float):
            return fig.add_axes((x / width, 1 - (y_top + h) / height, w / width, h / height))

        y = top
        first_panel = None
        for c, (s, e) in enumerate(chunks):
            for k, (trace, th) in enumerate(zip(traces, trace_h)):
                ax = axes(left, y, (e - s) * cell_w, th)
                data = trace.gates[:, s:e]  # (R, n)
                mesh = ax.pcolormesh(np.arange(e - s + 1), np.arange(data.shape[0] + 1), data, cmap=cmap, norm=norm,
                                     edgecolors="white", linewidth=0.5, antialiased=False, rasterized=False)
                ax.set_xlim(0, e - s)
                ax.set_ylim(data.shape[0], 0)
                ax.set_yticks(np.arange(data.shape[0]) + 0.5, trace.row_labels)
                ax.tick_params(axis="both", length=0, pad=2)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if many:
                    name, step = run_names[k]
                    ax.set_ylabel(name + ("\n" + step if step else ""), fontsize=6.5, rotation=0, ha="right",
                                  va="center", labelpad=5, color="0.2", linespacing=1.3)
                if k == len(traces) - 1:
                    ax.set_xticks(np.arange(e - s) + 0.5)
                    ax.set_xticklabels([labels[i][0] for i in range(s, e)])
                    for tick, i in zip(ax.get_xticklabels(), range(s, e)):
                        upright = labels[i][1]
                        tick.set_rotation(0 if upright else 90)
                        tick.set_verticalalignment("top")
                        tick.set_horizontalalignment("center")
                        tick.set_linespacing(0.95)
                else:
                    ax.set_xticks([])
                if first_panel is None:
                    first_panel = (ax, mesh)
                y += th + (trace_gap if k < len(traces) - 1 else 0)
            if len(chunks) > 1:  # index of the row's first token, at its left
                fig.text((left - 0.05) / width, 1 - (y + 0.1) / height, f"{s}", fontsize=5.5, color="0.5",
                         ha="right", va="top")
            y += label_h[c] + chunk_gap

        # one colour bar, beside the first panel row
        bar_h = min(max(panels_h, 0.9), 2.4)
        cax = axes(left + wrap * cell_w + 0.18, top, 0.1, bar_h)
        cb = fig.colorbar(first_panel[1], cax=cax, ticks=[0, 0.25, 0.5, 0.75, 1.0])
        cb.outline.set_linewidth(0.4)
        cb.ax.tick_params(length=2, width=0.4, labelsize=6)
        cb.set_label("gate α", fontsize=7, labelpad=3)
        title = "Engram gate α — " + " vs ".join(t.label for t in traces)
        fig.text(left / width, 1 - 0.12 / height, title, fontsize=8.5, fontweight="bold", ha="left", va="top")
        sub = f"{T} tokens · Engram layers {', '.join(str(i) for i in traces[0].layer_ids)}"
        if traces[0].hc_mult > 1:
            sub += f" · {traces[0].hc_mult} hyper-connection branches"
        fig.text(left / width, 1 - 0.27 / height, sub, fontsize=6.5, color="0.35", ha="left", va="top")
        warnings += _save(fig, path_png, path_svg)
    return warnings


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_gate_histogram(hist: np.ndarray, labels: list[str], path_png: str | os.PathLike, *, title: str,
                        subtitle: str = "") -> list[str]:
    """One panel per Engram layer: the share of tokens per gate bin (branches overlaid), with the mean."""
    from matplotlib import colormaps, rc_context

    bins = hist.shape[1]
    edges = np.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    layers: dict[str, list[int]] = {}
    for r, lab in enumerate(labels):
        layers.setdefault(lab.split(".")[0], []).append(r)
    rc, warnings = _font_rc([title])
    with rc_context(rc):
        fig = _new_figure(max(0.5 + 2.3 * len(layers), 3.6), 2.0 + _TITLE_BAND)
        axs = fig.subplots(1, len(layers), sharey=True, squeeze=False)[0]
        for ax, (layer, rows) in zip(axs, layers.items()):
            for j, r in enumerate(rows):
                total = max(int(hist[r].sum()), 1)
                share = hist[r] / total * 100
                mean = float((hist[r] * centers).sum() / total)
                color = LINE_COLORS[j % len(LINE_COLORS)] if len(rows) > 1 else colormaps[COLORMAP](0.35)
                name = labels[r].split(".")[1] if len(rows) > 1 else None
                if len(rows) == 1:
                    ax.bar(centers, share, width=1 / bins, color=color, edgecolor="none", alpha=0.9)
                else:
                    ax.stairs(share, edges, color=color, linewidth=1.0, label=name)
                ax.axvline(mean, color="0.15" if len(rows) == 1 else color, linestyle="--", linewidth=0.7)
                ax.text(mean + (0.015 if mean < 0.7 else -0.015), 0.98 - 0.1 * j, f"mean {mean:.2f}",
                        transform=ax.get_xaxis_transform(), fontsize=6, va="top",
                        ha="left" if mean < 0.7 else "right", color="0.15" if len(rows) == 1 else color,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.8, "alpha": 0.85})
            ax.set_title(f"layer {layer[1:]}", fontsize=7.5)
            ax.set_xlim(0, 1)
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5", "0.75", "1"])
            ax.set_xlabel("gate α")
            ax.spines[["top", "right"]].set_visible(False)
            if len(rows) > 1:
                ax.legend(fontsize=6, frameon=False, loc="upper left")
        axs[0].set_ylabel("share of tokens (%)")
        fig.tight_layout(pad=0.4, w_pad=1.5, rect=_titles(fig, title, subtitle))
        warnings += _save(fig, path_png)
    return warnings


def plot_gate_by_frequency(rows: list[dict[str, Any]], labels: list[str], path_png: str | os.PathLike, *,
                           title: str, subtitle: str = "") -> list[str]:
    """Mean gate (± one standard deviation) by token-frequency bucket, and the tokens per bucket."""
    from matplotlib import rc_context
    from matplotlib.ticker import FixedLocator, NullLocator

    rc, warnings = _font_rc([title])
    with rc_context(rc):
        fig = _new_figure(4.6, 3.2 + _TITLE_BAND)
        top_ax, bottom_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.6, 1]})
        xs_all: list[float] = []
        for j, lab in enumerate(labels):
            mine = [r for r in rows if r["row"] == lab]
            if not mine:
                continue
            x = np.array([math.sqrt(r["freq_lo"] * r["freq_hi"]) for r in mine])
            m = np.array([r["mean_gate"] for r in mine])
            sd = np.array([r["std_gate"] for r in mine])
            color = LINE_COLORS[j % len(LINE_COLORS)]
            top_ax.fill_between(x, np.clip(m - sd, 0, 1), np.clip(m + sd, 0, 1), color=color, alpha=0.1, linewidth=0)
            top_ax.plot(x, m, marker="o", markersize=2.8, linewidth=1.1, color=color, label=lab)
            xs_all = list(x)
            if j == 0:
                share = np.array([r["tokens"] for r in mine], dtype=float)
                share = share / share.sum() * 100
                bottom_ax.bar(x, share, width=x * 0.55, color="0.55", edgecolor="none")
        top_ax.set_xscale("log", base=2)
        top_ax.set_ylim(0, 1)
        top_ax.set_ylabel("mean gate α")
        top_ax.legend(fontsize=6, frameon=False, ncol=min(4, len(labels)), loc="lower right")
        top_ax.grid(axis="y", linewidth=0.3, color="0.85")
        bottom_ax.set_ylabel("tokens (%)")
        bottom_ax.set_xlabel("frequency of the token in the corpus (log scale)")
        if xs_all:
            ticks = [x for x in xs_all]
            bottom_ax.xaxis.set_major_locator(FixedLocator(ticks))
            bottom_ax.xaxis.set_minor_locator(NullLocator())
            bottom_ax.set_xticklabels([_freq_label(r) for r in rows if r["row"] == labels[0]], rotation=45,
                                      ha="right", fontsize=5.5)
        for ax in (top_ax, bottom_ax):
            ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout(pad=0.4, h_pad=0.3, rect=_titles(fig, title, subtitle))
        warnings += _save(fig, path_png)
    return warnings


_TITLE_BAND = 0.42  # inches above the axes for a title and a subtitle


def _titles(fig, title: str, subtitle: str) -> tuple[float, float, float, float]:
    """Title and subtitle at the top left; returns the rect the axes may fill (for tight_layout)."""
    h = fig.get_figheight()
    fig.text(0.012, 1 - 0.05 / h, title, fontsize=8.5, fontweight="bold", ha="left", va="top")
    if subtitle:
        fig.text(0.012, 1 - 0.24 / h, subtitle, fontsize=6.5, color="0.35", ha="left", va="top")
    return (0, 0, 1, 1 - _TITLE_BAND / h)


def _freq_label(row: dict[str, Any]) -> str:
    lo, hi = row["freq_lo"], row["freq_hi"]
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
