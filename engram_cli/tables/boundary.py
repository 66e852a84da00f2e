"""Document boundaries: which N-grams a stream of several documents has, one rule for everything.

A corpus reaches the model as one stream, every document followed by the separator (the
tokenizer's end-of-sequence token): ``doc0 [sep] doc1 [sep] ...``. Two rules say what the suffix
N-grams at the start of a document read (``TablePlan.boundary``; ``engram build-tables --boundary``):

* ``pad-start`` (the reference, and the default): the pad id is read only before the first token
  of a sequence; N-grams run straight across the separator into the previous document
  (``"[sep] the"``, ``"end . [sep]"``). The reference Engram demo hashes its input this way.
* ``document``: hashing restarts after every separator, as at the start of a sequence: the first
  tokens of a document read the pad id, never the previous document (later production variants).

In both rules the separator belongs to the document it ends, so it is counted and hashed like a
token. Everything follows the plan's rule: counting (:class:`engram_cli.tables.counting.NgramCounter`),
the collision and hot-row figures computed from those counts, and the model's hashing
(:func:`engram_cli.tables.hashing.hash_ngrams`) in training, ``eval`` and ``inspect-gates``. So the keys
the model hashes over a corpus read as one sequence are exactly the keys build-tables counted
(``tests/test_boundary.py``). A training window is a sequence of its own: its first tokens read
the pad id under both rules, as the reference pads every sequence it is given.

Counting splits a rule's N-grams in two: those inside ``doc + [sep]`` (counted per document,
as always) and those that end in a document's first N-1 tokens but start before it, read from
the previous documents' last tokens (:func:`boundary_ngrams`). The second part needs only each
document's first and last N-1 ids (its *edges*), so sharded counts (``--shard I/N``) keep their
documents' edges and ``--from-shards`` adds the N-grams across every boundary at merge time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engram_cli.core.errors import ConfigError
from engram_cli.vocab.tokenizer import find_eos_id

#: the rules a plan can follow (the first is the reference's and the default)
BOUNDARY_RULES = ("pad-start", "document")
DEFAULT_BOUNDARY = BOUNDARY_RULES[0]


def check_rule(rule: str) -> str:
    """``rule`` if it is a known boundary rule, else one ConfigError naming the choices."""
    if rule not in BOUNDARY_RULES:
        raise ConfigError(f"unknown boundary rule {rule!r}",
                          f"use one of {', '.join(BOUNDARY_RULES)} (default {DEFAULT_BOUNDARY}, the reference's)")
    return rule


@dataclass(frozen=True)
class Boundary:
    """How documents of canonical ids are joined for counting: the rule, the canonical id that
    ends every document and the canonical pad id read before a sequence (or a document's start)."""

    rule: str
    separator: int   # canonical id appended after every document
    pad: int         # canonical pad id

    def __post_init__(self) -> None:
        check_rule(self.rule)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "separator": self.separator, "pad": self.pad}


def check_run_boundary(tables_plan, tok, eos_token: str, tables_dir, run_plan=None) -> None:
    """The run reads documents as the tables counted them: the same separator after every document
    (``data.eos_token``) and, when resuming, the same boundary rule as the run started with."""

    eos = find_eos_id(tok.tokenizer, eos_token)
    if tables_plan.separator_id is not None and eos != tables_plan.separator_id:
        raise ConfigError(f"data.eos_token gives separator id {eos}, but the tables {tables_dir} were counted with "
                          f"separator id {tables_plan.separator_id} after every document",
                          "set data.eos_token to the tables' separator, or rebuild the tables with --eos-token")
    if run_plan is not None and run_plan.boundary != tables_plan.boundary:
        raise ConfigError(f"the run was trained under the {run_plan.boundary} boundary rule, the tables {tables_dir} "
                          f"follow {tables_plan.boundary}",
                          "resume with the tables the run started with, or start over with --force")


# -----------------------------------------------------------------------------
# counting: N-grams that reach back across a document's start


