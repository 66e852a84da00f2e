"""Benchmark: one training step with Engram against the same model without it, at equal parameters.

The base model is configs/tiny.toml (4 blocks, width 128, 8 routed experts, top-2, 1 shared) with
a vocabulary the size of the sample data's sub-vocabulary. Three models, all built and stepped in
one process on the same batches of the sample data (real canonical ids, so table rows are hit
with real N-gram frequencies):

* ``moe``     allocation rho = 1: the pure MoE baseline (8 experts, no Engram);
* ``engram``  allocation rho (default 0.75) via ``budget.allocate``: fewer routed experts, the freed
  parameters as Engram table slots (layer 1, orders 2-3, 4 heads x 16 dims, as scripts/pipeline.sh)
  — the same total and (up to Engram's small dense part) activated parameters;
* ``big``     the baseline's 8 experts plus the big tables the tiny run trains with (the
  pipeline's plan: ~4.4M rows, 71M parameters), to show what table size costs.

A step is what the trainer does: forward, backward, dense-gradient clipping, AdamW and (with
Engram) SparseAdam. Steps of the models are interleaved (moe, engram, big, moe, ...) so machine
noise hits them alike; the script prints median step times, the Engram/MoE ratio, and where the
extra time goes (hashing, the Engram module, the sparse optimizer).

    python benchmarks/bench_train_step.py                    # 5 repeats x 10 steps, batch 16 x 128
    python benchmarks/bench_train_step.py --repeats 9 --batch 8 --allocation 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engram_cli.model.budget import allocate  # noqa: E402
from engram_cli.model.transformer import EngramModel, param_counts  # noqa: E402
from engram_cli.tables.plan import make_plan  # noqa: E402
from engram_cli.train import TrainSettings, load_settings, make_optimizers  # noqa: E402


def sample_batches(n: int, B: int, T: int, cache_dir: Path):
    """``n`` training batches of the sample data: (model ids, canonical ids, targets), vocab map, sub-vocab size."""
    from engram_cli.corpus.cache import load_or_build_token_cache
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.train.data import Batches, prepare_data
    from engram_cli.vocab.normalize import NormalizeVocabConfig, load_vocab, normalize_vocab
    from engram_cli.vocab.tokenizer import load_tokenizer

    vocab_dir = cache_dir / "vocab"
    if not vocab_dir.exists():
        normalize_vocab(NormalizeVocabConfig(out=vocab_dir, ablation=False))
    vocab = load_vocab(vocab_dir)
    tok = load_tokenizer("deepseek")
    sources = sorted(glob.glob(str(ROOT / "sample_data" / "sotu" / "*.txt"))) + [str(ROOT / "sample_data" / "zh_classics.jsonl")]
    cache = load_or_build_token_cache(CorpusSpec(sources=sources), tok, vocab, cache_dir, eos_id=1)
    data = prepare_data(cache, vocab.table, val_fraction=0.05, val_chunk_tokens=1024, min_count=2)
    batches = Batches(data, block_size=T, batch_size=B, seed=0)
    out = []
    for s in range(n):
        b = batches.train_batch(s)
        out.append(tuple(torch.from_numpy(a) for a in (b.idx, b.canonical, b.targets)))
    return out, vocab, data.subvocab.size


def step_fn(model, opts, clip: float):
    dense = model.dense_parameters()

    def step(x, c, y):
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        model(x, canonical_ids=c, targets=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, clip)
        for o in opts.values():
            o.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocation", type=float, default=0.75, help="rho of the Engram model (default 0.75)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times --steps steps per model")
    ap.add_argument("--steps", type=int, default=10, help="steps per model per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-big", action="store_true", help="skip the big-tables model")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "engram-bench-cache")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches, vocab, vsize = sample_batches(args.steps, args.batch, args.seq, args.cache_dir)
    base = dataclasses.replace(load_settings(ROOT / "configs" / "tiny.toml").model, vocab_size=vsize,
                               block_size=args.seq)
    canon_pad = int(vocab.table[2])
    template = make_plan(canonical_vocab_size=vocab.canonical_vocab_size, canonical_pad_id=canon_pad,
                         original_vocab_size=vocab.original_vocab_size, layer_ids=(1,), n_head_per_ngram=4,
                         embed_dim_per_head=16, target_sizes=(1000, 1000))
    big_plan = make_plan(canonical_vocab_size=vocab.canonical_vocab_size, canonical_pad_id=canon_pad,
                         original_vocab_size=vocab.original_vocab_size, layer_ids=(1,), n_head_per_ngram=4,
                         embed_dim_per_head=16, target_sizes=(415008, 696294))  # scripts/pipeline.sh's plan
    moe_alloc = allocate(base, template, 1.0)
    eng_alloc = allocate(base, template, args.allocation)
    specs = {"moe": (moe_alloc.config, None), "engram": (eng_alloc.config, eng_alloc.plan)}
    if not args.no_big:
        specs["big"] = (base, big_plan)
    ts = TrainSettings()
    models = {}
    for name, (cfg, plan) in specs.items():
        torch.manual_seed(0)
        m = EngramModel(cfg, plan)
        opts = make_optimizers(m, ts)
        models[name] = (m, opts, step_fn(m, opts, ts.grad_clip))

    for _name, (_m, _, step) in models.items():  # warm up (allocator, optimizer state)
        for x, c, y in batches[:2]:
            step(x, c, y)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.repeats):
        for name, (_, _, step) in models.items():
            t0 = time.perf_counter()
            for x, c, y in batches:
                step(x, c, y)
            times[name].append((time.perf_counter() - t0) / len(batches))

    # where Engram's time goes: hashing alone, and the Engram module's forward
    m_eng = models["engram"][0]
    x, c, y = batches[0]
    hash_t = statistics.median(_timed(lambda: m_eng.engram_slots(c)) for _ in range(20))
    block = m_eng.blocks[m_eng.engram_layer_ids[0]]
    h = torch.randn(x.shape[0], x.shape[1], base.engram_hc_mult, base.n_embd)
    slots = m_eng.engram_slots(c)[m_eng.engram_layer_ids[0]]
    with torch.no_grad():
        engram_fwd = statistics.median(_timed(lambda: block.engram(h, slots)) for _ in range(20))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq} tokens, "
          f"model vocabulary {vsize:,}; {args.repeats} rounds x {args.steps} steps, medians")
    print(f"{'model':8} {'experts':>7} {'table rows':>11} {'total params':>13} {'activated':>10} {'step ms':>9} {'vs moe':>7}")
    base_t = statistics.median(times["moe"])
    for name, (m, _, _) in models.items():
        pc = param_counts(m)
        rows = m.plan.total_slots_all if m.plan is not None else 0
        t = statistics.median(times[name])
        print(f"{name:8} {m.config.moe_num_experts:>7} {rows:>11,} {pc['total']:>13,} {pc['activated']:>10,} "
              f"{t * 1e3:>9.1f} {t / base_t:>7.3f}")
    ratio = statistics.median(times["engram"]) / base_t
    print(f"Engram overhead per step at rho={args.allocation}: {100 * (ratio - 1):+.1f}% (target <= +10%)")
    print(f"  hashing the batch (numpy, per step): {hash_t * 1e3:.2f} ms; Engram module forward: {engram_fwd * 1e3:.2f} ms")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
