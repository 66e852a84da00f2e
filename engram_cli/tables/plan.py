"""The Engram table plan: the layers, N-gram orders and hash heads, the multipliers and the prime
table sizes, made (:func:`make_plan`), re-made (:func:`replan`) and read back from its JSON file
(every field checked). :mod:`engram_cli.tables.hashing` hashes token ids with a plan.

Everything here follows the reference Engram implementation (DeepSeek, "Conditional Memory via
Scalable Lookup", arXiv 2601.07372, Section 2.2) bit for bit, so a plan made here addresses the
same slots as DeepSeek's code for the same vocabulary and settings:

* multipliers: per layer L, ``np.random.default_rng(seed + 10007 * L)`` draws ``max_n`` int64
  values r in [0, half_bound) with ``half_bound = max(1, (2**63 - 1) // V // 2)``; the layer's
  multipliers are ``2 r + 1`` (odd, and small enough that ``id * m`` never overflows for a valid
  canonical id);
* prime sizes: layer by layer, order by order, each head takes the smallest prime above the
  previous head's prime (the first head: above target - 1) that no head of the plan has taken yet.

Reading a plan's JSON checks every field before a :class:`TablePlan` is made from it (format and
version, keys, integer ranges, the boundary fields, one odd multiplier per position, distinct primes
at least the targets); everything wrong raises one ArtifactError that names the file and says how
to recreate it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engram_cli.core.artifacts import atomic_write_json, read_json
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.tables.boundary import BOUNDARY_RULES, DEFAULT_BOUNDARY

PLAN_FORMAT = "engram.table_plan"
PLAN_FILE = "table_plan.json"  # the plan's file name in a tables artifact, a run and a checkpoint
PLAN_VERSION = 1

MAX_LONG = 2**63 - 1      # np.iinfo(np.int64).max, the reference's bound for id * multiplier
LAYER_SEED_STRIDE = 10007  # the reference's per-layer seed offset: seed + 10007 * layer_id
MAX_TARGET_SIZE = 2**40    # far beyond any table that fits in memory; keeps prime search sane
MAX_EMBED_DIM_PER_HEAD = 2**20  # values in one table row: far beyond any model (the reference: 64, V4: 256)

#: storage types of table rows that memory figures are given in: name -> (bytes per value,
#: values per one-byte scale or 0 for none). "fp8-e4m3-ue8m0" is DeepSeek V4.1-Flash's: fp8 e4m3
#: values with one ue8m0 (power-of-two) scale per 32 values, 264 bytes per 256-dim row.
TABLE_DTYPES: dict[str, tuple[int, int]] = {"fp32": (4, 0), "bf16": (2, 0), "fp8": (1, 0),
                                           "fp8-e4m3-ue8m0": (1, 32)}


# -----------------------------------------------------------------------------
# plan construction


def make_multipliers(canonical_vocab_size: int, layer_ids: tuple[int, ...] | list[int],
                     max_ngram_size: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Per-layer odd hash multipliers, exactly as the reference Engram draws them.

    For layer L: ``r = default_rng(seed + 10007 * L).integers(0, half_bound, size=max_ngram_size,
    dtype=int64)`` with ``half_bound = max(1, ((2**63 - 1) // V) // 2)``, multipliers ``2 r + 1``.
    Multiplier k multiplies the token k positions back (k = 0 is the current token).

    Returns ``{layer_id: (m_0, ..., m_{max_n-1})}`` as Python ints.
    """
    if canonical_vocab_size < 1:
        raise ConfigError(f"canonical vocabulary size must be positive, got {canonical_vocab_size}")
    m_max = MAX_LONG // int(canonical_vocab_size)
    half_bound = max(1, m_max // 2)
    out: dict[int, tuple[int, ...]] = {}
    for layer in layer_ids:
        rng = np.random.default_rng(int(seed) + LAYER_SEED_STRIDE * int(layer))
        r = rng.integers(low=0, high=half_bound, size=int(max_ngram_size), dtype=np.int64)
        out[int(layer)] = tuple(int(v) * 2 + 1 for v in r)
    return out


#: Miller-Rabin with these bases is exact for every n below 3.3e24 (Sorenson & Webster 2015),
#: far above MAX_LONG; sympy (imported in 0.5-1 s) is the reference the tests compare with.
_PRIME_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (deterministic Miller-Rabin, exact below 3.3e24)."""
    if n < 2:
        return False
    for p in _PRIME_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _PRIME_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int) -> int:
    """The smallest prime above ``n`` (``sympy.nextprime``'s contract)."""
    p = max(int(n) + 1, 2)
    if p > 2 and p % 2 == 0:
        p += 1
    while not is_prime(p):
        p += 2
    return p


def make_primes(layer_ids: tuple[int, ...] | list[int], max_ngram_size: int, n_head_per_ngram: int,
                target_sizes: tuple[int, ...] | list[int]) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Prime table sizes per layer, order and head, no prime used twice in the whole plan.

    Layers in the given order, orders n = 2..max_n, heads 0..H-1: the search starts at
    ``target_sizes[n-2] - 1`` and each head takes the smallest prime strictly above the current
    start that is not taken yet; the next head starts from that prime (the reference's rule).

    Returns ``{layer_id: ((p per head for n=2), (p per head for n=3), ...)}``.
    """
    if len(target_sizes) != max_ngram_size - 1:
        raise ConfigError(f"need one target size per order n=2..{max_ngram_size} "
                          f"({max_ngram_size - 1}), got {len(target_sizes)}")
    seen: set[int] = set()
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer in layer_ids:
        per_order = []
        for target in target_sizes:
            start = int(target) - 1
            heads = []
            for _ in range(n_head_per_ngram):
                p = next_prime(start)
                while p in seen:
                    p = next_prime(p)
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(tuple(heads))
        out[int(layer)] = tuple(per_order)
    return out


@dataclass(frozen=True)
class TablePlan:
    """Everything that fixes which table slot an N-gram maps to, and how big the tables are.

    A plan is pure data: save it next to the tables (``save``/``load``, JSON) so that the model and
    every analysis hash exactly as the tables were built. Make one with :func:`make_plan`.
    """

    seed: int                  # base seed of the multipliers (reference default 0)
    max_ngram_size: int        # largest order N; orders 2..N are hashed (reference default 3)
    n_head_per_ngram: int      # hash heads (separate tables) per order (reference default 8)
    layer_ids: tuple[int, ...]  # transformer layers that hold an Engram module (reference (1, 15))
    pad_id: int                # ORIGINAL tokenizer id read before the start of a sequence (reference 2)
    canonical_pad_id: int      # pad_id mapped through the vocab map: what the hash actually reads
    canonical_vocab_size: int  # V: number of canonical ids; bounds the multipliers
    original_vocab_size: int   # tokenizer vocabulary size; default targets are 5x this (reference)
    target_sizes: tuple[int, ...]  # requested slots per head, one per order n=2..N (primes are >= these)
    multipliers: dict[int, tuple[int, ...]]  # layer id -> N odd multipliers (m_k for the token k back)
    primes: dict[int, tuple[tuple[int, ...], ...]]  # layer id -> per order (n=2 first) -> head sizes
    embed_dim_per_head: int = 64  # row width of each head's table: d_mem / n_head_per_ngram (demo: 512 / 8)
    preset: str | None = field(default=None, compare=False)  # the published configuration it follows, if any
    # every head's table has exactly one row (size 1, not a prime): every n-gram of an order shares
    # it, so the tables memorize nothing. The capacity-1 control of ``engram sweep memory --slots 1``
    single_row: bool = False
    # what N-grams at a document's start read (engram_cli.tables.boundary): "pad-start" (the reference:
    # straight across the separator) or "document" (restart after it); the separator is the
    # ORIGINAL id appended after every document, None in plans from before the rule existed
    # (their counts stop at document ends and include no separator)
    boundary: str = DEFAULT_BOUNDARY
    separator_id: int | None = None
    canonical_separator_id: int | None = None

    def __hash__(self) -> int:  # the dict fields are unhashable; hash their frozen contents
        return hash((self.seed, self.max_ngram_size, self.n_head_per_ngram, self.layer_ids, self.pad_id,
                     self.canonical_pad_id, self.canonical_vocab_size, self.original_vocab_size,
                     self.target_sizes, tuple(sorted(self.multipliers.items())),
                     tuple(sorted(self.primes.items())), self.embed_dim_per_head, self.single_row,
                     self.boundary, self.separator_id, self.canonical_separator_id))

    @property
    def restarts(self) -> bool:
        """True when hashing restarts after every separator (the document rule)."""
        return self.boundary == "document"

    def boundary_dict(self) -> dict[str, Any]:
        """The boundary fields as written in the plan (empty for a plan without a separator)."""
        if self.separator_id is None:
            return {}
        return {"boundary": self.boundary, "separator_id": self.separator_id,
                "canonical_separator_id": self.canonical_separator_id}

    # ---- shape figures

    @property
    def n_orders(self) -> int:
        """Number of hashed orders (n = 2..max_ngram_size)."""
        return self.max_ngram_size - 1

    @property
    def total_heads(self) -> int:
        """Heads per layer over all orders: the last dim of :func:`hash_ngrams`'s output."""
        return self.n_orders * self.n_head_per_ngram

    def checked_layer(self, layer_id: int) -> int:
        """``layer_id`` itself, once checked to be an Engram layer of this plan (ConfigError if not)."""
        if layer_id not in self.primes:
            raise ConfigError(f"layer {layer_id} has no Engram table in this plan "
                              f"(Engram layers: {', '.join(map(str, self.layer_ids))})")
        return layer_id

    def head_sizes(self, layer_id: int) -> list[int]:
        """Prime sizes of the layer's heads, flat in output order (order 2's heads first)."""
        return [p for order in self.primes[self.checked_layer(layer_id)] for p in order]

    def head_offsets(self, layer_id: int) -> list[int]:
        """Start row of each head in one concatenated table of the layer: [0, p0, p0+p1, ...]."""
        sizes = self.head_sizes(layer_id)
        return [0] + list(np.cumsum(sizes[:-1], dtype=np.int64).tolist())

    def total_slots(self, layer_id: int) -> int:
        """Rows of the layer's concatenated table (sum of its head sizes)."""
        return sum(self.head_sizes(layer_id))

    @property
    def total_slots_all(self) -> int:
        """Rows over all layers' tables."""
        return sum(self.total_slots(layer) for layer in self.layer_ids)

    def memory_bytes(self, dtype: str = "bf16") -> int:
        """Bytes the tables of all layers take: total slots x :func:`row_bytes`."""
        return self.total_slots_all * row_bytes(dtype, self.embed_dim_per_head)

    # ---- serialization

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``format`` and ``format_version`` come first. Layer keys become strings."""
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_VERSION,
            "seed": self.seed,
            "max_ngram_size": self.max_ngram_size,
            "n_head_per_ngram": self.n_head_per_ngram,
            "layer_ids": list(self.layer_ids),
            "pad_id": self.pad_id,
            "canonical_pad_id": self.canonical_pad_id,
            "canonical_vocab_size": self.canonical_vocab_size,
            "original_vocab_size": self.original_vocab_size,
            "target_sizes": list(self.target_sizes),
            "embed_dim_per_head": self.embed_dim_per_head,
            "multipliers": {str(k): list(v) for k, v in self.multipliers.items()},
            "primes": {str(k): [list(o) for o in v] for k, v in self.primes.items()},
            **({"preset": self.preset} if self.preset is not None else {}),
            **({"single_row": True} if self.single_row else {}),  # absent otherwise: older plans keep their sha256
            **self.boundary_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TablePlan:
        """Rebuild a plan from :meth:`to_dict` output, checking everything (raises ArtifactError)."""
        return plan_from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (temp file + rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TablePlan:
        """Read and validate a plan written by :meth:`save` (raises ArtifactError)."""
        d = read_json(path, what="table plan", producer="engram build-tables")
        return plan_from_dict(d, source=str(path))


def row_bytes(dtype: str, embed_dim_per_head: int) -> int:
    """Bytes of one table row of ``embed_dim_per_head`` values stored as ``dtype`` (a key of
    TABLE_DTYPES, scales included); the one check of a storage type's name."""
    if dtype not in TABLE_DTYPES:
        raise ConfigError(f"unknown table dtype {dtype!r}",
                          f"use one of {', '.join(TABLE_DTYPES)}, e.g. --dtype bf16")
    value_bytes, per_scale = TABLE_DTYPES[dtype]
    scales = -(-embed_dim_per_head // per_scale) if per_scale else 0
    return embed_dim_per_head * value_bytes + scales


def make_plan(*, canonical_vocab_size: int, canonical_pad_id: int, original_vocab_size: int,
              pad_id: int = 2, layer_ids: tuple[int, ...] | list[int] = (1, 15), max_ngram_size: int = 3,
              n_head_per_ngram: int = 8, target_sizes: tuple[int, ...] | list[int] | None = None,
              seed: int = 0, embed_dim_per_head: int = 64, preset: str | None = None,
              single_row: bool = False, boundary: str = DEFAULT_BOUNDARY, separator_id: int | None = None,
              canonical_separator_id: int | None = None) -> TablePlan:
    """Build a :class:`TablePlan` (defaults = the reference Engram configuration).

    ``canonical_pad_id`` is ``vocab_map[pad_id]``: the caller maps it, this module knows no vocab.
    ``target_sizes`` defaults to ``5 * original_vocab_size`` for every order (the reference's
    ``engram_vocab_size``). ``single_row`` gives every head a table of exactly one row instead of
    a prime (target sizes must be 1): the capacity-1 control. Without it the smallest tables are
    the primes 2, 3, 5, 7, ... (no prime twice), which together still tell many n-grams apart.
    ``boundary`` is the document-boundary rule (``engram_cli.tables.boundary``); ``separator_id`` the
    original id after every document and ``canonical_separator_id`` its canonical id (both needed
    by the ``document`` rule). Raises ConfigError for impossible values.
    """
    def need(cond: bool, msg: str, hint: str = "see `engram build-tables --help` for the plan's options") -> None:
        if not cond:
            raise ConfigError(msg, hint)

    need(canonical_vocab_size >= 1, f"canonical vocabulary size must be positive, got {canonical_vocab_size}")
    need(original_vocab_size >= 1, f"original vocabulary size must be positive, got {original_vocab_size}")
    need(0 <= canonical_pad_id < canonical_vocab_size,
         f"canonical pad id {canonical_pad_id} is outside [0, {canonical_vocab_size})")
    need(0 <= pad_id < original_vocab_size, f"pad id {pad_id} is outside [0, {original_vocab_size})")
    need(max_ngram_size >= 2, f"max N-gram size must be at least 2, got {max_ngram_size}")
    need(n_head_per_ngram >= 1, f"heads per N-gram order must be at least 1, got {n_head_per_ngram}")
    need(1 <= embed_dim_per_head <= MAX_EMBED_DIM_PER_HEAD,
         f"embedding dims per head must be in [1, {MAX_EMBED_DIM_PER_HEAD:,}], got {embed_dim_per_head}",
         "e.g. --embed-dim-per-head 64 (the reference's 512 / 8 heads)")
    layer_ids = tuple(int(x) for x in layer_ids)
    need(len(layer_ids) > 0, "no Engram layers given", "pass at least one layer id")
    need(len(set(layer_ids)) == len(layer_ids), f"layer ids repeat: {list(layer_ids)}",
         f"list each layer once, e.g. --layers {','.join(str(x) for x in sorted(set(layer_ids)))}")
    need(all(x >= 0 for x in layer_ids), f"layer ids must be non-negative: {list(layer_ids)}",
         "Engram layers are block indices 0..n_layer-1, e.g. --layers 1,15")
    need(0 <= seed < 2**63, f"seed must be in [0, 2^63), got {seed}", "e.g. --seed 0 (the reference)")
    need(boundary in BOUNDARY_RULES, f"unknown boundary rule {boundary!r}",
         f"use one of {', '.join(BOUNDARY_RULES)} (default {DEFAULT_BOUNDARY}, the reference's)")
    need((separator_id is None) == (canonical_separator_id is None),
         "a separator needs both its original and its canonical id", "pass separator_id and canonical_separator_id")
    need(separator_id is not None or boundary == DEFAULT_BOUNDARY,
         f"the {boundary} rule needs the document separator", "pass separator_id (the tokenizer's EOS id)")
    need(separator_id is None or (0 <= separator_id < original_vocab_size
                                  and 0 <= canonical_separator_id < canonical_vocab_size),
         f"separator id {separator_id} / canonical {canonical_separator_id} is outside the vocabularies")
    n_orders = max_ngram_size - 1
    if target_sizes is None:
        target_sizes = (5 * original_vocab_size,) * n_orders
    target_sizes = tuple(int(x) for x in target_sizes)
    need(len(target_sizes) == n_orders,
         f"need {n_orders} target sizes (orders 2..{max_ngram_size}), got {len(target_sizes)}")
    need(all(1 <= t <= MAX_TARGET_SIZE for t in target_sizes),
         f"target table sizes must be in [1, 2^40], got {list(target_sizes)}",
         "size the tables with --target-size, --target-collision-rate or --memory-budget")
    need(not single_row or all(t == 1 for t in target_sizes),
         f"a single-row plan has target size 1 for every order, got {list(target_sizes)}",
         "drop single_row, or use target size 1")

    primes = (dict.fromkeys(layer_ids, ((1,) * n_head_per_ngram,) * n_orders) if single_row
              else make_primes(layer_ids, max_ngram_size, n_head_per_ngram, target_sizes))
    return TablePlan(
        seed=int(seed), max_ngram_size=int(max_ngram_size), n_head_per_ngram=int(n_head_per_ngram),
        layer_ids=layer_ids, pad_id=int(pad_id), canonical_pad_id=int(canonical_pad_id),
        canonical_vocab_size=int(canonical_vocab_size), original_vocab_size=int(original_vocab_size),
        target_sizes=target_sizes,
        multipliers=make_multipliers(canonical_vocab_size, layer_ids, max_ngram_size, seed),
        primes=primes, embed_dim_per_head=int(embed_dim_per_head), preset=preset, single_row=bool(single_row),
        boundary=boundary, separator_id=None if separator_id is None else int(separator_id),
        canonical_separator_id=None if canonical_separator_id is None else int(canonical_separator_id),
    )


def vocab_fields(template: TablePlan) -> dict[str, Any]:
    """The :func:`make_plan` arguments a derived plan keeps from its template: the vocabulary
    (sizes, pad and separator ids) and the boundary rule, so it hashes the same keys the same way."""
    return {"canonical_vocab_size": template.canonical_vocab_size, "canonical_pad_id": template.canonical_pad_id,
            "original_vocab_size": template.original_vocab_size, "pad_id": template.pad_id,
            "boundary": template.boundary, "separator_id": template.separator_id,
            "canonical_separator_id": template.canonical_separator_id}


#: the plan options :func:`replan` can change (the ``[plan]`` settings of ``engram train``)
REPLAN_KEYS = ("n_head_per_ngram", "max_ngram_size", "layer_ids", "embed_dim_per_head", "target_size", "single_row")


def replan(template: TablePlan, *, n_head_per_ngram: int | None = None, max_ngram_size: int | None = None,
           layer_ids: tuple[int, ...] | list[int] | None = None, embed_dim_per_head: int | None = None,
           target_size: int | None = None, single_row: bool = False) -> TablePlan:
    """``template`` re-planned with some of its options changed (None: the template's).

    The vocabulary (sizes, pad ids) and the seed are always the template's, so the new plan hashes
    the same canonical ids. ``target_size`` sets every order's target slots per head; without it the
    template's targets are kept, or, when ``max_ngram_size`` changes the number of orders, its first
    order's target for every order. ``single_row`` makes the capacity-1 control (target size 1).
    """
    max_n = max_ngram_size if max_ngram_size is not None else template.max_ngram_size
    if target_size is not None or single_row:
        targets = ((1 if target_size is None else int(target_size)),) * (max_n - 1)
    elif max_n == template.max_ngram_size:
        targets = template.target_sizes
    else:
        targets = (template.target_sizes[0],) * (max_n - 1)
    pick = lambda new, old: old if new is None else new  # noqa: E731
    return make_plan(**vocab_fields(template), layer_ids=pick(layer_ids, template.layer_ids), max_ngram_size=max_n,
                     n_head_per_ngram=pick(n_head_per_ngram, template.n_head_per_ngram), target_sizes=targets,
                     seed=template.seed, embed_dim_per_head=pick(embed_dim_per_head, template.embed_dim_per_head),
                     single_row=single_row)


# -----------------------------------------------------------------------------
# the plan file
_PLAN_KEYS = ("format", "format_version", "seed", "max_ngram_size", "n_head_per_ngram", "layer_ids",
              "pad_id", "canonical_pad_id", "canonical_vocab_size", "original_vocab_size",
              "target_sizes", "embed_dim_per_head", "multipliers", "primes")


_BOUNDARY_KEYS = ("boundary", "separator_id", "canonical_separator_id")


class _PlanDoc:
    """Reads a plan's JSON dict, every check raising one ArtifactError that names the file."""

    def __init__(self, d: Any, source: str):
        self.d, self.source = d, source

    def bad(self, msg: str) -> ArtifactError:
        return ArtifactError(f"{self.source}: {msg}", "recreate it with `engram build-tables --force`")

    @staticmethod
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def int_list(self, v: Any, what: str) -> list[int]:
        if not isinstance(v, list) or not all(self.is_int(x) for x in v):
            raise self.bad(f"{what} must be a list of integers")
        return v

    def header(self) -> tuple[list[int], list[int], bool]:
        """Format, keys, scalar fields; returns (layer ids, target sizes, single_row)."""
        d, bad = self.d, self.bad
        if not isinstance(d, dict):
            raise bad("expected a JSON object")
        if "preset" in d and not isinstance(d["preset"], str):
            raise bad(f"preset must be a name, got {d['preset']!r}")
        single_row = d.get("single_row", False)
        if single_row is not False and single_row is not True:
            raise bad(f"single_row must be true or false, got {single_row!r}")
        if d.get("format") != PLAN_FORMAT:
            raise bad(f"format is {d.get('format')!r}, expected {PLAN_FORMAT!r}")
        if d.get("format_version") != PLAN_VERSION:
            raise bad(f"format version {d.get('format_version')!r}, this engram reads {PLAN_VERSION}")
        missing = [k for k in _PLAN_KEYS if k not in d]
        if missing:
            raise bad(f"missing keys: {', '.join(missing)}")
        unknown = sorted(set(d) - set(_PLAN_KEYS) - {"preset", "single_row", *_BOUNDARY_KEYS})
        if unknown:
            raise bad(f"unknown keys: {', '.join(unknown)}")
        for k in ("seed", "max_ngram_size", "n_head_per_ngram", "pad_id", "canonical_pad_id",
                  "canonical_vocab_size", "original_vocab_size", "embed_dim_per_head"):
            if not self.is_int(d[k]):
                raise bad(f"{k} must be an integer, got {d[k]!r}")
        max_n, vsize = d["max_ngram_size"], d["canonical_vocab_size"]
        if max_n < 2 or d["n_head_per_ngram"] < 1 or vsize < 1 or d["original_vocab_size"] < 1 \
                or not 1 <= d["embed_dim_per_head"] <= MAX_EMBED_DIM_PER_HEAD:
            raise bad("max_ngram_size >= 2, n_head_per_ngram and vocabulary sizes >= 1, "
                      f"embed_dim_per_head in [1, {MAX_EMBED_DIM_PER_HEAD}] required")
        if not 0 <= d["canonical_pad_id"] < vsize:
            raise bad(f"canonical_pad_id {d['canonical_pad_id']} is outside [0, {vsize})")
        self.check_boundary()
        layers = self.int_list(d["layer_ids"], "layer_ids")
        if not layers or len(set(layers)) != len(layers):
            raise bad("layer_ids must be a non-empty list of distinct integers")
        targets = self.int_list(d["target_sizes"], "target_sizes")
        if len(targets) != max_n - 1 or any(t < 1 for t in targets):
            raise bad(f"target_sizes must hold {max_n - 1} positive integers (one per order)")
        if single_row and any(t != 1 for t in targets):
            raise bad("a single_row plan has target size 1 for every order")
        for k in ("multipliers", "primes"):
            if not isinstance(d[k], dict) or sorted(d[k]) != sorted(str(x) for x in layers):
                raise bad(f"{k} must have one entry per layer id {layers}")
        return layers, targets, single_row

    def check_boundary(self) -> None:
        """The boundary fields: all three or none (a plan from before the rule)."""
        d, bad = self.d, self.bad
        present = [k for k in _BOUNDARY_KEYS if k in d]
        if not present:
            return
        if len(present) != len(_BOUNDARY_KEYS):
            raise bad(f"boundary fields {', '.join(_BOUNDARY_KEYS)} must be given together")
        if d["boundary"] not in BOUNDARY_RULES:
            raise bad(f"boundary {d['boundary']!r} is not one of {', '.join(BOUNDARY_RULES)}")
        for k, size in (("separator_id", d["original_vocab_size"]), ("canonical_separator_id", d["canonical_vocab_size"])):
            if not self.is_int(d[k]) or not 0 <= d[k] < size:
                raise bad(f"{k} must be an id in [0, {size}), got {d[k]!r}")

    def layer(self, layer: int, targets: list[int], single_row: bool, seen: set[int]):
        """One layer's multipliers and head sizes (distinct primes >= the targets; 1 if single_row)."""
        d, bad, max_n, heads = self.d, self.bad, self.d["max_ngram_size"], self.d["n_head_per_ngram"]
        m = self.int_list(d["multipliers"][str(layer)], f"multipliers of layer {layer}")
        if len(m) != max_n or any(x <= 0 or x % 2 == 0 or x > MAX_LONG for x in m):
            raise bad(f"multipliers of layer {layer} must be {max_n} odd positive int64 values")
        orders = d["primes"][str(layer)]
        if not isinstance(orders, list) or len(orders) != max_n - 1:
            raise bad(f"primes of layer {layer} must hold {max_n - 1} lists (one per order)")
        per_order = []
        for n, (order, target) in enumerate(zip(orders, targets), start=2):
            ps = self.int_list(order, f"primes of layer {layer}, order {n}")
            if len(ps) != heads:
                raise bad(f"layer {layer}, order {n} has {len(ps)} head sizes, expected {heads}")
            for p in ps:
                if single_row:
                    if p != 1:
                        raise bad(f"head size {p} (layer {layer}, order {n}) of a single_row plan is not 1")
                    continue
                if p < target or p > MAX_LONG or not is_prime(p):
                    raise bad(f"head size {p} (layer {layer}, order {n}) is not a prime >= target {target}")
                if p in seen:
                    raise bad(f"head size {p} is used twice; every head needs its own prime")
                seen.add(p)
            per_order.append(tuple(ps))
        return tuple(m), tuple(per_order)


def plan_from_dict(d: Any, source: str = "table plan") -> TablePlan:
    """A :class:`TablePlan` from its JSON dict, every field checked (one ArtifactError naming ``source``)."""
    doc = _PlanDoc(d, source)
    layers, targets, single_row = doc.header()
    seen: set[int] = set()
    tables = {layer: doc.layer(layer, targets, single_row, seen) for layer in layers}
    return TablePlan(seed=d["seed"], max_ngram_size=d["max_ngram_size"], n_head_per_ngram=d["n_head_per_ngram"],
                     layer_ids=tuple(layers), pad_id=d["pad_id"], canonical_pad_id=d["canonical_pad_id"],
                     canonical_vocab_size=d["canonical_vocab_size"], original_vocab_size=d["original_vocab_size"],
                     target_sizes=tuple(targets), multipliers={k: v[0] for k, v in tables.items()},
                     primes={k: v[1] for k, v in tables.items()}, embed_dim_per_head=d["embed_dim_per_head"],
                     preset=d["preset"] if isinstance(d.get("preset"), str) else None, single_row=single_row,
                     boundary=d.get("boundary", DEFAULT_BOUNDARY), separator_id=d.get("separator_id"),
                     canonical_separator_id=d.get("canonical_separator_id"))

