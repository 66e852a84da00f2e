"""The whole-table report: every row of every head of every Engram layer, streamed in blocks.

Per head (``HeadSurvey``): how many rows the corpus addresses, how many training updated and how
many it never touched; how far the rows moved from their initial values (L2 norm of the
difference); the spectrum of the updated rows (singular values from their D x D Gram matrix,
accumulated block by block) against the same rows' initial values, a random normal table of the
same shape; near-duplicate rows among the most-moved ones; the collision load (rows holding 1, 2,
3+ distinct n-grams, with the shares of the order's occurrences that land in them); and the rows
that moved most, with the n-grams that hash there.

Per layer and order (``frequency`` rows): rows binned by the summed corpus count of the n-grams
hashed into them (0, 1, 2-3, 4-7, ...), with their mean norm and movement: does the memory spend
its capacity on frequent patterns?

Only one block of rows (``block_rows`` x D) and its initial values are in memory at a time, plus
one norm, one movement and one flag per row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engram_cli.core.progress import ProgressFn, report
from engram_cli.inspect_tables.ngrams import LayerNgrams, ngram_records
from engram_cli.inspect_tables.rows import TableRows, initial_rows, updated_rows
from engram_cli.model.quant import QuantError
from engram_cli.train.runs import LoadedRun
from engram_cli.vocab.normalize import VocabMap


@dataclass
class HeadSurvey:
    """One head of one layer: use, movement, spectrum, duplicates and collision load."""

    layer: int
    head: int
    n: int
    order_head: int
    rows: int
    addressed: int                  # rows holding at least one corpus n-gram
    updated: int                    # rows SparseAdam ever stepped
    never_touched: int              # rows neither addressed nor updated
    addressed_not_updated: int      # the corpus has n-grams there, training never reached them
    updated_not_addressed: int      # training stepped them, no counted n-gram is there (e.g. pad-led n-grams)
    norm_mean: float                # mean L2 norm of the updated rows (nan: none)
    movement_mean: float            # mean L2 distance from the initial value, updated rows
    movement_median: float
    movement_max: float
    effective_rank: float           # exp(entropy of the normalized singular values), updated rows
    effective_rank_init: float      # the same rows at their initial values (a random table)
    top_singular_share: float       # largest singular value / their sum, updated rows
    top_singular_share_init: float
    duplicate_rows: int             # among the most-moved rows: rows with a near-duplicate (cosine)
    duplicate_moves: int            # ... rows whose movement has a near-duplicate movement
    duplicate_pool: int             # how many rows were compared
    load_1: int                     # rows holding exactly 1 distinct n-gram
    load_2: int
    load_3plus: int
    count_share_1: float            # share of the order's occurrences landing in rows of load 1
    count_share_2: float
    count_share_3plus: float
    colliding: int                  # n-grams in rows of load >= 2 (build-tables' "colliding")
    # serving precision (engram_cli.model.quant): the head's rows stored as bf16 / as fp8 e4m3 with
    # one ue8m0 scale per 32 values (V4.1-Flash's storage): relative L2 error and largest |error|
    bf16_rel_l2: float
    bf16_max_abs: float
    fp8_rel_l2: float
    fp8_max_abs: float
    singular_values: list[float] = field(default_factory=list, repr=False)
    singular_values_init: list[float] = field(default_factory=list, repr=False)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("singular_values")
        d.pop("singular_values_init")
        return d


@dataclass
class LayerSurvey:
    """One layer: its heads, per-row norm/movement/count for the picture, frequency bins, top rows."""

    layer: int
    heads: list[HeadSurvey]
    frequency: list[dict[str, Any]]
    top_rows: list[dict[str, Any]]
    norm: np.ndarray = field(repr=False)        # (rows,) float32
    movement: np.ndarray = field(repr=False)    # (rows,) float32
    count: np.ndarray = field(repr=False)       # (rows,) int64 summed corpus count
    order: np.ndarray = field(repr=False)       # (rows,) int8 the row's n-gram order

    def summary(self) -> dict[str, Any]:
        hs = self.heads
        rows = sum(h.rows for h in hs)
        upd = sum(h.updated for h in hs)
        moved = self.movement[self.movement > 0]
        return {"layer": self.layer, "rows": rows, "addressed": sum(h.addressed for h in hs), "updated": upd,
                "updated_share": upd / rows if rows else 0.0, "never_touched": sum(h.never_touched for h in hs),
                "addressed_not_updated": sum(h.addressed_not_updated for h in hs),
                "updated_not_addressed": sum(h.updated_not_addressed for h in hs),
                "movement_mean": float(moved.mean()) if moved.size else 0.0,
                "movement_max": float(moved.max()) if moved.size else 0.0,
                "rows_with_collisions": sum(h.load_2 + h.load_3plus for h in hs)}


def count_bin(count: np.ndarray) -> np.ndarray:
    """Bin of each summed count: 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ... (floor(log2 c) + 1)."""
    c = np.asarray(count, dtype=np.int64)
    out = np.zeros(c.shape, dtype=np.int64)
    pos = c > 0
    out[pos] = np.floor(np.log2(c[pos])).astype(np.int64) + 1
    return out


def bin_label(b: int) -> str:
    if b == 0:
        return "0"
    lo, hi = 1 << (b - 1), (1 << b) - 1
    return str(lo) if lo == hi else f"{lo}–{hi}"


def effective_rank(sv: np.ndarray) -> float:
    """exp of the entropy of the singular values normalized to sum 1 (Roy & Vetterli 2007)."""
    s = np.asarray(sv, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return float("nan")
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def gram_singular_values(gram: np.ndarray) -> np.ndarray:
    """Singular values of X from its Gram matrix X^T X, descending."""
    ev = np.linalg.eigvalsh(gram)[::-1]
    return np.sqrt(np.clip(ev, 0.0, None))


def near_duplicates(x: np.ndarray, cosine: float) -> int:
    """Rows of ``x`` (k, D) with another row at cosine similarity >= ``cosine``."""
    if x.shape[0] < 2:
        return 0
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, nrm, out=np.zeros_like(x), where=nrm > 0)
    sim = u @ u.T
    np.fill_diagonal(sim, -1.0)
    return int(((sim >= cosine) & (nrm > 0) & (nrm.T > 0)).any(axis=1).sum())


def survey_layer(run: LoadedRun, table: TableRows, ln: LayerNgrams, vocab: VocabMap, *, block_rows: int,
                 top: int, sharing: int, duplicate_rows: int, duplicate_cosine: float,
                 progress: ProgressFn | None = None) -> LayerSurvey:
    """Stream one layer's table and describe every head (see the module docstring)."""
    progress = report(progress)
    layer = ln.layer
    rows = ln.rows
    upd = updated_rows(run, layer, rows)
    norm = np.zeros(rows, dtype=np.float32)
    move = np.zeros(rows, dtype=np.float32)
    order = np.zeros(rows, dtype=np.int8)
    heads, top_rows = [], []
    done = 0
    for h in ln.heads:
        D = table.shape(layer)[1]
        gram = np.zeros((D, D))
        gram0 = np.zeros((D, D))
        lo, hi = h.offset, h.offset + h.size
        order[lo:hi] = h.n
        quant = {dtype: QuantError(dtype) for dtype in ("bf16", "fp8-e4m3")}
        for a in range(lo, hi, block_rows):
            b = min(a + block_rows, hi)
            w = table.read(layer, a, b)                           # (R, D) trained
            for q in quant.values():  # rows quantize on their own: blocks add up exactly
                q.add(w)
            w0 = initial_rows(run, layer, slice(a, b))            # (R, D) initial
            norm[a:b] = np.linalg.norm(w, axis=1)
            move[a:b] = np.linalg.norm(w - w0, axis=1)
            t = upd[a:b]
            if t.any():
                wt, w0t = w[t].astype(np.float64), w0[t].astype(np.float64)
                gram += wt.T @ wt
                gram0 += w0t.T @ w0t
            done += b - a
            progress("rows", done, rows, layer=layer)
        sv, sv0 = gram_singular_values(gram), gram_singular_values(gram0)
        u = upd[lo:hi]
        mv = move[lo:hi][u]
        # near-duplicates among the most-moved updated rows, gathered block by block
        pool = lo + np.flatnonzero(u)[np.argsort(-mv, kind="stable")[:duplicate_rows]]
        pool.sort()
        xs, ds = _gather(run, table, layer, pool, block_rows)
        load = ln.load[lo:hi]
        cnt = ln.count[lo:hi]
        total = max(int(cnt.sum()), 1)
        addressed = load > 0
        heads.append(HeadSurvey(
            layer=layer, head=h.head, n=h.n, order_head=h.order_head, rows=h.size,
            addressed=int(addressed.sum()), updated=int(u.sum()), never_touched=int((~addressed & ~u).sum()),
            addressed_not_updated=int((addressed & ~u).sum()), updated_not_addressed=int((~addressed & u).sum()),
            norm_mean=float(norm[lo:hi][u].mean()) if u.any() else math.nan,
            movement_mean=float(mv.mean()) if mv.size else math.nan,
            movement_median=float(np.median(mv)) if mv.size else math.nan,
            movement_max=float(mv.max()) if mv.size else math.nan,
            effective_rank=effective_rank(sv), effective_rank_init=effective_rank(sv0),
            top_singular_share=float(sv[0] / sv.sum()) if sv.sum() > 0 else math.nan,
            top_singular_share_init=float(sv0[0] / sv0.sum()) if sv0.sum() > 0 else math.nan,
            duplicate_rows=near_duplicates(xs, duplicate_cosine), duplicate_moves=near_duplicates(ds, duplicate_cosine),
            duplicate_pool=int(pool.shape[0]),
            load_1=int((load == 1).sum()), load_2=int((load == 2).sum()), load_3plus=int((load >= 3).sum()),
            count_share_1=float(cnt[load == 1].sum() / total), count_share_2=float(cnt[load == 2].sum() / total),
            count_share_3plus=float(cnt[load >= 3].sum() / total), colliding=int(load[load >= 2].sum()),
            bf16_rel_l2=quant["bf16"].rel_l2, bf16_max_abs=quant["bf16"].max_abs,
            fp8_rel_l2=quant["fp8-e4m3"].rel_l2, fp8_max_abs=quant["fp8-e4m3"].max_abs,
            singular_values=sv.tolist(), singular_values_init=sv0.tolist()))
        top_rows += _top_rows(ln, h.head, move[lo:hi], norm[lo:hi], u, vocab, top, sharing)
    return LayerSurvey(layer=layer, heads=heads, frequency=frequency_rows(layer, ln.count, norm, move, order, upd),
                       top_rows=top_rows, norm=norm, movement=move, count=ln.count, order=order)


