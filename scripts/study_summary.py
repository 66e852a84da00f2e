"""The study's results as Markdown tables: what `scripts/study.sh` ends with (OUT/summary.md).

    python scripts/study_summary.py out/study            # prints Markdown; --out FILE writes it

Reads the sweep directories (`allocation/`, `memory/`, `ablation/`: their checked manifests and
`points.parquet` / `runs.parquet`) and the knockout evaluation (`knockout/buckets.parquet`), and
prints one table per experiment: each point's mean validation loss over the seeds with its range,
the difference to the reference point, the range verdict (a difference within the seeds' spread is
"no difference"), the paired verdict (the runs of one seed paired: their mean difference with a 95%
t-interval, or a sign count below 3 seeds), bits per byte, and the knockout's loss increase per bucket.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engram_cli.core.artifacts import read_manifest

SWEEPS = (("allocation", "Allocation: validation loss against ρ at equal total and activated parameters"),
          ("memory", "Memory: validation loss against the table size, the backbone fixed"),
          ("ablation", "Ablation at ρ = 0.75"))


def _rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read().to_pylist()


def _f(v, digits: int = 3, sign: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _paired(p: dict) -> str:
    """The paired difference: its mean with the 95% t-interval, or with the sign count (a sweep
    written before the paired view has neither)."""
    if p.get("paired_delta_mean") is None or p.get("paired_verdict") == "reference":
        return "—"
    if p.get("paired_delta_ci95_low") is None:
        return f"{_f(p['paired_delta_mean'], sign=True)} ({p['paired_sign_count']})"
    return (f"{_f(p['paired_delta_mean'], sign=True)} [{_f(p['paired_delta_ci95_low'], sign=True)}, "
            f"{_f(p['paired_delta_ci95_high'], sign=True)}]")


def sweep_table(directory: Path, title: str) -> list[str]:
    manifest = read_manifest(directory, "engram.sweep")
    points = _rows(directory / "points.parquet")
    lines = [f"### {title}", "", f"`{directory}`: {manifest['summary']['runs']} runs, "
             f"{manifest['summary'].get('seconds', 0):.0f} s for the last call", "",
             "| point | seeds | table rows | total / activated params | val loss mean | min – max | Δ vs reference "
             "| range verdict | paired Δ [95% CI] | paired verdict | bits/byte |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['point']} | {p['seeds']} | {p['table_rows']:,} | {p['total_params'] / 1e6:.2f}M / "
                     f"{p['activated_params'] / 1e6:.2f}M | {_f(p['val_loss_mean'])} | {_f(p['val_loss_min'])} – "
                     f"{_f(p['val_loss_max'])} | {_f(p['delta_vs_reference'], sign=True)} | "
                     f"{p.get('range_verdict', p.get('verdict'))} | {_paired(p)} | {p.get('paired_verdict', '—')} | "
                     f"{_f(p['bits_per_byte_mean'])} |")
    fit = manifest["summary"].get("fit")
    if fit:
        lines += ["", "Power-law fit: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                   for k, v in fit.items() if not isinstance(v, (list, dict)))]
    return lines + [""]


def knockout_table(directory: Path) -> list[str]:
    read_manifest(directory, "engram.eval")
    rows = _rows(directory / "buckets.parquet")
    runs = list(dict.fromkeys(r["run"] for r in rows))
    buckets = [(r["kind"], r["bucket"]) for r in rows if r["run"] == runs[0]]
    lines = ["### Knockout: loss increase with every Engram module switched off, by bucket", "",
             "| bucket | tokens | " + " | ".join(f"{r}: loss → knocked out (Δ)" for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    by = {(r["run"], r["kind"], r["bucket"]): r for r in rows}
    for kind, bucket in buckets:
        cells = []
        for run in runs:
            r = by[(run, kind, bucket)]
            cells.append("—" if r["loss"] is None else
                         f"{_f(r['loss'])} → {_f(r['knockout_loss'])} ({_f(r['delta'], sign=True)})")
        name = "all" if kind == "all" else f"{kind}: {bucket}"
        lines.append(f"| {name} | {by[(runs[0], kind, bucket)]['tokens']:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary(out: Path) -> str:
    lines = [f"## Study results: {out}", ""]
    for name, title in SWEEPS:
        if (out / name / "points.parquet").is_file():
            lines += sweep_table(out / name, title)
    if (out / "knockout" / "buckets.parquet").is_file():
        lines += knockout_table(out / "knockout")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the OUT directory of scripts/study.sh")
    ap.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    args = ap.parse_args()
    text = summary(args.study)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
