"""The sweep's tables: one row per run, one row per point (mean and spread over the seeds, and
two verdicts against the reference point), and the memory sweep's power-law fit.

Noise is measured, not assumed, in two ways, both reported (named so they cannot be confused):

* the **range verdict** (``range_verdict``): a point's **spread** is the range (max - min) of its
  runs' validation losses over the seeds. A point whose mean differs from the reference's by no
  more than the larger of the two spreads is reported as ``within seed spread``. With one seed
  the spread is unknown and the verdict says so. It ignores that runs are paired, so a seed
  effect shared by every point (a hard data order) hides a consistent difference;
* the **paired verdict** (``paired_verdict``): runs with the same seed draw the same batches and
  the same shared initialization, so they are **paired**. Per seed finished at both points, the
  paired difference ``Δ_s = loss(point, s) - loss(reference, s)``; with n >= 3 pairs whose Δ vary,
  their mean with a 95% Student t-interval (n - 1 degrees of freedom), and the verdict ``lower``
  or ``higher`` when the interval excludes 0, else ``no paired difference``. With fewer pairs (or
  all Δ equal, where a t-interval means nothing) the sign count ``lower on k of n seeds`` decides
  instead, by the exact two-sided sign test at 5% (which needs at least 6 seeds, all one way): with
  fewer, the verdict is ``no paired difference`` and the count is shown beside it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engram_cli.sweep.config import SINGLE_ROW_SLOTS, Point

#: the primary metric: the trainer's validation loss at the last step (nats per token)
METRIC = "val_loss"
WITHIN = "within seed spread"
ONE_SEED = "one seed: spread unknown"
#: the paired verdicts
LOWER, HIGHER, NO_PAIRED_DIFFERENCE = "lower", "higher", "no paired difference"
NO_PAIRS = "no seed finished at both points"
#: two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z95 = 1.959964


def bucket_column(bucket: str) -> str:
    """``engram eval``'s count bucket -> a column name: ``unseen`` -> ``loss_unseen``,
    ``2–9`` -> ``loss_seen_2_9``, ``≥100`` -> ``loss_seen_100plus``."""
    if bucket == "unseen":
        return "loss_unseen"
    return "loss_seen_" + bucket.replace("–", "_").replace("≥", "") + ("plus" if bucket.startswith("≥") else "")


def _value_columns(values: dict[str, Any]) -> dict[str, Any]:
    """A point's swept values as columns (the memory sweep's backbone has no slot count)."""
    return {k: (None if k == "slots" and v == 0 else v) for k, v in values.items()}


def run_rows(records: list[dict], points: list[Point], evaluated: bool) -> list[dict[str, Any]]:
    """One row per run (``runs.parquet``), in the sweep's order."""
    by_point = {p.name: p for p in points}
    rows = []
    for rec in records:
        b, plan, e = rec.get("budget") or {}, rec.get("plan") or {}, rec.get("eval") or {}
        row = {"run": rec["run"], "point": rec["point"], "seed": rec["seed"],
               **_value_columns(by_point[rec["point"]].values), "status": rec.get("status"),
               "total_params": b.get("total"), "activated_params": b.get("activated"),
               "engram_table_params": b.get("engram_tables"), "routed_expert_params": b.get("experts_routed"),
               "moe_num_experts": b.get("moe_num_experts"), "table_rows": plan.get("total_slots"),
               "realized_allocation": b.get("realized_allocation"), "steps": rec.get("steps"),
               "tokens_seen": rec.get("tokens_seen"), "train_loss": rec.get("train_loss"),
               "val_loss": rec.get("val_loss"), "best_val_loss": rec.get("best_val_loss"),
               "seconds": rec.get("seconds"), "resumed": bool(rec.get("start_step")), "error": rec.get("error"),
               "run_dir": rec.get("run_dir")}
        if evaluated:
            row.update({"heldout_loss": e.get("loss"), "bits_per_byte": e.get("bits_per_byte"),
                        "heldout_tokens": e.get("tokens")})
            row.update({bucket_column(k): v["loss"] for k, v in (e.get("buckets") or {}).items()})
        rows.append(row)
    return rows


def _finished(rows: list[dict], point: str, key: str = METRIC) -> list[float]:
    return [r[key] for r in rows if r["point"] == point and r["status"] == "finished" and r.get(key) is not None]


