"""Benchmark: build-tables beside tokenizing alone, on the same corpus, in fresh processes.

    python benchmarks/bench_build_tables.py                      # sample x 8 (1.95M tokens), 5 repeats
    python benchmarks/bench_build_tables.py --tokens 20M         # a >= 20M-token corpus read line by line
    python benchmarks/bench_build_tables.py --threads 1,2        # how both scale with threads

Corpora:

* default: the bundled sample data (State of the Union files, one document each, and the Chinese
  classics as JSON lines), copied ``--copies`` times;
* ``--tokens N``: a text corpus of at least N tokens read with ``--doc-mode line``, made from the
  medium corpus (``scripts/make_medium_corpus.py``, when it has been built) or else from the
  sample: the source's documents cut into lines, copied until N tokens, every copy after the first
  varied (10% of the adjacent words, or CJK characters, swapped) so that distinct n-grams keep
  growing as in real text. Written once to ``$ENGRAM_CACHE/bench`` (else ``~/.cache/engram/bench``);
* ``--corpus PATH ...``: your own files (with ``--doc-mode``).

Every measurement runs in its own process (nothing warm from the previous one), alternating
between the two and over the thread counts, ``--repeats`` times; medians are printed, and the
median of the ratios within each repeat (on a shared machine the load changes from minute to
minute; two runs back to back see about the same):

* tokenize: ``load_tokenizer`` + ``iter_tokenized`` over the corpus (what every stage pays to read
  a corpus); ``tokenize (no load)`` is the same without loading the tokenizer;
* build-tables: the whole ``build_tables`` call (load tokenizer and vocab, tokenize, map to
  canonical ids, count 1..3-grams, write the token cache, plan, measure collisions and hot rows,
  write Parquet and the pictures), with ``--target-size 200003``. Every run starts with an empty
  token cache of its own (a first run over the corpus: it tokenizes and writes the cache; a
  shared cache would let every run after the first count from it instead of tokenizing).

``--threads T`` sets the tokenizer's thread pool (``RAYON_NUM_THREADS``) and ``build_tables``'
own threads (``BuildTablesConfig.threads``) in both processes. Peak memory is each process's
maximum resident set (``ru_maxrss``), the interpreter and libraries included; CPU time is each
process's, all threads together (less sensitive to other jobs on the machine than wall time).
Target: build-tables at most 1.15x tokenizing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SIZE = 200_003
TARGET_RATIO = 1.15


def sample_corpus(tmp: Path, copies: int) -> list[str]:
    """The sample data copied ``copies`` times (file mode: a .txt is one document)."""
    files = sorted((ROOT / "sample_data" / "sotu").glob("*.txt")) + [ROOT / "sample_data" / "zh_classics.jsonl"]
    out = []
    for c in range(copies):
        for f in files:
            dst = tmp / f"c{c}_{f.name}"
            shutil.copyfile(f, dst)
            out.append(str(dst))
    return out


def _cache_dir() -> Path:
    root = os.environ.get("ENGRAM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "engram") / "bench"


def _source_lines() -> tuple[str, list[str], int]:
    """(name, lines, tokens per copy) of the medium corpus if built, else of the sample data."""
    medium = Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engram")) / "medium"
    if (medium / "provenance.json").is_file():
        tokens = json.loads((medium / "provenance.json").read_text()).get("tokens")
        files = sorted((medium / "corpus").glob("*.jsonl"))
        name = "medium"
    else:
        tokens, files, name = None, [ROOT / "sample_data" / "zh_classics.jsonl"], "sample"
        files = sorted((ROOT / "sample_data" / "sotu").glob("*.txt")) + files
    lines = []
    for f in files:
        texts = ([json.loads(x)["text"] for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
                 if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")])
        lines += [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if tokens is None and name == "medium":  # built without --count-tokens: about 3.15 characters a token
        tokens = int(sum(len(ln) for ln in lines) / 3.15)                 # (6.36M tokens, 20.0M characters)
    return name, lines, tokens or 243_171  # the sample's token count (docs/tables.md)


_WORD = re.compile(r"\S+|\s+")


def _vary(line: str, rng: random.Random) -> str:
    """Swap 10% of adjacent words (CJK text: adjacent characters)."""
    parts = _WORD.findall(line) if " " in line else list(line)
    step = 2 if " " in line else 1  # words alternate with the spaces between them
    for i in range(0, len(parts) - step, step):
        if rng.random() < 0.1:
            parts[i], parts[i + step] = parts[i + step], parts[i]
    return "".join(parts)


def varied_corpus(min_tokens: int) -> tuple[list[str], str]:
    """Line-mode .txt files holding >= ``min_tokens`` tokens (estimated), cached; (paths, description)."""
    name, lines, per_copy = _source_lines()
    copies = -(-min_tokens // per_copy)
    d = _cache_dir() / f"varied-{name}-{copies}"
    files = [d / f"copy{c:03d}.txt" for c in range(copies)]
    if not (d / "done").is_file():
        d.mkdir(parents=True, exist_ok=True)
        for c, path in enumerate(files):
            rng = random.Random(c)
            text = "\n".join(lines if c == 0 else (_vary(ln, rng) for ln in lines)) + "\n"
            path.write_text(text, encoding="utf-8")
        (d / "done").write_text("ok\n")
    return [str(f) for f in files], f"{name} corpus as lines, {copies} copies (later ones varied), {d}"


# ---------------------------------------------------------------------------------------------
# one measurement (a child process)


def child(kind: str, args: dict) -> dict:
    import resource

    from engram_cli.corpus.spec import CorpusSpec, CorpusStats
    from engram_cli.corpus.stream import iter_tokenized
    from engram_cli.tables.build import BuildTablesConfig, build_tables
    from engram_cli.vocab.tokenizer import load_tokenizer

    spec = CorpusSpec(sources=args["sources"], doc_mode=args["doc_mode"])
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "tokenize":
        tok = load_tokenizer()
        t1 = time.perf_counter()
        tokens = 0
        for batch in iter_tokenized(spec, tok.tokenizer, stats=CorpusStats()):
            tokens += sum(len(x) for x in batch)
        extra = {"no_load_seconds": time.perf_counter() - t1}
    else:  # a token cache of its own, empty: every run tokenizes and writes the cache (a first run)
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=Path(args["out"]).parent))
        r = build_tables(BuildTablesConfig(vocab=Path(args["vocab"]), out=Path(args["out"]), corpus=spec,
                                           force=True, target_size=TARGET_SIZE, threads=args["threads"], cache_dir=cache))
        tokens, extra = r.tokens, {}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if kind == "build":
        shutil.rmtree(cache, ignore_errors=True)  # after the clock: the next run starts without it
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "peak_bytes": peak, **extra}


def run_child(kind: str, args: dict, threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", kind], input=json.dumps({**args, "threads": threads}),
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{kind} run failed:\n{p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8, help="copies of the sample data (default corpus)")
    ap.add_argument("--tokens", default=None, help="instead: a line-mode corpus of at least this many tokens, e.g. 20M")
    ap.add_argument("--corpus", nargs="+", default=None, help="instead: these files / directories")
    ap.add_argument("--doc-mode", default="file", choices=("file", "line"), help="with --corpus")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: all CPUs)")
    ap.add_argument("--child", choices=("tokenize", "build"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(sys.stdin.read()))))
        return

    from engram_cli.vocab.normalize import NormalizeVocabConfig, normalize_vocab

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [cpus]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.corpus:
            sources, doc_mode, what = args.corpus, args.doc_mode, " ".join(args.corpus)
        elif args.tokens:
            n = int(float(args.tokens.upper().rstrip("M")) * 1e6) if args.tokens.upper().endswith("M") else int(args.tokens)
            (sources, what), doc_mode = varied_corpus(n), "line"
        else:
            sources, doc_mode, what = sample_corpus(tmp, args.copies), "file", f"sample_data x {args.copies}"
        normalize_vocab(NormalizeVocabConfig(out=tmp / "vocab", ablation=False))
        common = {"sources": sources, "doc_mode": doc_mode, "vocab": str(tmp / "vocab"), "out": str(tmp / "tables")}
        print(f"corpus: {what} (--doc-mode {doc_mode}); {args.repeats} repeats; {_load()}", flush=True)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeats):
            for t in threads:
                for kind in (("tokenize", "build") if r % 2 == 0 else ("build", "tokenize")):
                    res = run_child(kind, common, t)
                    runs.setdefault((kind, t), []).append(res)
                    print(f"  run {r + 1} threads {t} {kind:<8} {res['seconds']:7.2f} s  cpu {res['cpu_seconds']:7.2f} s  "
                          f"peak {res['peak_bytes'] / 2**20:6.0f} MiB  ({_load()})", flush=True)
        tokens = runs[("build", threads[0])][0]["tokens"]
        print(f"corpus: {tokens:,} tokens; medians of {args.repeats}; {_load()}")
        med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
        for t in threads:
            tk, bd = runs[("tokenize", t)], runs[("build", t)]
            a, a0, b = med(tk, "seconds"), med(tk, "no_load_seconds"), med(bd, "seconds")
            print(f"threads {t}:")
            print(f"  {'tokenize':<20} {a:7.2f} s  {tokens / a:11,.0f} tokens/s  "
                  f"peak {max(x['peak_bytes'] for x in tk) / 2**20:,.0f} MiB  "
                  f"(range {min(x['seconds'] for x in tk):.2f}-{max(x['seconds'] for x in tk):.2f} s)")
            print(f"  {'tokenize (no load)':<20} {a0:7.2f} s  {tokens / a0:11,.0f} tokens/s")
            print(f"  {'build-tables':<20} {b:7.2f} s  {tokens / b:11,.0f} tokens/s  "
                  f"peak {max(x['peak_bytes'] for x in bd) / 2**20:,.0f} MiB  "
                  f"(range {min(x['seconds'] for x in bd):.2f}-{max(x['seconds'] for x in bd):.2f} s)")
            print(f"  ratio build-tables / tokenize: {b / a:.2f} (target <= {TARGET_RATIO}); "
                  f"/ tokenize without the load: {b / a0:.2f}")
            pairs = sorted(y["seconds"] / x["seconds"] for x, y in zip(tk, bd))
            print(f"  ratio within each repeat (the two runs back to back, under the same load): median "
                  f"{statistics.median(pairs):.2f}, range {pairs[0]:.2f}-{pairs[-1]:.2f}")
            ca, cb = med(tk, "cpu_seconds"), med(bd, "cpu_seconds")
            print(f"  CPU time (all threads): tokenize {ca:.2f} s, build-tables {cb:.2f} s, ratio {cb / ca:.2f}")


if __name__ == "__main__":
    main()
