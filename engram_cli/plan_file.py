"""Reading a table plan's JSON: every field checked before a :class:`~engram_cli.hashing.TablePlan`
is made from it (format and version, keys, integer ranges, the boundary fields, one odd multiplier
per position, distinct primes at least the targets). Everything wrong raises one ArtifactError that
names the file and says how to recreate it.
"""

from __future__ import annotations

from typing import Any

from engram_cli.boundary import BOUNDARY_RULES, DEFAULT_BOUNDARY
from engram_cli.errors import ArtifactError
from engram_cli.hashing import MAX_LONG, PLAN_FORMAT, PLAN_VERSION, TablePlan, is_prime

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
                or d["embed_dim_per_head"] < 1:
            raise bad("max_ngram_size >= 2, n_head_per_ngram, vocabulary sizes and embed_dim_per_head >= 1 required")
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


__all__ = ["plan_from_dict"]
