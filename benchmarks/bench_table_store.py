"""Benchmark: the row store's gather/scatter throughput, memory vs mmap, and the bytes of a delta.

One Engram layer's table of ``--rows`` x ``--dim`` float32 (engram_cli.model.store), each backend
in turn; the mmap file lies in ``--dir`` (default: a temp directory) and is warmed first, so the
figures are for a table **in the page cache** (the issue's "≤ 1.03x" setting), not for a cold
disk. A step is what training does to a table: gather the working set (``--lookups`` random
lookups, made sorted unique), apply the row optimizer (``--optimizer``), scatter rows and state
back. Steps of the two backends are interleaved (memory, mmap, memory, ...) so machine noise hits
both alike; the script prints median gather, update and scatter times per step, rows/s, the
mmap/memory ratio of the step medians, and then, after ``--steps`` steps, the bytes of one delta
checkpoint (engram_cli.train.deltas) next to the bytes of the whole table and its state.

Run it ALONE on an idle machine (never beside tests or other jobs); the figures in docs/training.md
are "to be measured" until it has been.

    python benchmarks/bench_table_store.py                                 # 4M rows x 64, 8 repeats
    python benchmarks/bench_table_store.py --rows 100000000 --dim 64 --dir /big/disk --optimizer rowwise-adagrad
    python benchmarks/bench_table_store.py --rows 20000 --dim 8 --repeats 1 --steps 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engram_cli.model.store import StoreSpec, make_store  # noqa: E402
from engram_cli.train.deltas import write_delta  # noqa: E402
from engram_cli.train.rowopt import ROW_OPTIMIZERS, make_row_optimizer  # noqa: E402


def one_step(st, opt, rows: np.ndarray, rng: np.random.Generator, step: int) -> tuple[float, float, float]:
    """(gather, update, scatter) seconds of one step on ``rows``."""
    t0 = time.perf_counter()
    values = st.gather(rows)
    state = {name: st.gather_state(name, rows) for name in st.state_names}
    t1 = time.perf_counter()
    grad = rng.standard_normal(values.shape, dtype=np.float32)
    t1b = time.perf_counter()
    new_values, new_state = opt.update(values, state, grad, lr=1e-3, step=step)
    t2 = time.perf_counter()
    for name, arr in new_state.items():
        st.scatter_state(name, rows, arr)
    st.scatter(rows, new_values)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1b, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000, help="rows of the table")
    ap.add_argument("--dim", type=int, default=64, help="floats per row")
    ap.add_argument("--lookups", type=int, default=16 * 128 * 8, help="lookups per step (B x T x heads)")
    ap.add_argument("--optimizer", choices=ROW_OPTIMIZERS, default="adam")
    ap.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=10, help="steps per round (and before the delta)")
    ap.add_argument("--dir", type=Path, default=None, help="where the mmap store goes (default: a temp dir)")
    args = ap.parse_args()

    opt = make_row_optimizer(args.optimizer)
    spec = StoreSpec(layer_id=1, rows=args.rows, dim=args.dim, seed=0, init_std=0.02,
                     state=opt.state_spec(args.dim), plan_fingerprint="bench")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        stores = {"memory": make_store("memory", spec), "mmap": make_store("mmap", spec, Path(tmp) / "store")}
        everything = np.arange(args.rows, dtype=np.int64)
        for st in stores.values():  # materialize every block: the table in RAM / in the page cache
            for lo in range(0, args.rows, 1 << 20):
                st.gather(everything[lo:lo + (1 << 20)])
            st.mark_clean()
        times = {name: {"gather": [], "update": [], "scatter": [], "step": []} for name in stores}
        rng = np.random.default_rng(0)
        step = 0
        for _ in range(args.repeats):
            batches = [np.unique(rng.integers(0, args.rows, args.lookups)) for _ in range(args.steps)]
            step += 1
            for name, st in stores.items():
                for i, rows in enumerate(batches):
                    g, u, s = one_step(st, opt, rows, np.random.default_rng(i), step)
                    for key, v in zip(("gather", "update", "scatter", "step"), (g, u, s, g + u + s)):
                        times[name][key].append(v)
        print(f"table {args.rows:,} rows x {args.dim} float32, {args.lookups:,} lookups/step "
              f"(~{int(np.mean([b.size for b in batches])):,} unique rows), optimizer {args.optimizer} "
              f"({opt.state_bytes_per_row(args.dim)} state bytes/row); medians of {args.repeats} x {args.steps} steps")
        for name, t in times.items():
            med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            rate = np.mean([b.size for b in batches]) / (med["gather"] / 1e3)
            print(f"  {name:6s}  gather {med['gather']:.3f} ms ({rate / 1e6:.2f} M rows/s)  update {med['update']:.3f} ms"
                  f"  scatter {med['scatter']:.3f} ms  step {med['step']:.3f} ms")
        ratio = statistics.median(times["mmap"]["step"]) / statistics.median(times["memory"]["step"])
        print(f"  mmap / memory step time: {ratio:.3f}x")

        st = stores["mmap"]  # a delta after `steps` more steps
        st.mark_clean()
        for i in range(args.steps):
            one_step(st, opt, np.unique(rng.integers(0, args.rows, args.lookups)), np.random.default_rng(i), step + 1)
        t0 = time.perf_counter()
        rec = write_delta(st, Path(tmp) / "delta", step=args.steps, since=0)
        dt = time.perf_counter() - t0
        full = args.rows * (args.dim * 4 + opt.state_bytes_per_row(args.dim))
        print(f"  delta after {args.steps} steps: {rec.changed_rows:,} rows, {rec.bytes:,} bytes in {dt * 1e3:.1f} ms "
              f"(the whole table + state: {full:,} bytes)")
        stores["mmap"].close()


if __name__ == "__main__":
    main()
