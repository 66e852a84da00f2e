"""What ``engram sweep`` is asked to do (:class:`SweepConfig`), the points and runs it makes of
that, how its option values are read, and the files it writes.

A **point** is one setting of the swept variables (an allocation ratio, a table size, one cell of
a grid); a **run** is a point trained with one seed, in its own run directory
``<out>/runs/<point>--seed=<seed>``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_cli.core.cluster import check_engine
from engram_cli.core.errors import ConfigError
from engram_cli.train.settings import parse_set, resolve_key

FORMAT = "engram.sweep"
RUNS_DIR = "runs"                 # the run directories, one per point and seed
RUNS_FILE = "runs.parquet"        # one row per run
POINTS_FILE = "points.parquet"    # one row per point: mean and spread over the seeds, the verdicts
PLOT_PNG = "sweep.png"            # the sweep's figure (loss against rho / slots / grid cell)
PLOT_SVG = "sweep.svg"
CURVES_PNG = "loss_curves.png"    # every run's training and validation loss against tokens
FILES = ("manifest.json", RUNS_FILE, POINTS_FILE, PLOT_PNG, PLOT_SVG, CURVES_PNG)

KINDS = ("allocation", "memory", "grid")
#: ``--slots 1``: the capacity-1 control, one row per head (``TablePlan.single_row``), not the prime 2
SINGLE_ROW_SLOTS = 1
#: grid keys that are not an axis: the seeds are their own option, the vocabulary is the corpus's
NOT_AN_AXIS = {"train.seed": "use --seeds", "model.vocab_size": "the trainer sets it from the corpus"}


@dataclass
class SweepConfig:
    """Everything ``engram sweep`` was asked to do."""

    kind: str                                   # "allocation", "memory" or "grid"
    out: Path                                   # the sweep directory
    tables: Path                                # engram.tables artifact: the vocab, tokenizer and plan template
    sources: list[str]                          # the corpus every run trains on
    config: Path | None = None                  # TOML of the base settings (e.g. configs/tiny.toml)
    overrides: list[str] = field(default_factory=list)  # --set on every run, before the point's own
    seeds: list[int] = field(default_factory=lambda: [0])  # train.seed of each point's runs
    ratios: list[float] = field(default_factory=list)      # allocation: rho values (1 = pure MoE)
    slots: list[int] = field(default_factory=list)         # memory: slots per head (1 = one row per head)
    axes: list[tuple[str, list[Any]]] = field(default_factory=list)  # grid: (config key, values)
    allocation: float | None = None             # grid: every run at this rho (equal parameters)
    jobs: int = 1                               # runs trained at once, each in its own process
    threads: int | None = None                  # torch threads per run (None: cores // jobs)
    evaluate: bool = True                       # score each run with `engram eval` (bits per byte, buckets)
    eval_windows: int | None = None             # at most this many held-out windows per run (None: all)
    device: str = "auto"                        # auto | cpu | cuda
    cache_dir: Path | None = None               # token cache (default <out>/runs/.engram-cache)
    log: str | None = None                      # "tensorboard": every run also logs TensorBoard events
    force: bool = False                         # replace an existing sweep (only an engram.sweep)
    # scale-out (engram_cli.sweep.ray_engine, docs/scale-out.md): each run a task on a Ray cluster
    engine: str = "local"                       # local: --jobs processes here; ray: Ray tasks
    ray_address: str | None = None              # the cluster (None: RAY_ADDRESS, one on this machine, or a new one)


@dataclass(frozen=True)
class Point:
    """One setting of the swept variables; it is trained once per seed."""

    name: str                      # "rho=0.75", "slots=10000", "backbone", "n_head_per_ngram=4--lr=0.001"
    values: dict[str, Any]         # the swept values: {"allocation": 0.75}, {"slots": 10000}, {key: value...}
    overrides: tuple[str, ...]     # the --set items that make this point (after the sweep's own)
    allocation: float | None       # --allocation of its runs
    reference: bool = False        # the point every other one is compared with

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": self.values, "overrides": list(self.overrides),
                "allocation": self.allocation, "reference": self.reference}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        """The point :meth:`to_dict` wrote (a sweep manifest's ``config.points``)."""
        return cls(str(d["name"]), dict(d["values"]), tuple(d["overrides"]), d["allocation"], bool(d["reference"]))


@dataclass(frozen=True)
class RunSpec:
    """A point trained with one seed."""

    point: Point
    seed: int

    @property
    def name(self) -> str:
        return f"{self.point.name}--seed={self.seed}"

    def overrides(self, config: SweepConfig) -> list[str]:
        """The run's --set items: the sweep's, the point's, then its seed."""
        return [*config.overrides, *self.point.overrides, f"train.seed={self.seed}"]


# ---------------------------------------------------------------------------------------------
# reading option values


def _items(text: str, what: str, example: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    if not text or not str(text).strip() or any(not s for s in items):
        raise ConfigError(f"{what} list {text!r} is empty or has an empty item", f"e.g. {example}")
    return items


def _no_repeats(values: list, what: str) -> list:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ConfigError(f"{what} {seen[0]} is listed twice", f"list each {what} once")
    return values


def _parse_numbers(text: str, item: str, what: str, example: str, convert: Callable[[float], Any],
                   bad: str, hint: str) -> list:
    """The one loop behind ``--ratios`` and ``--slots``: comma-separated items (``item`` names
    them in the empty-list error), each read as a float and kept as ``convert`` returns it; None
    is refused as ``{what} {s} {bad}`` with ``hint``."""
    out = []
    for s in _items(text, item, example):
        try:
            v = float(s)
        except ValueError:
            raise ConfigError(f"{what} {s!r} is not a number", f"e.g. {example}") from None
        value = convert(v)
        if value is None:  # also NaN
            raise ConfigError(f"{what} {s} {bad}", hint)
        out.append(value)
    return out


def parse_ratios(text: str) -> list[float]:
    """``--ratios 1,0.8,0.6`` -> allocation ratios, each in [0, 1]."""
    ratios = _parse_numbers(text, "ratio", "allocation ratio", "--ratios 1,0.9,0.8",
                            lambda v: v if 0.0 <= v <= 1.0 else None, "is outside [0, 1]",
                            "1 = pure MoE, 0 = every inactive expert parameter in Engram tables")
    return _no_repeats(ratios, "ratio")


def parse_slots(text: str) -> list[int]:
    """``--slots 1,1e4,3e4`` -> table sizes in slots per head (whole numbers >= 1)."""
    slots = _parse_numbers(text, "slots", "table size", "--slots 1,1e4,3e4,1e5",
                           lambda v: int(v) if math.isfinite(v) and v >= 1 and v == int(v) else None,
                           "is not a whole number of slots >= 1",
                           "e.g. --slots 1,1e4,3e4,1e5 (1 = one row per head, the capacity-1 control)")
    return _no_repeats(slots, "table size")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1`` -> seeds (integers in [0, 2^32))."""
    out = []
    for s in _items(text, "seed", "--seeds 0,1"):
        if not s.isdigit() or int(s) >= 2**32:
            raise ConfigError(f"seed {s!r} is not an integer in [0, 2^32)", "e.g. --seeds 0,1")
        out.append(int(s))
    return _no_repeats(out, "seed")


def _split_values(text: str) -> list[str]:
    """``4,8`` -> ["4", "8"]; ``[1],[1,3]`` -> ["[1]", "[1,3]"] (commas inside brackets or quotes stay)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    return parts


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``--axis KEY=V1,V2`` -> (``section.key``, values); values are read as ``--set`` reads them
    (TOML, else a plain string). The key must be a config key (``engram train --set``)."""

    if "=" not in text:
        raise ConfigError(f"--axis {text!r} is not of the form KEY=V1,V2", "e.g. --axis plan.n_head_per_ngram=2,4")
    key, raw = (s.strip() for s in text.split("=", 1))
    key = resolve_key(key)
    if key in NOT_AN_AXIS:
        raise ConfigError(f"{key} cannot be a sweep axis", NOT_AN_AXIS[key])
    items = _split_values(raw)
    if not raw or any(not s for s in items):
        raise ConfigError(f"--axis {key} has an empty value list or item", f"e.g. --axis {key}=V1,V2")
    values = [parse_set(f"{key}={s}")[1] for s in items]
    return key, _no_repeats(values, f"value of {key}")


def check_config(config: SweepConfig) -> None:
    """One ConfigError for what cannot be swept (before anything is read or written)."""
    if config.kind not in KINDS:
        raise ConfigError(f"unknown sweep kind {config.kind!r}", f"use one of: {', '.join(KINDS)}")
    need = {"allocation": (config.ratios, "--ratios 1,0.9,0.8"), "memory": (config.slots, "--slots 1,1e4,3e4"),
            "grid": (config.axes, "--axis plan.n_head_per_ngram=2,4")}[config.kind]
    if not need[0]:
        raise ConfigError(f"engram sweep {config.kind} needs the values to sweep", f"e.g. {need[1]}")
    if not config.seeds:
        raise ConfigError("no seeds given", "e.g. --seeds 0,1")
    bad = next((r for r in config.ratios if not 0.0 <= r <= 1.0), None)
    if bad is not None:
        raise ConfigError(f"allocation ratio {bad} is outside [0, 1]",
                          "1 = pure MoE, 0 = every inactive expert parameter in Engram tables")
    if any(s < 1 for s in config.slots):
        raise ConfigError(f"table size {min(config.slots)} is below 1 slot per head", "e.g. --slots 1,1e4,3e4")
    if any(not 0 <= s < 2**32 for s in config.seeds):
        raise ConfigError(f"seeds must be integers in [0, 2^32), got {config.seeds}", "e.g. --seeds 0,1")
    for values, what in ((config.ratios, "ratio"), (config.slots, "table size"), (config.seeds, "seed")):
        _no_repeats(list(values), what)
    keys = [k for k, _ in config.axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--axis {next(k for k in keys if keys.count(k) > 1)} is given twice", "give each axis once")
    if config.allocation is not None and not 0.0 <= config.allocation <= 1.0:
        raise ConfigError(f"--allocation must be in [0, 1], got {config.allocation}", "1 = pure MoE")
    if config.kind != "grid" and config.allocation is not None:
        raise ConfigError(f"--allocation is an option of `engram sweep grid`, not of `engram sweep {config.kind}`",
                          "the allocation sweep sets it per point (--ratios); the memory sweep keeps the backbone")
    check_engine(config.engine, config.ray_address)  # scale-out
    if config.engine == "ray" and config.jobs != 1:
        raise ConfigError("--jobs is for --engine local; Ray runs as many runs at once as the cluster has room for",
                          "drop --jobs (each run takes --threads CPUs of a node)")
    cores = available_cores()
    if not 1 <= config.jobs <= cores:
        raise ConfigError(f"--jobs must be between 1 and the {cores} cores this process may use, got {config.jobs}",
                          f"e.g. --jobs {min(2, cores)}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {config.threads}", "e.g. --threads 1")
    if config.eval_windows is not None and config.eval_windows < 1:
        raise ConfigError(f"--eval-windows must be >= 1, got {config.eval_windows}", "e.g. --eval-windows 500")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_run(config: SweepConfig) -> int:
    """Torch threads of each run: ``--threads``, else the cores shared out (jobs x threads <= cores)."""
    return config.threads if config.threads is not None else max(1, available_cores() // config.jobs)


# ---------------------------------------------------------------------------------------------
# the points


def _slug(value: Any) -> str:
    """A value as it appears in a directory name: ``[1, 3]`` -> ``1+3``, ``0.001`` -> ``0.001``."""
    text = "+".join(_slug(v) for v in value) if isinstance(value, list) else (
        f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value))
    return "".join(ch if ch.isalnum() or ch in "+-._" else "_" for ch in text)


def make_points(config: SweepConfig) -> list[Point]:
    """The sweep's points in order; the reference point (pure MoE, the backbone, the grid's first
    cell) is marked."""
    if config.kind == "allocation":
        ref = 1.0 if 1.0 in config.ratios else max(config.ratios)
        return [Point(f"rho={rho:g}", {"allocation": rho}, (), rho, rho == ref) for rho in config.ratios]
    if config.kind == "memory":
        points = [Point("backbone", {"slots": 0}, (), 1.0, True)]
        for s in config.slots:
            sets = (f"plan.target_size={s}",) + (("plan.single_row=true",) if s == SINGLE_ROW_SLOTS else ())
            points.append(Point(f"slots={s}", {"slots": s}, sets, None))
        return points
    points = []
    for i, combo in enumerate(itertools.product(*(values for _, values in config.axes))):
        keys = [k for k, _ in config.axes]
        name = "--".join(f"{k.split('.', 1)[1]}={_slug(v)}" for k, v in zip(keys, combo))
        sets = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, combo))
        points.append(Point(name, dict(zip(keys, combo)), sets, config.allocation, i == 0))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"two grid cells get the same directory name {next(n for n in names if names.count(n) > 1)!r}",
                          "use axis values that differ in letters or digits")
    return points


def make_runs(config: SweepConfig, points: list[Point]) -> list[RunSpec]:
    """Every point with every seed, point by point."""
    return [RunSpec(p, seed) for p in points for seed in config.seeds]
