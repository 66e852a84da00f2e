"""Table configurations DeepSeek publishes, by name: ``engram build-tables --preset NAME``.

A preset fixes the options of a table plan (``engram_cli.tables.plan.make_plan``): Engram layers,
largest n-gram order, heads per order, row width, target table size per head, seed, pad id, and
the storage type the memory figures are given in. The options a user passes on top must agree
with the preset: a contradiction is refused, naming both values (a preset is a claim about what a
plan reproduces, so it is never silently overridden).

* ``deepseek-v3-demo``: DeepSeek's public Engram demo for the V3 tokenizer (layers 1 and 15,
  orders 2-3, 8 heads of 512 / 8 = 64 dims, 5 x 129,280 target slots per head, seed 0, pad 2).
* ``deepseek-v4.1-flash``: V4.1-Flash's Engram (layers 1 and 14, orders 2-4, 8 heads of 256
  dims, prime base 16,000,000, rows in fp8 e4m3 with one ue8m0 scale per 32 values). Its plan
  reproduces the published per-layer row counts exactly: 384,006,168 and 384,016,682.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engram_cli.core.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """The plan options of one published configuration (field names as in ``make_plan``)."""

    name: str
    description: str
    layer_ids: tuple[int, ...]
    max_ngram_size: int
    n_head_per_ngram: int
    embed_dim_per_head: int
    target_size: int | None          # slots per head for every order; None: 5 x the tokenizer's vocabulary
    seed: int = 0
    pad_id: int = 2
    dtype: str = "bf16"              # storage type of the rows (engram_cli.tables.plan.TABLE_DTYPES)
    published_rows: dict[int, int] = field(default_factory=dict)  # layer -> rows, where published

    def plan_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PLAN_OPTIONS}


#: the options a preset sets, in the order they are reported
PLAN_OPTIONS = ("layer_ids", "max_ngram_size", "n_head_per_ngram", "embed_dim_per_head", "target_size",
                "seed", "pad_id", "dtype")

#: the command-line flag of each option, for messages
FLAGS = {"layer_ids": "--layers", "max_ngram_size": "--max-ngram-size", "n_head_per_ngram": "--heads-per-ngram",
         "embed_dim_per_head": "--embed-dim-per-head", "target_size": "--target-size", "seed": "--seed",
         "pad_id": "--pad-id", "dtype": "--dtype"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("deepseek-v3-demo", "DeepSeek's public Engram demo (V3 tokenizer): the reference defaults",
           layer_ids=(1, 15), max_ngram_size=3, n_head_per_ngram=8, embed_dim_per_head=64, target_size=None),
    Preset("deepseek-v4.1-flash", "DeepSeek V4.1-Flash: layers 1 and 14, orders 2-4, fp8 rows with ue8m0 scales",
           layer_ids=(1, 14), max_ngram_size=4, n_head_per_ngram=8, embed_dim_per_head=256,
           target_size=16_000_000, dtype="fp8-e4m3-ue8m0",
           published_rows={1: 384_006_168, 14: 384_016_682}),
)}

#: the options without a preset: the reference demo's
DEFAULT_PRESET = "deepseek-v3-demo"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", f"use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_plan_options(preset: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The plan options: the preset's (the reference's without one), with ``given`` on top.

    ``given`` holds only the options the user set (None values are ignored). With a preset, a
    given value that differs from the preset's raises :class:`ConfigError` naming both.
    """
    base = get_preset(preset or DEFAULT_PRESET)
    options = base.plan_options()
    for key, value in given.items():
        if value is None:
            continue
        if key not in options:
            raise ValueError(f"not a plan option: {key}")
        value = tuple(value) if key == "layer_ids" else value
        if preset is not None and value != options[key]:
            raise ConfigError(f"--preset {preset} sets {FLAGS[key]} {_show(options[key])}, "
                              f"but {FLAGS[key]} {_show(value)} was given",
                              f"drop {FLAGS[key]} to use the preset, or drop --preset")
        options[key] = value
    return options


def check_published_rows(preset: str | None, rows_per_layer: dict[int, int]) -> dict[int, dict[str, int]]:
    """Per layer of a preset with published table sizes: the plan's rows beside the published
    ones (``{"plan": ..., "published": ...}``); empty without a preset or published figures."""
    if preset is None:
        return {}
    published = get_preset(preset).published_rows
    return {layer: {"plan": rows_per_layer.get(layer, 0), "published": n} for layer, n in published.items()}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) and value > 99_999 else str(value)
