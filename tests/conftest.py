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
    from engram_cli.vocab.tokenizer import load_tokenizer

    return load_tokenizer("deepseek")


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """An ``engram.vocab`` artifact of the DeepSeek tokenizer with all steps on."""
    from engram_cli.vocab.normalize import NormalizeVocabConfig, normalize_vocab

    out = tmp_path_factory.mktemp("vocab") / "vocab"
    normalize_vocab(NormalizeVocabConfig(out=out, ablation=False))
    return out


@pytest.fixture(scope="session")
def vocab(vocab_dir):
    from engram_cli.vocab.normalize import load_vocab

    return load_vocab(vocab_dir)


@pytest.fixture(scope="session")
def tiny_tables(tmp_path_factory, vocab_dir) -> Path:
    """A small tables artifact for training tests: one Engram layer (block 1), 2 heads per order,
    8 dims, ~1000 slots, counted on the first two sample addresses (3000 tokens)."""
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.tables.build import BuildTablesConfig, build_tables

    sotu = sorted(str(p) for p in (SAMPLE / "sotu").glob("*.txt"))[:2]
    out = tmp_path_factory.mktemp("tiny_tables") / "tables"
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=out, corpus=CorpusSpec(sotu, max_tokens=3000), layer_ids=(1,),
                                   n_head_per_ngram=2, embed_dim_per_head=8, target_size=1009))
    return out


#: the first two sample addresses: the corpus of the tiny runs
TINY_RUN_CORPUS = sorted(str(p) for p in (SAMPLE / "sotu").glob("*.txt"))[:2]
#: a model small enough that a step takes milliseconds; 3000 tokens of two speeches
TINY_RUN_SETS = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                 "model.moe_num_experts=4", "model.moe_expert_hidden=32", "train.steps=2", "train.batch_size=4",
                 "train.eval_interval=2", "train.eval_batches=1", "train.checkpoint_interval=1",
                 "train.warmup_steps=1", "data.max_tokens=3000", "data.val_chunk_tokens=128", "data.min_count=1"]


@pytest.fixture(scope="session")
def train_tiny_run(tiny_tables):
    """``train_tiny_run(out, *overrides, allocation=None) -> out``: a 2-step run of the tiny model on
    ``TINY_RUN_CORPUS`` with the ``tiny_tables`` (Engram at block 1); checkpoints at steps 1 and 2,
    its token cache in ``out/../cache``."""
    def train_run(out: Path, *extra: str, allocation: float | None = None) -> Path:
        from engram_cli.train import TrainConfig, train

        train(TrainConfig(out=out, tables=tiny_tables, sources=TINY_RUN_CORPUS, overrides=[*TINY_RUN_SETS, *extra],
                          allocation=allocation, cache_dir=out.parent / "cache"))
        return out

    return train_run
