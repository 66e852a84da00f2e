"""Benchmark: engram's hash_ngrams (NumPy path) vs a plain transcription of the reference hashing.

Both hash the same random canonical ids for one layer of the default plan (DeepSeek-V3 sizes:
129280 original ids, ~98k canonical ids, orders 2-3, 8 heads each, targets 5 x 129280). The
script checks that the outputs are bit-identical, then prints the median time of each over
several repeats and the speed-up.

    python benchmarks/bench_hashing.py                      # 10 x 1M tokens, 5 repeats
    python benchmarks/bench_hashing.py --batch 160 --seq 65536 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engram_cli.tables.hashing import hash_ngrams, hash_ngrams_reference  # noqa: E402
from engram_cli.tables.plan import make_plan


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=10, help="sequences (B)")
    ap.add_argument("--seq", type=int, default=1_000_000, help="tokens per sequence (T)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="hash_ngrams threads (default: auto)")
    ap.add_argument("--canonical-vocab", type=int, default=98_304)
    ap.add_argument("--original-vocab", type=int, default=129_280)
    args = ap.parse_args()

    plan = make_plan(canonical_vocab_size=args.canonical_vocab, canonical_pad_id=2,
                     original_vocab_size=args.original_vocab)
    layer = plan.layer_ids[0]
    ids = np.random.default_rng(0).integers(0, args.canonical_vocab, (args.batch, args.seq), dtype=np.int64)

    fast = hash_ngrams(ids, plan, layer, num_threads=args.threads)
    ref = hash_ngrams_reference(ids, plan, layer)
    assert np.array_equal(fast, ref), "hash_ngrams differs from the reference transcription"
    del fast, ref

    t_ref = median_time(lambda: hash_ngrams_reference(ids, plan, layer), args.repeats)
    t_fast = median_time(lambda: hash_ngrams(ids, plan, layer, num_threads=args.threads), args.repeats)
    n_tok = ids.size
    print(f"{n_tok:,} tokens ({args.batch} x {args.seq}), layer {layer}, {plan.total_heads} heads, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs, outputs bit-identical")
    print(f"{'reference (np.pad, %, stack)':32s} {t_ref:8.3f} s  {n_tok / t_ref / 1e6:7.1f} M tok/s")
    print(f"{'engram hash_ngrams':32s} {t_fast:8.3f} s  {n_tok / t_fast / 1e6:7.1f} M tok/s")
    print(f"speed-up: {t_ref / t_fast:.2f}x")


if __name__ == "__main__":
    main()