def _gather(run: LoadedRun, table: TableRows, layer: int, idx: np.ndarray, block_rows: int):
    """Rows ``idx`` (sorted) of a layer: (trained (k, D), movement (k, D)), read block by block."""
    xs, ds = [], []
    for blk in np.unique(idx // block_rows):
        a = int(blk) * block_rows
        sel = idx[(idx >= a) & (idx < a + block_rows)] - a
        b = a + int(sel.max()) + 1
        w = table.read(layer, a, b)[sel]
        xs.append(w)
        ds.append(w - initial_rows(run, layer, slice(a, b))[sel])
    if not xs:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
    return np.concatenate(xs), np.concatenate(ds)


def _top_rows(ln: LayerNgrams, head: int, move: np.ndarray, norm: np.ndarray, upd: np.ndarray, vocab: VocabMap,
              top: int, sharing: int) -> list[dict[str, Any]]:
    """The ``top`` rows of a head that moved most, with the n-grams hashed there."""
    h = ln.heads[head]
    slots = [int(s) for s in np.argsort(-move, kind="stable")[:top] if move[s] > 0]
    found = ln.ngrams_at(head, slots, sharing)
    out = []
    for rank, s in enumerate(slots, start=1):
        ids, cnt, k = found[s]
        out.append({"layer": ln.layer, "head": head, "n": h.n, "rank": rank, "slot": s, "row": h.offset + s,
                    "movement": float(move[s]), "norm": float(norm[s]), "updated": bool(upd[s]),
                    "load": k, "count": int(ln.count[h.offset + s]), "ngrams": ngram_records(ids, cnt, vocab)})
    return out


def frequency_rows(layer: int, count: np.ndarray, norm: np.ndarray, move: np.ndarray, order: np.ndarray,
                   upd: np.ndarray) -> list[dict[str, Any]]:
    """Rows binned per order by their summed corpus count: rows, updated share, mean/median norm and movement."""
    bins = count_bin(count)
    out = []
    for n in np.unique(order):
        on = order == n
        for b in np.unique(bins[on]):
            m = on & (bins == b)
            out.append({"layer": layer, "n": int(n), "bin": int(b), "count_range": bin_label(int(b)),
                        "rows": int(m.sum()), "updated_share": float(upd[m].mean()),
                        "norm_mean": float(norm[m].mean()), "norm_median": float(np.median(norm[m])),
                        "movement_mean": float(move[m].mean()), "movement_median": float(np.median(move[m]))})
    return out
