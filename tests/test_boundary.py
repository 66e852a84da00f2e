"""The document-boundary rule: counting, shard merging and hashing follow it, and the keys the
model hashes over a corpus are exactly the keys build-tables counted (engram_cli.tables.boundary)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.tables.boundary import Boundary, boundary_ngrams, split_edges, stream_ngrams_reference
from engram_cli.tables.counting import NgramCounter, merge_stats
from engram_cli.tables.hashing import hash_ngrams, hash_ngrams_reference
from engram_cli.tables.kernels import hash_torch
from engram_cli.tables.plan import TablePlan, make_plan

SEP, PAD, V = 1, 2, 40
RULES = ("pad-start", "document")


def docs_with_edge_cases(rng, count=60):
    """Random documents, with empty, one-token and two-token ones among them."""
    docs = [rng.integers(3, V, size=int(rng.integers(0, 30))) for _ in range(count)]
    docs[3], docs[4], docs[5], docs[9] = np.array([], np.int64), np.array([7]), np.array([8, 9]), np.array([7])
    return docs


def counted(stats, n) -> dict[tuple, int]:
    return {tuple(r): int(c) for r, c in zip(stats.ngrams[n].tolist(), stats.counts[n])}


def count(docs, max_n, rule, **kw):
    with NgramCounter(max_n, vocab_size=V, boundary=Boundary(rule, SEP, PAD), **kw) as c:
        c.add_many(docs)
        return c.finish()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("max_n", [2, 3, 4])
def test_counts_equal_the_reference_stream(rule, max_n, monkeypatch):
    from engram_cli.tables import counting

    rng = np.random.default_rng(max_n)
    docs = docs_with_edge_cases(rng)
    want = stream_ngrams_reference(docs, max_n, Boundary(rule, SEP, PAD))
    monkeypatch.setattr(counting, "_EXTRACT_TOKENS", 37)  # many batches: the context is carried over
    stats = count(docs, max_n, rule, buffer_tokens=50)
    for n in range(1, max_n + 1):
        assert counted(stats, n) == dict(Counter(want[n])), (rule, n)
    assert stats.tokens == sum(len(d) + 1 for d in docs if len(d))
    assert stats.boundary == {"rule": rule, "separator": SEP, "pad": PAD}


def test_the_rules_differ_only_where_a_document_starts():
    rng = np.random.default_rng(0)
    docs = docs_with_edge_cases(rng)
    a, b = count(docs, 3, "pad-start"), count(docs, 3, "document")
    assert counted(a, 1) == counted(b, 1)  # the same tokens and separators
    only_a = set(counted(a, 2)) - set(counted(b, 2))
    assert only_a and all(k[0] == SEP for k in only_a)              # "[sep] x": across the boundary
    only_b = set(counted(b, 2)) - set(counted(a, 2))
    assert only_b and all(k[0] == PAD for k in only_b)              # "[pad] x": a restarted document


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shards", [2, 3, 7])
def test_shards_merge_to_the_whole_count(rule, shards):
    rng = np.random.default_rng(shards)
    docs = docs_with_edge_cases(rng, count=40)
    whole = count(docs, 3, rule)
    parts = []
    for i in range(shards):
        with NgramCounter(3, vocab_size=V, boundary=Boundary(rule, SEP, PAD), keep_edges=True) as c:
            c.add_many(docs[i::shards])
            parts.append(c.finish())
    assert all((p.edges is not None) == (rule == "pad-start") for p in parts)
    merged = merge_stats(parts)
    for n in (1, 2, 3):
        assert counted(merged, n) == counted(whole, n)
    assert (merged.tokens, merged.documents) == (whole.tokens, whole.documents)


def test_shards_saved_and_loaded_keep_their_edges(tmp_path):
    from engram_cli.tables.stats import NgramStats

    docs = docs_with_edge_cases(np.random.default_rng(5), count=21)  # shards of 11 and 10 documents
    parts = []
    for i in range(2):
        with NgramCounter(3, vocab_size=V, boundary=Boundary("pad-start", SEP, PAD), keep_edges=True) as c:
            c.add_many(docs[i::2])
            c.finish().save(tmp_path / str(i))
        parts.append(NgramStats.load(tmp_path / str(i)))
    assert counted(merge_stats(parts), 3) == counted(count(docs, 3, "pad-start"), 3)
    with pytest.raises(ArtifactError, match="not the 2 shards"):
        merge_stats([parts[1], parts[0]])  # out of order: the documents cannot interleave
    edges = np.load(tmp_path / "0" / "document_edges.npy")
    np.save(tmp_path / "0" / "document_edges.npy", edges[:-1])
    with pytest.raises(ArtifactError, match="damaged"):
        NgramStats.load(tmp_path / "0")


def test_shards_of_different_rules_are_not_merged():
    docs = [np.array([3, 4, 5])]
    with pytest.raises(ArtifactError, match="boundary"):
        merge_stats([count(docs, 2, "pad-start"), count(docs, 2, "document")])


def test_boundary_ngrams_reads_back_through_short_documents():
    # documents "5 [sep]", "[sep]"-only is impossible (empty documents are dropped), "6 [sep]"
    ids = np.array([5, SEP, 6, SEP, 7, 8, 9, SEP])
    lengths = np.array([2, 2, 4])
    heads, tails = split_edges(ids, lengths, 3)
    cross, context = boundary_ngrams(heads, tails, lengths, 4, context=np.full(3, PAD), pad=PAD)
    assert sorted(tuple(r) for r in cross[4].tolist()) == sorted([
        (PAD, PAD, PAD, 5), (PAD, PAD, 5, SEP),                     # document 0 after the stream's pads
        (PAD, 5, SEP, 6), (5, SEP, 6, SEP),                         # document 1 reads back into document 0
        (SEP, 6, SEP, 7), (6, SEP, 7, 8), (SEP, 7, 8, 9)])          # document 2 reads into 1 and 0
    assert context.tolist() == [8, 9, SEP]


def plan_for(rule: str, max_n: int = 3) -> TablePlan:
    return make_plan(canonical_vocab_size=V, canonical_pad_id=PAD, original_vocab_size=V + 5, layer_ids=(1, 4),
                     max_ngram_size=max_n, n_head_per_ngram=3, target_sizes=(97,) * (max_n - 1), boundary=rule,
                     separator_id=SEP, canonical_separator_id=SEP)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("max_n", [2, 3, 5])
def test_hashing_fast_paths_equal_the_reference(rule, max_n):
    plan = plan_for(rule, max_n)
    rng = np.random.default_rng(max_n)
    for shape in [(4, 50), (1, 9), (3, 1), (2, 2), (70_000,)]:
        ids = rng.integers(0, 6, size=shape)  # ids 0..5: separators everywhere, back to back too
        want = hash_ngrams_reference(ids, plan, 4)
        assert np.array_equal(hash_ngrams(ids, plan, 4), want)
        assert torch.equal(hash_ngrams(torch.from_numpy(ids), plan, 4), torch.from_numpy(want))
        sep = SEP if rule == "document" else None
        got = hash_torch(torch.from_numpy(ids).long(), plan.multipliers[4], plan.primes[4], PAD, sep)
        assert torch.equal(got, torch.from_numpy(want))   # the path tensors on a GPU take


def test_document_rule_hashes_each_document_as_its_own_sequence():
    plan = plan_for("document")
    docs = [np.array([5, 6, 7, SEP]), np.array([8, SEP]), np.array([9, 10, 11, 12, SEP])]
    whole = hash_ngrams(np.concatenate(docs), plan, 1)
    alone = np.concatenate([hash_ngrams(d, plan, 1) for d in docs])
    assert np.array_equal(whole, alone)
    pad_start = hash_ngrams(np.concatenate(docs), dataclasses.replace(plan, boundary="pad-start"), 1)
    assert not np.array_equal(whole, pad_start)


def test_plans_record_and_check_the_rule(tmp_path):
    plan = plan_for("document")
    plan.save(tmp_path / "p.json")
    assert TablePlan.load(tmp_path / "p.json") == plan
    d = json.loads((tmp_path / "p.json").read_text())
    assert (d["boundary"], d["separator_id"], d["canonical_separator_id"]) == ("document", SEP, SEP)
    for bad in ({"boundary": "sentence"}, {"canonical_separator_id": V}, {"separator_id": None}):
        (tmp_path / "bad.json").write_text(json.dumps({**d, **bad}))
        with pytest.raises(ArtifactError):
            TablePlan.load(tmp_path / "bad.json")
    legacy = {k: v for k, v in d.items() if k not in ("boundary", "separator_id", "canonical_separator_id")}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    old = TablePlan.load(tmp_path / "old.json")
    assert (old.boundary, old.separator_id) == ("pad-start", None)
    with pytest.raises(ConfigError, match="needs the document separator"):
        make_plan(canonical_vocab_size=V, canonical_pad_id=PAD, original_vocab_size=V, boundary="document")
    with pytest.raises(ConfigError, match="unknown boundary rule"):
        plan_for("sentences")


@pytest.mark.parametrize("rule", RULES)
def test_the_model_hashes_exactly_the_keys_build_tables_counted(rule, tmp_path, vocab_dir, vocab, deepseek):
    """The acceptance test of the rule: build-tables counts a corpus; the model (its own hashing
    call) reads the training stream of the same corpus as one sequence; per order, the sets of
    slot tuples over all heads are equal (8 heads of ~1000 rows tell these keys apart)."""
    from engram_cli.corpus.cache import load_or_build_token_cache
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.model.config import ModelConfig
    from engram_cli.model.transformer import EngramModel
    from engram_cli.tables.build import BuildTablesConfig, build_tables, load_tables
    from engram_cli.tables.collisions import hash_keys
    from engram_cli.tables.stats import NgramStats
    from engram_cli.vocab.tokenizer import find_eos_id

    corpus = tmp_path / "docs.jsonl"
    texts = ["The state of the union is strong.", "We the people.", "Go", "The people, the union.",
             "天下之本在国", "The union."]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = CorpusSpec([str(corpus)])
    out = tmp_path / "tables"
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=out, corpus=spec, layer_ids=(1,), max_ngram_size=4,
                                   n_head_per_ngram=8, embed_dim_per_head=4, target_size=1000, boundary=rule))
    plan = load_tables(out).plan
    assert plan.boundary == rule
    stats = NgramStats.load(out / "ngrams")

    cache = load_or_build_token_cache(spec, deepseek, vocab, tmp_path / "cache", eos_id=find_eos_id(deepseek.tokenizer))
    stream = torch.from_numpy(vocab.table[np.asarray(cache.stream)].astype(np.int64))[None, :]  # (1, T)
    model = EngramModel(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=stream.shape[1],
                                    moe_num_experts=2, moe_expert_hidden=8), plan)
    slots = model.engram_slots(stream)[1][0]                          # (T, H) as the model hashes them
    H = plan.n_head_per_ngram
    for n in range(2, 5):
        model_keys = {tuple(r) for r in slots[:, (n - 2) * H:(n - 1) * H].tolist()}
        table_keys = {tuple(r) for r in hash_keys(stats.ngrams[n], plan, 1, n).T.tolist()}
        assert model_keys == table_keys, (rule, n)
        assert len(table_keys) == stats.ngrams[n].shape[0]            # no two counted keys share all heads
    assert stats.tokens == stream.shape[1]


# ---------------------------------------------------------------------------------------------
# bad input: one clear line


def invoke(*args: str):
    from typer.testing import CliRunner

    from engram_cli.cli import app

    return CliRunner().invoke(app, list(args))


def test_unknown_rule_is_one_red_line(tmp_path, vocab_dir):
    from cli_asserts import one_red_line

    one_red_line(invoke("build-tables", "sample_data/sentences.txt", "--vocab", str(vocab_dir), "-o",
                        str(tmp_path / "t"), "--boundary", "sentence"), "unknown boundary rule", "pad-start")
    assert not (tmp_path / "t").exists()


def test_a_run_must_use_the_tables_separator_and_rule(tmp_path, vocab_dir, tiny_tables):
    from conftest import TINY_RUN_CORPUS, TINY_RUN_SETS

    from cli_asserts import one_red_line

    sets = [a for s in TINY_RUN_SETS for a in ("--set", s)]
    r = invoke("train", *TINY_RUN_CORPUS, "-T", str(tiny_tables), "-o", str(tmp_path / "r"), *sets,
               "--set", "data.eos_token=<｜begin▁of▁sentence｜>")
    one_red_line(r, "separator id 0", "separator id 1", "data.eos_token")
    from engram_cli.core.errors import EngramError
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.tables.build import BuildTablesConfig, build_tables
    from engram_cli.train import TrainConfig, train

    def tables(rule: str) -> None:
        build_tables(BuildTablesConfig(vocab=vocab_dir, out=tmp_path / "tables", corpus=CorpusSpec(TINY_RUN_CORPUS,
                     max_tokens=3000), layer_ids=(1,), n_head_per_ngram=2, embed_dim_per_head=8, target_size=1009,
                     boundary=rule, force=True))

    def run(**kw) -> None:
        train(TrainConfig(out=tmp_path / "run", tables=tmp_path / "tables", sources=TINY_RUN_CORPUS,
                          overrides=list(TINY_RUN_SETS), cache_dir=tmp_path / "cache", **kw))

    tables("pad-start")
    run()
    tables("document")  # the tables rebuilt under the other rule, then the run resumed
    with pytest.raises(EngramError, match="trained under the pad-start boundary rule.*follow document"):
        run(resume=True)


def test_eval_buckets_read_contexts_as_the_model_hashes_them():
    """engram eval's count buckets key on the n-gram the model reads: under the document rule the
    context before a document's start is pads (``context_ngrams`` / ``training_ngram_counts``)."""
    from engram_cli.eval.buckets import context_ngrams, training_ngram_counts

    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12])]
    stream = np.concatenate([np.append(d, SEP) for d in docs])
    identity = np.arange(V)
    for rule, restart in (("pad-start", None), ("document", (SEP, PAD))):
        want = stream_ngrams_reference(docs, 3, Boundary(rule, SEP, PAD))[3]
        grams, valid = context_ngrams(stream, np.arange(stream.size), identity, 3, restart)
        assert [tuple(g) for g in grams[valid].tolist()] == want[2:]   # positions with two tokens before
        ngrams, counts = training_ngram_counts(stream, [(0, stream.size)], identity, 3, V, restart=restart)
        assert dict(zip(map(tuple, ngrams.tolist()), counts.tolist())) == dict(Counter(want[2:]))
