"""Ask about one n-gram (``--ngram TEXT``) or one row (``--row LAYER:HEAD:SLOT``).

An n-gram is tokenized with the run's tokenizer and canonicalized with its vocab map, as the model
reads text; its slot in every head is :func:`engram_cli.tables.hashing.hash_ngrams` at the last
position (the order-n heads see its last n tokens; orders longer than the text are not formed and
left out). For each slot: the row's norm, its movement from the initial value, whether training
updated it, the other n-grams of the corpus hashed there (with counts), and the memory's logit lens
(:mod:`engram_cli.inspect_tables.lens`) for the whole retrieved memory and per order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram_cli.core.errors import InputError
from engram_cli.inspect_tables.config import RowAddress, parse_row
from engram_cli.inspect_tables.lens import MemoryLens
from engram_cli.inspect_tables.ngrams import LayerNgrams, ngram_records, ngram_text
from engram_cli.inspect_tables.rows import TableRows, initial_rows
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.train.runs import LoadedRun


def row_record(run: LoadedRun, table: TableRows, ln: LayerNgrams, updated: np.ndarray, head: int, slot: int,
               sharing: int) -> tuple[dict[str, Any], np.ndarray]:
    """One row's figures and the n-grams hashed there; and the row itself (D,)."""
    h = ln.heads[head]
    row = h.offset + slot
    w = table.read(ln.layer, row, row + 1)[0]
    w0 = initial_rows(run, ln.layer, slice(row, row + 1))[0]
    ids, cnt, k = ln.ngrams_at(head, [slot], sharing)[slot]
    return {"layer": ln.layer, "head": head, "n": h.n, "order_head": h.order_head, "slot": slot, "row": row,
            "norm": float(np.linalg.norm(w)), "movement": float(np.linalg.norm(w - w0)),
            "updated": bool(updated[row]), "load": k, "count": int(ln.count[row]),
            "ngrams": ngram_records(ids, cnt, run.vocab)}, w


def _lens(lens: MemoryLens, layer: int, memory: np.ndarray, k: int) -> list[dict[str, Any]]:
    return [t.__dict__ for t in lens.top(layer, memory, k)]


def query_ngram(text: str, run: LoadedRun, layers: dict[int, LayerNgrams], updated: dict[int, np.ndarray],
                table: TableRows, lens: MemoryLens, seen: np.ndarray, *, top: int, sharing: int) -> dict[str, Any]:
    """Everything ``--ngram TEXT`` shows, as a JSON-ready dict. ``seen``: the canonical ids the tables'
    corpus has (its 1-grams); a token outside them is unknown."""
    plan = run.plan
    ids = np.asarray(run.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < 2:
        raise InputError(f"--ngram {text!r} is {ids.size} token{'s' if ids.size != 1 else ''}: the tables hold "
                         "n-grams of 2 or more tokens", "pass at least two tokens, e.g. --ngram \"new york\"")
    if ids.size > plan.max_ngram_size:
        raise InputError(f"--ngram {text!r} is {ids.size} tokens, longer than the largest order "
                         f"{plan.max_ngram_size} of the run's tables", f"pass at most {plan.max_ngram_size} tokens")
    canon = np.asarray(run.vocab(ids), dtype=np.int64)
    unknown = ~np.isin(canon, seen)
    if unknown.all():
        raise InputError(f"--ngram {text!r} is made only of unknown tokens: the tables' corpus has none of their "
                         "canonical forms", "pass an n-gram of the corpus the tables were counted on")
    keys = run.vocab.keys()
    orders = list(range(2, ids.size + 1))
    D = plan.embed_dim_per_head
    out: dict[str, Any] = {"ngram": text, "tokens": [run.tokenizer.tokenizer.decode([int(i)]) for i in ids],
                           "ids": ids.tolist(), "canonical_ids": canon.tolist(),
                           "canonical_keys": [keys[int(c)] for c in canon],
                           "unknown_tokens": int(unknown.sum()),
                           "orders": orders, "layers": []}
    for layer, ln in layers.items():
        slots = np.asarray(hash_ngrams(canon, plan, layer))[-1]        # (H,) slots at the last position
        memory = np.zeros(plan.total_heads * D, dtype=np.float32)       # (H*D,) e_t, formed orders only
        heads = []
        for h in ln.heads:
            if h.n not in orders:
                continue
            rec, w = row_record(run, table, ln, updated[layer], h.head, int(slots[h.head]), sharing)
            key = canon[-h.n:]
            rec["own_count"] = _own_count(ln, h.n, key)
            heads.append(rec)
            memory[h.head * D:(h.head + 1) * D] = w
        per_order = {}
        for n in orders:
            part = np.zeros_like(memory)
            sel = [h.head for h in ln.heads if h.n == n]
            for j in sel:
                part[j * D:(j + 1) * D] = memory[j * D:(j + 1) * D]
            per_order[str(n)] = {"ngram": ngram_text(canon[-n:], run.vocab),
                                 "lens": _lens(lens, layer, part, top)}
        out["layers"].append({"layer": layer, "heads": heads, "lens": _lens(lens, layer, memory, top),
                              "lens_by_order": per_order})
    return out


def _own_count(ln: LayerNgrams, n: int, key: np.ndarray) -> int:
    """The corpus count of the n-gram ``key`` (0 when the corpus never has it)."""
    hit = np.flatnonzero((ln.ngrams[n] == key).all(axis=1))
    return int(ln.counts[n][hit[0]]) if hit.size else 0


def check_row(run: LoadedRun, address: RowAddress, layers: dict[int, LayerNgrams]) -> None:
    """Refuse a row outside the run's tables, naming the valid range."""
    if address.layer not in layers:
        raise InputError(f"--row {address}: layer {address.layer} has no Engram table "
                         f"(Engram layers: {', '.join(map(str, run.layer_ids))})", "pass LAYER:HEAD:SLOT of one of them")
    heads = layers[address.layer].heads
    if not 0 <= address.head < len(heads):
        raise InputError(f"--row {address}: head {address.head} is outside the layer's heads 0..{len(heads) - 1}",
                         "pass a head index of the plan (order 2's heads first)")
    size = heads[address.head].size
    if not 0 <= address.slot < size:
        raise InputError(f"--row {address}: slot {address.slot} is outside head {address.head}'s table "
                         f"of {size:,} rows (0..{size - 1:,})", "pass a slot inside the table")


def query_row(text: str, run: LoadedRun, layers: dict[int, LayerNgrams], updated: dict[int, np.ndarray],
              table: TableRows, lens: MemoryLens, *, top: int, sharing: int) -> dict[str, Any]:
    """Everything ``--row LAYER:HEAD:SLOT`` shows: the n-grams there, the row's figures, its logit lens
    (the memory holding this row alone, every other head zero)."""
    address = parse_row(text)
    check_row(run, address, layers)
    ln = layers[address.layer]
    rec, w = row_record(run, table, ln, updated[address.layer], address.head, address.slot, sharing)
    D = run.plan.embed_dim_per_head
    memory = np.zeros(run.plan.total_heads * D, dtype=np.float32)
    memory[address.head * D:(address.head + 1) * D] = w
    return {"address": str(address), **rec, "lens": _lens(lens, address.layer, memory, top)}
