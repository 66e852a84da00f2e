"""Shared fixtures: the real DeepSeek tokenizer and its vocab artifact, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"

os.environ.setdefault("COLUMNS", "120")  # stable Rich rendering in CliRunner output
os.environ.pop("ENGRAM_DEBUG", None)


@pytest.fixture(scope="session")
def deepseek():
    """The bundled DeepSeek 128k tokenizer (LoadedTokenizer)."""
    from engram_cli.tokenizer import load_tokenizer

    return load_tokenizer("deepseek")


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """An ``engram.vocab`` artifact of the DeepSeek tokenizer with all steps on."""
    from engram_cli.vocab import NormalizeVocabConfig, normalize_vocab

    out = tmp_path_factory.mktemp("vocab") / "vocab"
    normalize_vocab(NormalizeVocabConfig(out=out, ablation=False))
    return out


@pytest.fixture(scope="session")
def vocab(vocab_dir):
    from engram_cli.vocab import load_vocab

    return load_vocab(vocab_dir)


@pytest.fixture(scope="session")
def tiny_tables(tmp_path_factory, vocab_dir) -> Path:
    """A small tables artifact for training tests: one Engram layer (block 1), 2 heads per order,
    8 dims, ~1000 slots, counted on the first two sample addresses (3000 tokens)."""
    from engram_cli.corpus import CorpusSpec
    from engram_cli.tables import BuildTablesConfig, build_tables

    sotu = sorted(str(p) for p in (SAMPLE / "sotu").glob("*.txt"))[:2]
    out = tmp_path_factory.mktemp("tiny_tables") / "tables"
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=out, corpus=CorpusSpec(sotu, max_tokens=3000), layer_ids=(1,),
                                   n_head_per_ngram=2, embed_dim_per_head=8, target_size=1009))
    return out
