"""Benchmark: build-tables throughput beside tokenizing alone, on the same corpus.

    python benchmarks/bench_build_tables.py [--copies 8] [--repeats 3]

The corpus is the bundled sample data (English + Chinese), concatenated ``--copies`` times
into a temp directory so that fixed costs do not hide the per-token ones. Side by side, with
the median of ``--repeats`` runs each:

* tokenize: iterate the corpus through the DeepSeek tokenizer in batches (what every stage pays);
* build-tables: the whole library call (tokenize, map to canonical ids, count 1..3-grams, plan,
  measure collisions, write Parquet, plot).

It prints tokens/s of both and the overhead of counting + hashing + collision measurement on
top of tokenization (target: at most 25%).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(tmp: Path, copies: int) -> list[str]:
    files = sorted((ROOT / "sample_data" / "sotu").glob("*.txt")) + [ROOT / "sample_data" / "zh_classics.jsonl"]
    out = []
    for c in range(copies):
        for f in files:
            dst = tmp / f"c{c}_{f.name}"
            shutil.copyfile(f, dst)
            out.append(str(dst))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from engram_cli.corpus import CorpusSpec, CorpusStats, iter_tokenized
    from engram_cli.tables import BuildTablesConfig, build_tables
    from engram_cli.tokenizer import load_tokenizer
    from engram_cli.vocab import NormalizeVocabConfig, normalize_vocab

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sources = make_corpus(tmp, args.copies)
        normalize_vocab(NormalizeVocabConfig(out=tmp / "vocab", ablation=False))
        tok = load_tokenizer()

        def tokenize_only() -> int:
            stats = CorpusStats()
            n = 0
            for batch in iter_tokenized(CorpusSpec(sources=sources), tok.tokenizer, stats=stats):
                n += sum(len(x) for x in batch)
            return n

        def build() -> int:
            r = build_tables(BuildTablesConfig(vocab=tmp / "vocab", out=tmp / "tables", corpus=CorpusSpec(sources),
                                               force=True, target_size=200_003))
            return r.tokens

        t_tok, t_build, tokens = [], [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = tokenize_only()
            t_tok.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build()
            t_build.append(time.perf_counter() - t0)
        a, b = statistics.median(t_tok), statistics.median(t_build)
        print(f"corpus: sample_data x {args.copies} = {tokens:,} tokens; {args.repeats} repeats, medians")
        print(f"{'tokenize only':<16} {a:7.2f} s  {tokens / a:12,.0f} tokens/s")
        print(f"{'build-tables':<16} {b:7.2f} s  {tokens / b:12,.0f} tokens/s")
        print(f"overhead of counting + hashing + collisions on top of tokenization: {b / a - 1:+.1%} "
              f"(ratio {b / a:.2f}; target <= +25%)")


if __name__ == "__main__":
    main()
