"""Uniform-hashing predictions and table sizing: what random hashing would give, the table
sizes that reach a target collision rate or fit a memory budget, and what the tables take in
training (rows and optimizer state, float32) next to the RAM this machine has — whether they
should live on disk (``engram train --table-store mmap``).

The measured collision figures (``engram_cli.tables.collisions``) are reported beside these predictions;
``engram build-tables --target-collision-rate`` and ``--memory-budget`` size plans with them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from engram_cli.core.errors import ConfigError
from engram_cli.tables.plan import MAX_TARGET_SIZE, TablePlan, next_prime, row_bytes


def expected_colliding_share(n_keys: int, n_slots: int) -> float:
    """Uniform hashing: expected share of k keys that share their slot with another key.

    A given key is alone when the other k-1 keys all miss its slot: 1 - (1 - 1/m)^(k-1).
    """
    if n_keys <= 1:
        return 0.0
    return -math.expm1((n_keys - 1) * math.log1p(-1.0 / n_slots)) if n_slots > 1 else 1.0


def target_size_for_collision_rate(n_keys: int, rate: float) -> int:
    """Smallest per-head table size m whose expected colliding share for n_keys keys is <= rate.

    Inverts ``1 - (1 - 1/m)^(k-1) = rate``: ``m = 1 / (1 - (1 - rate)^(1/(k-1)))``, rounded up
    (about ``k / rate`` for small rates). Use the number of distinct N-grams of one order as k.
    """
    if n_keys < 0:
        raise ConfigError(f"number of keys must be non-negative, got {n_keys}")
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"collision rate must be in (0, 1), got {rate}")
    if n_keys <= 1:
        return 1
    # 1 - (1-rate)^(1/(k-1)) computed without cancellation
    per_slot = -math.expm1(math.log1p(-rate) / (n_keys - 1))
    m = max(1, math.ceil(1.0 / per_slot))
    # float rounding can leave m one off the true smallest size: settle it exactly
    while m > 1 and expected_colliding_share(n_keys, m - 1) <= rate:
        m -= 1
    while expected_colliding_share(n_keys, m) > rate:
        m += 1
    return m


def target_size_for_memory_budget(budget_bytes: int, *, n_layers: int, n_orders: int, n_heads: int,
                                  embed_dim_per_head: int, dtype: str = "bf16") -> int:
    """Largest per-head target size whose plan fits in ``budget_bytes``.

    The naive answer is budget / (layers x orders x heads x dims x bytes); primes round every head
    up (and no prime repeats), so this returns the largest m for which the primes a plan would
    actually pick (same target for every order) fit: ``make_plan(target_sizes=(m,) * n_orders, ...)
    .memory_bytes(dtype) <= budget_bytes``. Raises ConfigError when even the smallest plan
    (target 1: primes 2, 3, 5, ...) does not fit.
    """
    for name, v in (("n_layers", n_layers), ("n_orders", n_orders), ("n_heads", n_heads),
                    ("embed_dim_per_head", embed_dim_per_head)):
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}")
    row = row_bytes(dtype, embed_dim_per_head)
    n_tables = n_layers * n_orders * n_heads

    def plan_bytes(m: int) -> int:
        # all orders share the target, so the plan takes the first n_tables primes >= m
        total, p = 0, m - 1
        for _ in range(n_tables):
            p = next_prime(p)
            total += p
        return total * row

    if budget_bytes < plan_bytes(1):
        raise ConfigError(
            f"a memory budget of {budget_bytes} bytes is too small for {n_tables} tables of "
            f"{row}-byte rows", f"give at least {plan_bytes(1)} bytes")
    # plan_bytes grows with m and plan_bytes(m) >= n_tables * m * row: bisect below that bound
    lo, hi = 1, min(MAX_TARGET_SIZE, budget_bytes // (n_tables * row))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_bytes(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def expected_occupied(n_keys: int, n_slots: int) -> float:
    """Expected occupied slots when k keys fall uniformly into m slots: m (1 - (1 - 1/m)^k)."""
    if n_keys <= 0:
        return 0.0
    if n_slots == 1:
        return 1.0
    return -n_slots * math.expm1(n_keys * math.log1p(-1.0 / n_slots))


def expected_max_load(n_keys: int, n_slots: int) -> float:
    """Approximate expected largest slot load for k keys in m slots under uniform hashing.

    Treats the m loads as independent Poisson(k/m) variables (the Poisson approximation of
    occupancy): E[max] = sum_{L>=1} P(max >= L) ~ sum_{L>=1} 1 - (1 - P[X >= L])^m. Accurate to a
    few percent when m is large; exact figures for tiny tables are not the use case.
    """
    if n_keys <= 0:
        return 0.0
    if n_slots == 1:
        return float(n_keys)
    lam = n_keys / n_slots
    # P[X >= L] is ~1 below the window and ~0 above it: only loads within it need the pmf
    lo = max(1, int(lam - 12 * math.sqrt(lam) - 40))
    hi = int(lam + 12 * math.sqrt(lam) + 40)
    i = np.arange(lo, hi + 1, dtype=np.float64)
    log_pmf = -lam + i * math.log(lam) - np.array([math.lgamma(x + 1) for x in i])
    tail = np.cumsum(np.exp(log_pmf)[::-1])[::-1]             # P[X >= L] for L = lo..hi, small terms first
    q = np.clip(tail, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        p_max_ge = -np.expm1(n_slots * np.log1p(-q))            # P(max >= L) = 1 - (1 - q)^m
    p_max_ge = np.where(q >= 1.0, 1.0, p_max_ge)
    return float((lo - 1) + np.sum(p_max_ge))                 # loads 1..lo-1 are reached surely


def expected_indistinguishable_share(n_keys: int, n_slots: list[int] | tuple[int, ...]) -> float:
    """Expected share of keys that share every head's slot with one same other key.

    A given other key matches in all heads with probability prod_j 1/m_j, so the share is
    1 - (1 - prod_j 1/m_j)^(k-1).
    """
    if n_keys <= 1:
        return 0.0
    log_p = -sum(math.log(m) for m in n_slots)
    p = math.exp(log_p)
    if p >= 1.0:
        return 1.0
    return -math.expm1((n_keys - 1) * math.log1p(-p))


# ---------------------------------------------------------------------------------------------
# the tables in training: rows and optimizer state, and where they should live

#: float32 values of optimizer row state per table row of ``dim`` values, by ``train.table_optimizer``:
#: the ``state_spec`` of ``engram_cli.train.rowopt``'s optimizers (a test holds the two equal)
TABLE_OPTIMIZER_STATE_FLOATS = {"adam": lambda dim: 2 * dim, "rowwise-adagrad": lambda dim: 1}
#: ``--table-store mmap`` is advised when the tables and their state need more than this share of
#: the RAM available (the rest is for the dense model, activations, the page cache of the store)
MMAP_ADVICE_SHARE = 0.5


def table_train_bytes(plan: TablePlan, table_optimizer: str = "adam") -> dict[str, int]:
    """Bytes of all layers' tables in training, float32: ``rows`` (values), ``state`` (the
    optimizer's row state: Adam 2 x D floats a row, row-wise Adagrad 1) and ``total``."""
    if table_optimizer not in TABLE_OPTIMIZER_STATE_FLOATS:
        raise ConfigError(f"unknown table optimizer {table_optimizer!r}",
                          f"use one of: {', '.join(TABLE_OPTIMIZER_STATE_FLOATS)}")
    rows, dim = plan.total_slots_all, plan.embed_dim_per_head
    values = rows * dim * 4
    state = rows * TABLE_OPTIMIZER_STATE_FLOATS[table_optimizer](dim) * 4
    return {"rows": values, "state": state, "total": values + state}


def ram_available() -> int | None:
    """Bytes of RAM a process can still allocate (MemAvailable of /proc/meminfo); None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def mmap_advised(table_bytes: int, available: int | None) -> bool:
    """Whether tables of ``table_bytes`` (rows + state) should live on disk: more than
    :data:`MMAP_ADVICE_SHARE` of the ``available`` RAM (False when that is unknown)."""
    return available is not None and table_bytes > MMAP_ADVICE_SHARE * available


def table_store_advice(plan: TablePlan, available: int | None = None) -> dict[str, Any]:
    """The tables' training bytes by optimizer, the RAM available on this machine, and whether
    ``--table-store mmap`` is advised (with the default optimizer, ``adam``): the plan reports of
    ``engram build-tables`` show it."""
    by_opt = {name: table_train_bytes(plan, name)["total"] for name in TABLE_OPTIMIZER_STATE_FLOATS}
    return {"train_bytes": by_opt, "ram_available": available,
            "mmap_advised": mmap_advised(by_opt["adam"], available)}
