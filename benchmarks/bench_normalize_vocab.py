"""Benchmark: the normalize-vocab core against a plain per-token Python loop.

Both canonicalize every id of the DeepSeek 128k vocabulary with the same steps (decode alone,
U+FFFD fragments keyed raw, NFKC → NFD → strip accents → lowercase → whitespace fold → strip).
The baseline decodes one id at a time and normalizes with ``unicodedata``/``re``/``str`` methods;
the core decodes in one batch (Rust, parallel) and normalizes with HF ``tokenizers``' normalizers.

    python benchmarks/bench_normalize_vocab.py [--repeats 5]

Prints the median time of each, the ratio, and how many keys the two agree on.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
import unicodedata

from engram_cli.vocab.normalize import (
    NormalizeSteps,
    canonical_keys,
    canonical_keys_reference,
    decode_vocabulary,
    group_keys,
)
from engram_cli.vocab.tokenizer import load_tokenizer

_WS = re.compile(r"[ \t\r\n]+")


def baseline(tok) -> list[str]:
    t = tok.tokenizer
    keys = []
    for i in range(tok.vocab_size):
        text = t.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            keys.append(t.id_to_token(i))
            continue
        s = unicodedata.normalize("NFKC", text)
        s = unicodedata.normalize("NFD", s)
        s = "".join(c for c in s if not unicodedata.combining(c))
        s = s.lower()
        s = _WS.sub(" ", s)
        if s != " ":
            s = s.strip()
        keys.append(s if s else text)
    return keys


def core(tok) -> list[str]:
    texts, raw = decode_vocabulary(tok)
    return canonical_keys(texts, raw, NormalizeSteps())


def reference(tok) -> list[str]:
    texts, raw = decode_vocabulary(tok)
    return canonical_keys_reference(texts, raw, NormalizeSteps())


def timed(fn, tok, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(tok)
        group_keys(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = load_tokenizer("deepseek")
    t_base, k_base = timed(baseline, tok, args.repeats)
    t_ref, k_ref = timed(reference, tok, args.repeats)
    t_core, k_core = timed(core, tok, args.repeats)
    assert k_ref == k_core, "batched normalization differs from the per-token reference"
    agree = sum(a == b for a, b in zip(k_base, k_core))
    print(f"vocabulary: {tok.vocab_size:,} ids; {args.repeats} repeats, medians")
    print(f"{'python loop (baseline)':<26} {t_base:8.3f} s")
    print(f"{'per-token HF normalizer':<26} {t_ref:8.3f} s   ({t_base / t_ref:.2f} x)")
    print(f"{'engram core':<26} {t_core:8.3f} s")
    print(f"{'speed-up':<26} {t_base / t_core:8.2f} x")
    print(f"keys equal to the Python loop's: {agree:,}/{len(k_core):,} "
          f"(canonical sizes {max(group_keys(k_base)) + 1:,} vs {max(group_keys(k_core)) + 1:,})")


if __name__ == "__main__":
    main()
