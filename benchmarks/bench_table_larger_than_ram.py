"""Benchmark: a table set larger than the machine's RAM trains with bounded memory (`--table-store mmap`).

The study configuration (configs/study.toml, its tables: docs/experiments.md) re-planned with
``--set plan.target_size=N`` so that every Engram layer has at least ``--min-rows`` (1B) rows and
the store (rows + optimizer state, float32) is at least ``--factor`` (1.5) x MemTotal, as sparse
files. ``engram train ... --table-store mmap`` runs ``--steps`` (50) steps while this driver samples
the training process's ``RssAnon`` (/proc/PID/status) every 0.1 s; then the same run with the
tables' own small plan and ``--table-store memory``. It prints, for both: the peak anonymous RSS
(the issue's bound: under 4 GiB for the big one), the disk the store actually uses (st_blocks of
its files) next to its apparent size, the step time (median of the metrics.jsonl windows after the
first two) and the final checkpoint's bytes.

Before it starts it checks the disk: a block of 1,024 rows is materialized (initialized, given
disk) on its first touch, so ``steps`` x B x T x heads uniformly hashed lookups touch
``1 - exp(-lookups / blocks)`` of a layer's blocks — with the study's 32k lookups a step, 50 steps
touch ~80% of a 1B-row layer (~150 GB at D = 16 with Adam). It refuses to start when the free
space under ``--dir`` is below that (engram_cli.model.budget.table_store_bytes).

Run it ALONE on an idle machine with a large local disk for ``--dir``; the figures in
docs/training.md are "to be measured" until it has been.

    python benchmarks/bench_table_larger_than_ram.py --corpus ~/.cache/engram/medium/corpus \
        --tables out/medium-tables --dir /big/disk/bench
    python benchmarks/bench_table_larger_than_ram.py ... --optimizer rowwise-adagrad   # 68 bytes/row at D = 16
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_table_store import engram, need_table_store_option, run_step_seconds  # noqa: E402

from engram_cli.model.budget import table_store_bytes  # noqa: E402
from engram_cli.tables.build import load_tables  # noqa: E402
from engram_cli.tables.plan import replan  # noqa: E402


def meminfo(key: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"error: /proc/meminfo has no {key}")


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def train_sampled(args: list[str]) -> tuple[int, float, str]:
    """Run `engram train ARGS` (one process), sampling its RssAnon: (peak bytes, seconds, stderr tail)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engram_cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], status_kib(proc.pid, "RssAnon") or 0)
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: engram train {' '.join(args)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return peak[0], time.perf_counter() - t0, err


def disk_of(directory: Path, suffixes=(".f32", ".u8")) -> tuple[int, int]:
    """(bytes on disk, apparent bytes) of the store files (``*.f32``, ``*.u8``) under ``directory``."""
    used = apparent = 0
    for p in directory.rglob("*"):
        if p.is_file() and p.suffix in suffixes and "checkpoint" not in p.as_posix():
            st = p.stat()
            used, apparent = used + st.st_blocks * 512, apparent + st.st_size
    return used, apparent


def latest_checkpoint_bytes(run: Path) -> int:
    ckpts = sorted((p for p in run.rglob("*") if p.is_dir() and p.name.startswith("checkpoint")), key=lambda p: p.name)
    return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", required=True, help="the study's corpus")
    ap.add_argument("--tables", type=Path, required=True, help="the study's tables artifact")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "study.toml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--factor", type=float, default=1.5, help="store size (rows + state) over MemTotal")
    ap.add_argument("--min-rows", type=int, default=1_000_000_000, help="rows per Engram layer, at least")
    ap.add_argument("--optimizer", choices=("adam", "rowwise-adagrad"), default="adam")
    ap.add_argument("--dir", type=Path, default=None, help="where the runs go: a large local disk")
    ap.add_argument("--keep-runs", action="store_true")
    args = ap.parse_args()
    need_table_store_option()

    plan = load_tables(args.tables).plan
    mem_total = meminfo("MemTotal")
    full_small = table_store_bytes(plan, "mmap", args.optimizer)["disk"]
    per_row = full_small // plan.total_slots_all
    layers, heads = len(plan.layer_ids), plan.total_heads
    rows_per_layer = max(args.min_rows, math.ceil(args.factor * mem_total / per_row / layers))
    target = math.ceil(rows_per_layer / heads)
    big = replan(plan, target_size=target)
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-big-"))
    base.mkdir(parents=True, exist_ok=True)
    tokens = 32 * 128  # the study's batch; the run's own settings decide, this sizes the disk check
    need = table_store_bytes(big, "mmap", args.optimizer, tokens=tokens, steps=args.steps)
    free = shutil.disk_usage(base).free
    gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    print(f"MemTotal {gib(mem_total)}; plan: target {target:,} slots per head -> {big.total_slots_all:,} rows "
          f"({', '.join(f'layer {k}: {big.total_slots(k):,}' for k in big.layer_ids)}), {per_row} bytes/row with "
          f"{args.optimizer}: store {gib(need['disk'])} ({need['disk'] / mem_total:.2f}x MemTotal) as sparse files; "
          f"{args.steps} steps are expected to materialize {gib(need['disk_expected'])}; {gib(free)} free under {base}",
          flush=True)
    if need["disk_expected"] > free:
        sys.exit("error: not enough free disk for the blocks these steps materialize "
                 "(use --dir on a larger disk, fewer --steps, or --optimizer rowwise-adagrad)")

    common = ["--tables", str(args.tables), "--config", str(args.config), "--cache-dir", str(base / "token-cache"),
              "--force", "--quiet", "--set", f"train.steps={args.steps}", "--set", "train.log_interval=5",
              "--set", f"train.eval_interval={args.steps}", "--set", "train.eval_batches=1",
              "--set", f"train.table_optimizer={args.optimizer}"]
    warm = engram("train", *args.corpus, "--out", str(base / "warm"), *common, "--set", "train.steps=2",
                  "--table-store", "memory")  # the token cache, outside the measured runs
    if warm.returncode != 0:
        sys.exit(f"error: the warm-up run failed: {warm.stderr.strip()[-2000:]}")
    results = {}
    for name, extra in (("big, mmap", ["--table-store", "mmap", "--set", f"plan.target_size={target}"]),
                        ("small, memory", ["--table-store", "memory"])):
        out = base / name.replace(", ", "-")
        peak, seconds, _ = train_sampled([*args.corpus, "--out", str(out), *common, *extra])
        used, apparent = disk_of(out)
        results[name] = (peak, run_step_seconds(out), used, apparent, latest_checkpoint_bytes(out), seconds)
        print(f"  {name}: done in {seconds:.0f} s", flush=True)
    print(f"{'run':15s} {'peak RssAnon':>13s} {'step ms':>9s} {'store on disk':>14s} {'store apparent':>15s} "
          f"{'checkpoint':>11s}")
    for name, (peak, step, used, apparent, ckpt, _) in results.items():
        print(f"{name:15s} {gib(peak):>13s} {step * 1e3:9.1f} {gib(used):>14s} {gib(apparent):>15s} {gib(ckpt):>11s}")
    ratio = results["big, mmap"][1] / results["small, memory"][1]
    print(f"step time big mmap / small memory: {ratio:.3f}x; peak RssAnon bound: 4 GiB "
          f"({'held' if results['big, mmap'][0] < 4 * 2**30 else 'EXCEEDED'})")
    if not args.keep_runs:
        for name in results:
            shutil.rmtree(base / name.replace(", ", "-"), ignore_errors=True)


if __name__ == "__main__":
    main()
