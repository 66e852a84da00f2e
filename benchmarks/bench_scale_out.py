"""Benchmark: build-tables on one process vs on Ray (1 and 2 workers), and the reduce vs the number of tasks.

    python benchmarks/bench_scale_out.py                       # a >= 20M-token line-mode corpus, 3 repeats
    python benchmarks/bench_scale_out.py --tokens 2M --repeats 1 --tasks 8   # a quick smoke run

Run it ALONE on a quiet machine (wall-clock figures): every measurement is its own process, with a
fresh local Ray instance of ``num_cpus`` workers where it uses Ray. The corpus is
``bench_build_tables.varied_corpus`` (the medium corpus or the sample, as lines, copies varied),
re-cut into ``--files`` files of consecutive lines so that 128 tasks have a file each.

1. **throughput**: the whole ``build_tables`` call, ``--engine local`` vs ``--engine ray`` with 1 and
   2 workers (``--tasks`` map tasks, default 16); tokens per second, and Ray's overhead as the ratio
   of its 1-worker time to the local time (aim <= 1.10x). The counts are checked identical.
2. **reduce vs tasks** (8, 32, 128 tasks of the same corpus, 2 workers): ``count_on_ray`` alone;
   rows the reduce tasks read (every task's distinct keys of its share, plus the edge corrections),
   the map / reduce / merge seconds. What grows with the task count is the reduce's input: each task
   repeats the n-grams every other task also has.

Prints one JSON line per measurement and a table of medians; docs/scale-out.md cites them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build_tables import _load, varied_corpus  # noqa: E402  (the corpus the other benchmark uses)

TARGET_SIZE = 200_003
TARGET_OVERHEAD = 1.10


def recut(sources: list[str], files: int, out: Path) -> list[str]:
    """The same lines, in the same order, in ``files`` files (line mode: the same documents)."""
    lines = [ln for s in sources for ln in Path(s).read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // files)
    paths = []
    for i in range(files):
        chunk = lines[i * per:(i + 1) * per]
        if chunk:
            p = out / f"part{i:04d}.txt"
            p.write_text("\n".join(chunk) + "\n", encoding="utf-8")
            paths.append(str(p))
    return paths


def child(kind: str, a: dict) -> dict:
    import resource

    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.tables.build import BuildTablesConfig, build_tables

    spec = CorpusSpec(a["sources"], doc_mode="line")
    t0 = time.perf_counter()
    if kind == "reduce":
        import ray

        from engram_cli.tables.boundary import Boundary
        from engram_cli.tables.build import separator_ids
        from engram_cli.tables.ray_count import CountJob, count_on_ray, default_partitions
        from engram_cli.vocab.normalize import load_vocab
        from engram_cli.vocab.tokenizer import load_tokenizer

        ray.init(num_cpus=a["workers"], include_dashboard=False, log_to_driver=False)
        vocab, tok = load_vocab(a["vocab"]), load_tokenizer("deepseek")
        cfg = BuildTablesConfig(vocab=Path(a["vocab"]), out=Path(a["out"]))
        sep = separator_ids(cfg, tok, vocab)
        work = Path(a["out"]).parent / "work"
        work.mkdir(parents=True, exist_ok=True)
        job = CountJob(tokenizer="deepseek", tokenizer_sha256=tok.fingerprint, vocab=a["vocab"],
                       vocab_sha256=vocab.fingerprint, max_n=3,
                       boundary=Boundary("pad-start", sep[1], int(vocab.table[2])).to_dict(), text_column="text",
                       doc_mode="line", hf_split="train", skip_bad_files=True, batch_size=1024, memory_limit=None,
                       spill_dir=None, partitions=default_partitions(a["tasks"]), work_dir=str(work))
        t0 = time.perf_counter()
        r = count_on_ray(spec, job, vocab_size=vocab.canonical_vocab_size, tasks=a["tasks"], address=None)
        out = {"tasks": r.tasks, "partitions": r.partitions, "reduce_input_rows": r.reduce_input_rows,
               "distinct": {n: int(r.ngrams.distinct(n)) for n in (1, 2, 3)}, "tokens": int(r.ngrams.tokens),
               **{f"{k}_s": v for k, v in r.seconds.items()}}
        ray.shutdown()
    else:
        engine = dict(engine="ray", tasks=a["tasks"]) if kind == "ray" else {}
        if kind == "ray":
            import ray

            ray.init(num_cpus=a["workers"], include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        res = build_tables(BuildTablesConfig(vocab=Path(a["vocab"]), out=Path(a["out"]), corpus=spec,
                                             target_size=TARGET_SIZE, threads=1, cache_tokens=False, force=True,
                                             **engine))
        out = {"tokens": res.tokens, "orders": [(o["n"], o["total"], o["distinct"]) for o in res.orders]}
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_child(kind: str, a: dict) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", kind], input=json.dumps(a), capture_output=True,
                       text=True, env=env, check=False)
    if p.returncode:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="20M", help="corpus size in tokens, e.g. 20M")
    ap.add_argument("--files", type=int, default=256, help="files the corpus is re-cut into")
    ap.add_argument("--tasks", type=int, default=16, help="map tasks of the throughput runs")
    ap.add_argument("--reduce-tasks", default="8,32,128", help="task counts of the reduce measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=("local", "ray", "reduce"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(sys.stdin.read()))))
        return

    from engram_cli.vocab.normalize import NormalizeVocabConfig, normalize_vocab

    n = int(float(args.tokens.upper().rstrip("M")) * 1e6) if args.tokens.upper().endswith("M") else int(args.tokens)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, what = varied_corpus(n)
        sources = recut(base, args.files, tmp / "corpus")
        normalize_vocab(NormalizeVocabConfig(out=tmp / "vocab", ablation=False))
        common = {"sources": sources, "vocab": str(tmp / "vocab")}
        print(f"corpus: {what}, re-cut into {len(sources)} files; {args.repeats} repeats; {_load()}", flush=True)
        runs: dict[str, list[dict]] = {}
        for r in range(args.repeats):
            for name, kind, workers in (("local", "local", 0), ("ray 1 worker", "ray", 1), ("ray 2 workers", "ray", 2)):
                m = run_child(kind, {**common, "out": str(tmp / f"t-{kind}{workers}" / "tables"), "workers": workers,
                                     "tasks": args.tasks})
                print(json.dumps({"repeat": r, "run": name, **m}), flush=True)
                runs.setdefault(name, []).append(m)
        orders = {json.dumps(m["orders"]) for ms in runs.values() for m in ms}
        assert len(orders) == 1, "the engines' counts differ"
        local = statistics.median(m["seconds"] for m in runs["local"])
        print(f"\nthroughput ({args.tasks} tasks; {_load()}):")
        for name, ms in runs.items():
            s = statistics.median(m["seconds"] for m in ms)
            print(f"  {name:14s} {s:8.1f} s  {ms[0]['tokens'] / s:12,.0f} tokens/s  {s / local:5.2f}x local  "
                  f"peak RSS {max(m['peak_rss_mib'] for m in ms):,.0f} MiB (driver)")
        one = statistics.median(m["seconds"] for m in runs["ray 1 worker"]) / local
        print(f"  Ray overhead (1 worker / local): {one:.2f}x (aim <= {TARGET_OVERHEAD:.2f}x)")
        print(f"\nreduce vs tasks (2 workers; {_load()}):")
        for t in (int(x) for x in args.reduce_tasks.split(",")):
            ms = [run_child("reduce", {**common, "out": str(tmp / f"r{t}-{r}" / "tables"), "workers": 2, "tasks": t})
                  for r in range(args.repeats)]
            for m in ms:
                print(json.dumps({"run": "reduce", **m}), flush=True)
            med = {k: statistics.median(m[k] for m in ms) for k in ("map_s", "reduce_s", "merge_s", "seconds")}
            m = ms[0]
            print(f"  {m['tasks']:4d} tasks  {m['partitions']:3d} partitions  reduce input {m['reduce_input_rows']:,} rows "
                  f"({m['reduce_input_rows'] / sum(m['distinct'].values()):.2f}x the distinct n-grams)  "
                  f"map {med['map_s']:.1f} s  reduce {med['reduce_s']:.1f} s  merge {med['merge_s']:.1f} s")


if __name__ == "__main__":
    main()
