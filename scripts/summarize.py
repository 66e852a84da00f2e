"""Print what the pipeline produced: one row per artifact directory under OUT_DIR.

    python scripts/summarize.py out/sample

Reads each directory's manifest.json (validated by engram's own loader) and shows the format,
the number and size of its files, and its headline figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from engram_cli.core.artifacts import FORMATS, read_manifest


def headline(fmt: str, s: dict) -> str:
    if fmt == "engram.vocab":
        return (f"{s['original_vocab_size']:,} → {s['canonical_vocab_size']:,} ids "
                f"({s['reduction_pct']:.2f}% fewer)")
    if fmt == "engram.tables":
        orders = ", ".join(f"{o['distinct']:,} distinct {o['n']}-grams" for o in s["orders"][1:])
        return f"{s['tokens']:,} tokens; {orders}; {s['plan']['total_slots']:,} table slots"
    if fmt == "engram.run":
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()
                 if not isinstance(v, (dict, list))]
        return "; ".join(parts[:6])
    if fmt == "engram.eval":
        parts = []
        for r in s["runs"]:
            line = f"{r['model']}: {r['loss']:.3f} nats/token, {r['bits_per_byte']:.3f} bits/byte"
            if r.get("delta") is not None:
                line += f", Engram knocked out {r['delta']:+.3f}"
            parts.append(line)
        return "; ".join(parts)
    return "; ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))[:120]


def main(out: Path) -> None:
    console = Console(width=160 if not sys.stdout.isatty() else None)
    table = Table(title=f"engram pipeline outputs in {out}/", title_justify="left")
    for col in ("directory", "artifact", "files", "size", "summary"):
        table.add_column(col, overflow="fold")
    for d in sorted(p for p in out.iterdir() if (p / "manifest.json").is_file()):
        fmt = json.loads((d / "manifest.json").read_text())["format"]
        m = read_manifest(d, fmt) if fmt in FORMATS else json.loads((d / "manifest.json").read_text())
        size = sum(f["bytes"] for f in m["files"].values())
        table.add_row(str(d), fmt, str(len(m["files"]) + 1), f"{size / 2**20:.1f} MiB", headline(fmt, m["summary"]))
    console.print(table)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/sample"))