def range_verdict(values: list[float], reference: list[float]) -> str:
    """How a point's losses compare with the reference's by their ranges over the seeds (the
    module docstring)."""
    if not values:
        return "no finished run"
    if not reference:
        return "no finished reference run"
    if len(values) < 2 or len(reference) < 2:
        return ONE_SEED
    diff = float(np.mean(values) - np.mean(reference))
    spread = max(max(values) - min(values), max(reference) - min(reference))
    if abs(diff) <= spread:
        return WITHIN
    return "lower loss than the reference" if diff < 0 else "higher loss than the reference"


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom (a table to 30,
    then the Cornish-Fisher expansion around the normal quantile, within 1e-3 there)."""
    if df <= len(T95):
        return T95[df - 1]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def _sign_test_p(k: int, n: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as uneven as k of n under 1/2."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """The paired view of one point against the reference (the module docstring): ``values`` and
    ``reference`` map a seed to its run's loss. Returns the seeds paired, their differences, the
    mean difference, its 95% t-interval (None where it is not computed), how many are lower, the
    sign count and the verdict."""
    seeds = sorted(set(values) & set(reference))
    deltas = [values[s] - reference[s] for s in seeds]
    n = len(deltas)
    lower, higher = sum(d < 0 for d in deltas), sum(d > 0 for d in deltas)
    out: dict[str, Any] = {"paired_seeds": seeds, "paired_deltas": deltas,
                           "paired_delta_mean": float(np.mean(deltas)) if n else None,
                           "paired_delta_ci95_low": None, "paired_delta_ci95_high": None,
                           "paired_lower_seeds": lower, "paired_sign_count": f"lower on {lower} of {n} seeds"}
    if not n:
        return {**out, "paired_verdict": NO_PAIRS}
    sd = float(np.std(deltas, ddof=1)) if n > 1 else 0.0
    if n >= 3 and sd > 0:
        half = t95(n - 1) * sd / math.sqrt(n)
        lo, hi = out["paired_delta_mean"] - half, out["paired_delta_mean"] + half
        out["paired_delta_ci95_low"], out["paired_delta_ci95_high"] = lo, hi
        verdict = LOWER if hi < 0 else HIGHER if lo > 0 else NO_PAIRED_DIFFERENCE
    elif lower + higher and _sign_test_p(lower, lower + higher) < 0.05:
        verdict = LOWER if lower > higher else HIGHER
    else:
        verdict = NO_PAIRED_DIFFERENCE
    return {**out, "paired_verdict": verdict}


def _by_seed(rows: list[dict], point: str, key: str = METRIC) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows if r["point"] == point and r["status"] == "finished"
            and r.get(key) is not None}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def point_rows(rows: list[dict], points: list[Point], evaluated: bool) -> list[dict[str, Any]]:
    """One row per point (``points.parquet``): the runs' mean, min, max and spread over the seeds,
    the difference of the mean from the reference point's, the range verdict and the paired view
    (:func:`paired_comparison`)."""
    ref = next(p for p in points if p.reference)
    ref_values = _finished(rows, ref.name)
    ref_by_seed = _by_seed(rows, ref.name)
    out = []
    for p in points:
        values = _finished(rows, p.name)
        first = next((r for r in rows if r["point"] == p.name and r.get("total_params") is not None), {})
        mean = _mean(values)
        row = {"point": p.name, **_value_columns(p.values), "reference": p.reference, "seeds": len(values),
               "total_params": first.get("total_params"), "activated_params": first.get("activated_params"),
               "table_rows": first.get("table_rows"), "moe_num_experts": first.get("moe_num_experts"),
               "val_loss_mean": mean, "val_loss_min": min(values) if values else None,
               "val_loss_max": max(values) if values else None,
               "val_loss_spread": max(values) - min(values) if len(values) > 1 else None,
               "train_loss_mean": _mean(_finished(rows, p.name, "train_loss")),
               "delta_vs_reference": mean - _mean(ref_values) if values and ref_values else None,
               "range_verdict": "reference" if p.reference else range_verdict(values, ref_values)}
        paired = paired_comparison(_by_seed(rows, p.name), ref_by_seed)
        row.update({**paired, "paired_verdict": "reference"} if p.reference else paired)
        if evaluated:
            row["bits_per_byte_mean"] = _mean(_finished(rows, p.name, "bits_per_byte"))
        out.append(row)
    return out


def power_law_fit(rows: list[dict]) -> dict[str, Any] | None:
    """The memory sweep's fit ``loss = a * rows^(-alpha)`` (least squares in log-log space) over
    every finished run with real tables (the backbone and the one-row control left out); None
    with fewer than two table sizes."""
    pts = [(r["table_rows"], r[METRIC]) for r in rows if r["status"] == "finished" and r.get(METRIC) is not None
           and r.get("slots") not in (None, SINGLE_ROW_SLOTS) and r.get("table_rows")]
    if len({x for x, _ in pts}) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return {"a": math.exp(intercept), "alpha": float(-slope), "r2": r2, "runs": len(pts),
            "x": "table_rows", "formula": "val_loss = a * table_rows^(-alpha)"}


def write_tables(runs: list[dict], points: list[dict], runs_path, points_path) -> None:
    """``runs.parquet`` and ``points.parquet``."""

    pq.write_table(pa.Table.from_pylist(runs), runs_path)
    pq.write_table(pa.Table.from_pylist(points), points_path)