def split_edges(ids: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last ``width`` ids of each document of a concatenated stream.

    ``ids``: [T] the documents one after another, ``lengths``: [D] their lengths (0 allowed).
    Returns ``heads`` [D, width] (left-aligned) and ``tails`` [D, width] (right-aligned); slots
    beyond a short document's length hold 0 and are never read.
    """
    D = lengths.shape[0]
    heads = np.zeros((D, width), dtype=np.int64)
    tails = np.zeros((D, width), dtype=np.int64)
    if D == 0 or width == 0:
        return heads, tails
    starts = np.cumsum(lengths) - lengths
    j = np.arange(width)
    head_ok = j[None, :] < lengths[:, None]                       # (D, width)
    heads[head_ok] = ids[(starts[:, None] + j[None, :])[head_ok]]
    tail_ok = j[None, :] >= (width - lengths)[:, None]
    tails[tail_ok] = ids[(starts[:, None] + lengths[:, None] - width + j[None, :])[tail_ok]]
    return heads, tails


def boundary_ngrams(heads: np.ndarray, tails: np.ndarray, lengths: np.ndarray, max_n: int, *,
                    context: np.ndarray | None, pad: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """N-grams of orders 2..max_n that end in a document but start before it.

    ``heads``/``tails``/``lengths`` describe consecutive documents (:func:`split_edges`, each
    document including its separator; length 0 for a document that is not in the stream).
    ``context``: the ``max_n - 1`` ids of the stream before the first of them (pad-start rule;
    all pads at the start of a corpus), or None for the document rule (every document starts
    after pads). Returns ``({n: int64 [K, n]}, context after the last document)``.
    """
    w = max_n - 1
    D = lengths.shape[0]
    lengths = lengths.astype(np.int64, copy=False)
    if context is None:
        before = np.full((D, w), pad, dtype=np.int64)
        new_context = np.full(w, pad, dtype=np.int64)
    else:
        # the stream's tokens before document i: the context, then each document's last ids
        take = np.minimum(lengths, w)
        j = np.arange(w)
        kept = np.concatenate([np.asarray(context, dtype=np.int64), tails[j[None, :] >= (w - take)[:, None]]])
        starts = w + np.cumsum(take) - take                        # where document i's ids begin in kept
        before = kept[starts[:, None] - w + j[None, :]]            # (D, w)
        new_context = kept[-w:]
    window = np.concatenate([before, heads[:, :w]], axis=1)      # (D, 2w): w ids before, w first ids
    out = {}
    for n in range(2, max_n + 1):
        parts = [window[lengths > j, w + j - n + 1:w + j + 1] for j in range(n - 1)]  # ends at doc position j
        out[n] = np.concatenate(parts) if parts else np.empty((0, n), np.int64)
    return out, new_context


def stream_ngrams_reference(docs: list[np.ndarray], max_n: int, boundary: Boundary) -> dict[int, list[tuple]]:
    """The plain reference of what a rule counts: every suffix N-gram of orders 1..max_n at every
    position of ``doc0 [sep] doc1 [sep] ...`` read as the model reads it (pads before the stream,
    and before every document under the document rule). Empty documents are left out, as in the
    training stream. Slow; tests compare :class:`~engram_cli.tables.counting.NgramCounter` with it."""
    out: dict[int, list[tuple]] = {n: [] for n in range(1, max_n + 1)}
    stream: list[int] = []
    for doc in docs:
        if len(doc) == 0:
            continue
        seq = [int(x) for x in doc] + [boundary.separator]
        if boundary.rule == "document":
            stream = []
        for tok in seq:
            stream.append(tok)
            padded = [boundary.pad] * (max_n - 1) + stream
            for n in range(1, max_n + 1):
                out[n].append(tuple(padded[len(padded) - n:]))
    return out


# -----------------------------------------------------------------------------
# hashing: the document rule restarts the hash after every separator


def document_mask_reference(ids: np.ndarray, separator: int, lag: int) -> np.ndarray:
    """True where the id ``lag`` positions back lies in the same document of the [B, T] ``ids``
    (a separator ends its document); the document rule reads the pad id elsewhere."""
    is_sep = ids == separator
    doc = np.cumsum(is_sep, axis=1) - is_sep                     # separators strictly before t
    T = ids.shape[1]
    back = np.full_like(doc, -1)
    back[:, lag:] = doc[:, :T - lag]
    return back == doc


def restart_after_separators(ids: np.ndarray, out: np.ndarray, separator: int, width: int,
                             hash_rows) -> None:
    """Overwrite the slots of the first ``width`` positions of every document that starts inside
    a [B, T] row of ``ids`` (after a separator) with the slots of that document read on its own.

    ``out`` [B, T, H] holds the slots of the rows hashed whole (pad-start); ``hash_rows`` hashes a
    [S, width] array as S sequences (pads before each). A position is rewritten only up to and
    including its document's own separator; a later document is restarted by its own entry.
    """
    B, T = ids.shape
    rows, cols = np.nonzero(ids[:, :T - 1] == separator)
    if rows.size == 0:
        return
    starts = cols + 1                                             # first position of each new document
    j = np.arange(width)
    pos = starts[:, None] + j[None, :]                            # (S, width)
    inside = pos < T
    window = np.where(inside, ids[rows[:, None], np.minimum(pos, T - 1)], separator)
    ended = np.cumsum(window == separator, axis=1) - (window == separator)  # separators before j
    write = inside & (ended == 0)
    slots = hash_rows(window)                                     # (S, width, H)
    r = np.broadcast_to(rows[:, None], pos.shape)
    out[r[write], pos[write]] = slots[write]


def torch_document_mask(x: Any, separator: int, lag: int) -> Any:
    """:func:`document_mask_reference` in torch ops (any device), for the torch hashing path."""
    import torch.nn.functional as F  # lazy: torch is loaded only where tensors are given; build-tables and normalize-vocab never need it

    is_sep = (x == separator).long()
    doc = is_sep.cumsum(dim=1) - is_sep
    back = F.pad(doc, (lag, 0), value=-1)[:, :x.shape[1]]
    return back == doc


__all__ = ["BOUNDARY_RULES", "DEFAULT_BOUNDARY", "Boundary", "check_rule", "check_run_boundary", "split_edges", "boundary_ngrams",
           "stream_ngrams_reference", "document_mask_reference", "restart_after_separators",
           "torch_document_mask"]
