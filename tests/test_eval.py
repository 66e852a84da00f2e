"""engram eval: knockout, bucket losses adding up, exact training counts, bits per byte, CLI, errors.

Two tiny runs are trained once per module with ``conftest.train_tiny_run`` (2 steps on 3000
tokens; a quarter of the stream held out): one with Engram at block 1 and a pure-MoE baseline.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engram_cli import eval as E
from engram_cli.core.errors import ConfigError
from engram_cli.corpus.spec import CorpusSpec
from engram_cli.train.runs import load_run

from cli_asserts import one_red_line

HELD_OUT = "data.val_fraction=0.25"  # 6 held-out chunks of 128 tokens: ~760 scored tokens
TEXT = "Hello wörld, the memory pays.\nThe 2 cities 北京 and 上海; 𠀀 is rare.\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny_run) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("eval") / "run", HELD_OUT)


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory, train_tiny_run) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("eval") / "baseline", HELD_OUT, allocation=1.0)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, verify=False)


@pytest.fixture(scope="module")
def result(run_dir) -> E.EvalResult:
    return E.evaluate(E.EvalConfig(runs=[run_dir], knockout="engram"))


def invoke(*args: str):
    from engram_cli.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def heldout_windows(run):
    split = E.training_split(run)
    return split, E.plan_windows(E.heldout_text(run, split).ranges, run.block_size)


# ---------------------------------------------------------------------------------------------
# knockout


@pytest.mark.parametrize("reference_module", [False, True])
def test_knockout_of_a_zero_value_projection_changes_nothing(run, reference_module):
    torch.manual_seed(0)
    from engram_cli.model.transformer import EngramModel

    model = EngramModel(replace(run.model_config, engram_reference_module=reference_module), run.plan).eval()
    model.load_state_dict(run.model.state_dict(), strict=False)  # the trained weights (the reference module has W_V/W_K biases too)
    for layer in run.layer_ids:
        w_v = model.blocks[layer].engram.value_proj
        torch.nn.init.zeros_(w_v.weight)
        if w_v.bias is not None:
            torch.nn.init.zeros_(w_v.bias)
    zero = replace(run, model=model)
    split, windows = heldout_windows(zero)
    on = E.token_losses(zero, split.stream, windows)
    off = E.token_losses(zero, split.stream, windows, knockout=True)
    assert np.array_equal(on, off) and on.size == E.target_positions(windows).size


def test_knockout_is_the_backbone_alone(run):
    from engram_cli.model.transformer import EngramModel

    backbone = EngramModel(run.model_config, None).eval()
    missing, unexpected = backbone.load_state_dict(run.model.state_dict(), strict=False)
    assert not missing and unexpected and all(".engram." in k for k in unexpected)
    split, windows = heldout_windows(run)
    alone = E.token_losses(replace(run, model=backbone, plan=None), split.stream, windows[:4])
    assert np.allclose(E.token_losses(run, split.stream, windows[:4], knockout=True), alone, rtol=0, atol=1e-6)


def test_knockout_switches_the_memory_off_and_back_on(run):
    split, windows = heldout_windows(run)
    before = E.token_losses(run, split.stream, windows[:4])
    with run.model.engram_knockout():
        assert all(run.model.blocks[i].engram.knocked_out for i in run.layer_ids)
        inside = E.token_losses(run, split.stream, windows[:4])
    assert not any(run.model.blocks[i].engram.knocked_out for i in run.layer_ids)
    assert not np.allclose(before, inside)  # the trained memory contributes something
    assert np.array_equal(E.token_losses(run, split.stream, windows[:4]), before)
    assert np.array_equal(E.token_losses(run, split.stream, windows[:4], knockout=True), inside)
    assert "knocked_out" not in " ".join(run.model.state_dict())  # not part of a checkpoint


# ---------------------------------------------------------------------------------------------
# what is scored, and how it adds up


def test_heldout_split_is_rebuilt_as_training_split_it(run, result):
    from engram_cli.train.data import split_stream

    r = result.runs[0]
    split = E.training_split(run)
    expected = split_stream(split.stream.shape[0], 0.25, 128)
    assert split.val == expected.val and split.train == expected.train and split.val
    assert r.tokens == sum(b - a - 1 for a, b in expected.val) and r.text == "held-out"
    assert r.windows == sum(math.ceil((b - a - 1) / run.block_size) for a, b in expected.val)
    assert r.train_tokens == expected.train_tokens
    assert r.loss_ci95[0] < r.loss < r.loss_ci95[1] and r.delta_ci95[0] < r.delta < r.delta_ci95[1]


def test_without_its_token_cache_the_split_is_rebuilt_only_from_the_same_corpus(run, tmp_path):
    from engram_cli.core.errors import ArtifactError

    cached = E.training_split(run)
    rebuilt = E.training_split(run, cache_dir=tmp_path / "cache")  # no entry there: tokenized again
    assert np.array_equal(rebuilt.stream, cached.stream) and rebuilt.val == cached.val
    assert rebuilt.cache.startswith(str(tmp_path / "cache"))
    manifest = json.loads(json.dumps(run.manifest))
    manifest["inputs"]["corpus"]["corpus_sha256"] = "0" * 64  # as if the files had changed since
    with pytest.raises(ArtifactError, match="changed since training"):
        E.training_split(replace(run, manifest=manifest), cache_dir=tmp_path / "elsewhere")


@pytest.mark.parametrize("kind", ["count", "script"])
def test_bucket_losses_weighted_by_tokens_equal_the_overall_loss(result, kind):
    r = result.runs[0]
    got = [b for b in r.buckets if b.kind == kind and b.tokens]
    assert sum(b.tokens for b in r.buckets if b.kind == kind) == r.tokens
    for field, overall in (("loss", r.loss), ("knockout_loss", r.knockout_loss), ("delta", r.delta)):
        assert sum(b.tokens * getattr(b, field) for b in got) / r.tokens == pytest.approx(overall, rel=1e-12)
    assert r.bucket("all", "all").loss == pytest.approx(r.loss, rel=1e-12)


def test_training_counts_equal_a_brute_force_counter(run, result):
    split = E.training_split(run)
    canon = run.vocab.table
    stream = np.asarray(split.stream)
    for n in (1, 2, 3):
        brute = Counter(tuple(canon[stream[i:i + n]]) for a, b in split.train for i in range(a, b - n + 1))
        grams, counts = E.training_ngram_counts(split.stream, split.train, canon, n, run.vocab.canonical_vocab_size)
        assert dict(zip(map(tuple, grams.tolist()), counts.tolist())) == brute
    # the counts behind the buckets: every scored target's 3-gram looked up in the brute-force counter
    _, windows = heldout_windows(run)
    pos = E.target_positions(windows)
    queries, valid = E.context_ngrams(split.stream, pos, canon, 3)
    looked_up = np.where(valid, E.lookup_counts(grams, counts, queries, run.vocab.canonical_vocab_size), 0)
    expected = [brute.get(tuple(canon[stream[p - 2:p + 1]]), 0) if p >= 2 else 0 for p in pos]
    assert looked_up.tolist() == expected and 0 < np.count_nonzero(looked_up) < pos.size
    per_bucket = np.bincount(E.count_buckets(np.array(expected)), minlength=len(E.COUNT_BUCKETS))
    assert [result.runs[0].bucket("count", b).tokens for b in E.COUNT_BUCKETS] == per_bucket.tolist()


def test_count_buckets_and_scripts():
    assert E.count_buckets(np.array([0, 1, 2, 9, 10, 99, 100, 5000])).tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    assert [E.SCRIPT_BUCKETS[E.script_of(t)] for t in (" the", "北京", "2024", ", ", "\n", "", "\ufffd", " Ωμέγα")] \
        == ["Latin", "CJK", "digits & punctuation", "digits & punctuation", "other", "other", "other", "other"]


def test_confidence_interval_of_equal_windows_is_the_textbook_one():
    rng = np.random.default_rng(0)
    means = rng.normal(5.0, 0.5, size=40)
    mean, lo, hi = E.mean_ci95(means * 32, np.full(40, 32))
    se = means.std(ddof=1) / math.sqrt(40)
    assert mean == pytest.approx(means.mean()) and (lo, hi) == pytest.approx((mean - 1.96 * se, mean + 1.96 * se), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# collision exposure


def tiny_plan(**kw):
    from engram_cli.tables.plan import make_plan

    return make_plan(canonical_vocab_size=12, canonical_pad_id=0, original_vocab_size=12, layer_ids=(0,),
                     max_ngram_size=3, n_head_per_ngram=2, **kw)


def grams(*rows):
    return np.array(rows, dtype=np.int64)


def test_exposure_of_a_one_row_plan_by_hand():
    # one row per head: every n-gram of an order shares it with every other, so a head of order n
    # exposes a position unless its n-gram is (one of) the most frequent of that order
    plan = tiny_plan(target_sizes=(1, 1), single_row=True)
    train = {2: (grams([1, 2], [2, 3], [3, 1], [2, 4]), np.array([3, 2, 2, 1])),
             3: (grams([1, 2, 3], [2, 3, 1], [3, 1, 2]), np.array([2, 2, 1]))}   # a tie at the top of order 3
    read = {2: grams([1, 2], [2, 3], [5, 6], [1, 2]), 3: grams([1, 2, 3], [3, 1, 2], [7, 7, 7], [9, 9, 9])}
    # (1,2) is the most frequent bigram and (1,2,3) ties for the top: 0; (2,3) and (3,1,2) are beaten: 2 + 2;
    # unseen n-grams are beaten by any training n-gram: 2 + 2; the most frequent bigram, an unseen trigram: 0 + 2
    assert E.collision_exposure(read, train, plan, 0, 12).tolist() == [0, 4, 4, 2]
    assert E.exposure_buckets(plan) == ("0", "1", "2", "3", "4")


def test_exposure_equals_a_brute_force_over_tiny_prime_tables():
    from engram_cli.tables.hashing import hash_ngrams_reference

    plan = tiny_plan(target_sizes=(2, 3))
    assert all(p <= 7 for order in plan.primes[0] for p in order)  # tables of 2..7 rows: collisions everywhere
    rng = np.random.default_rng(0)
    train, read = {}, {}
    for n in (2, 3):
        uniq = np.unique(rng.integers(1, 6, size=(40, n)), axis=0)
        train[n] = (uniq, rng.integers(1, 5, size=uniq.shape[0]))  # ties are frequent
        read[n] = np.concatenate([uniq[:10], rng.integers(1, 8, size=(30, n))])  # seen and (often) unseen

    def slot(g, head):
        n = len(g)
        return int(hash_ngrams_reference(np.array([g]), plan, 0)[0, n - 1, (n - 2) * 2 + head])

    expected = np.zeros(40, dtype=np.int64)
    for n in (2, 3):
        counts = {tuple(g): c for g, c in zip(train[n][0].tolist(), train[n][1].tolist())}
        for i, q in enumerate(map(tuple, read[n].tolist())):
            own = counts.get(q, 0)
            for head in range(2):
                s = slot(q, head)
                expected[i] += any(g != q and c > own and slot(g, head) == s for g, c in counts.items())
    got = E.collision_exposure(read, train, plan, 0, 12)
    assert got.tolist() == expected.tolist() and len(set(got.tolist())) > 2


@pytest.mark.parametrize("boundary", ["pad-start", "document"])
def test_read_ngrams_hash_to_the_rows_the_model_reads(boundary):
    """The n-grams behind the exposure are those the model hashes: window by window, pad before the
    window's start, and under the document rule before the document's start."""
    from engram_cli.tables.hashing import hash_ngrams

    plan = tiny_plan(target_sizes=(101, 103), boundary=boundary, separator_id=11, canonical_separator_id=11)
    rng = np.random.default_rng(1)
    stream = rng.integers(1, 11, size=200)
    stream[rng.choice(200, 12, replace=False)] = 11  # separators
    canonical = np.arange(12)
    windows = E.plan_windows(((0, 120), (120, 200)), 16)
    lengths = windows[:, 1] - windows[:, 0]
    model = np.concatenate([hash_ngrams(canonical[stream[s:e]][None], plan, 0)[0] for s, e in windows])  # (P, H)
    for n in (2, 3):
        read = E.read_ngrams(stream, windows, canonical, n, plan.canonical_pad_id,
                             (11, plan.canonical_pad_id) if plan.restarts else None)
        assert read.shape == (int(lengths.sum()), n)
        assert np.array_equal(E.ngram_slots(read, plan, 0), model[:, (n - 2) * 2:(n - 1) * 2])
    assert (read == plan.canonical_pad_id).any()  # the window starts read pad


def test_exposure_buckets_of_a_run(run, result):
    r = result.runs[0]
    assert r.exposure_layer == run.layer_ids[0] == 1 and r.exposure_heads == run.plan.total_heads == 4
    got = [b for b in r.buckets if b.kind == "exposure"]
    assert [b.bucket for b in got] == ["0", "1", "2", "3", "4"]
    assert sum(b.tokens for b in got) == r.tokens and sum(1 for b in got if b.tokens) >= 2
    for field, overall in (("loss", r.loss), ("delta", r.delta)):
        assert sum(b.tokens * getattr(b, field) for b in got if b.tokens) / r.tokens == pytest.approx(overall, rel=1e-12)
    assert all(b.delta_ci95[0] <= b.delta <= b.delta_ci95[1] for b in got if b.tokens > 1)


# ---------------------------------------------------------------------------------------------
# tables at serving precision


@pytest.mark.parametrize("dtype,close", [("bf16", 0.01), ("fp8-e4m3", 0.05)])
def test_table_dtype_scores_the_stored_tables_beside_fp32(run_dir, result, dtype, close):
    res = E.evaluate(E.EvalConfig(runs=[run_dir], table_dtype=dtype))
    r, ref = res.runs[0], result.runs[0]
    assert res.table_dtype == r.table_dtype == dtype and r.loss == ref.loss  # the fp32 score is unchanged
    assert math.isfinite(r.quant_loss) and abs(r.quant_delta) < close and r.quant_delta != 0
    assert r.quant_delta == pytest.approx(r.quant_loss - r.loss, abs=1e-12)
    assert r.quant_delta_ci95[0] <= r.quant_delta <= r.quant_delta_ci95[1]
    for kind in ("count", "exposure"):
        got = [b for b in r.buckets if b.kind == kind and b.tokens]
        assert sum(b.tokens * b.quant_delta for b in got) / r.tokens == pytest.approx(r.quant_delta, rel=1e-9)
    assert [(e["layer"], e["head"], e["order"]) for e in r.quant_errors] == [(1, 0, 2), (1, 1, 2), (1, 2, 3), (1, 3, 3)]
    assert all(0 < e["rel_l2"] < (0.07 if dtype == "fp8-e4m3" else 0.005) for e in r.quant_errors)


def test_quantized_tables_change_the_losses_and_come_back(run):
    from engram_cli.model.quant import quantized_tables

    before = [w.detach().clone() for w in run.model.engram_table_parameters()]
    split, windows = heldout_windows(run)
    fp32 = E.token_losses(run, split.stream, windows[:4])
    with quantized_tables(run.model, "fp8-e4m3"):
        fp8 = E.token_losses(run, split.stream, windows[:4])
    assert not np.array_equal(fp8, fp32) and np.allclose(fp8, fp32, atol=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.engram_table_parameters()))
    assert np.array_equal(E.token_losses(run, split.stream, windows[:4]), fp32)


def test_cli_table_dtype(run_dir, tmp_path):
    import pyarrow.parquet as pq

    r = invoke(str(run_dir), "--table-dtype", "fp8-e4m3", "--max-windows", "4", "--out", str(tmp_path / "ev"),
               "--quiet")
    assert r.exit_code == 0, r.output
    assert "fp8-e4m3 Δ" in r.stdout and "tables at fp8-e4m3: relative L2 error" in r.stdout
    table = pq.read_table(tmp_path / "ev" / E.BUCKETS_FILE).to_pylist()
    assert {x["table_dtype"] for x in table} == {"fp8-e4m3"} and all(x["quant_loss"] is not None for x in table
                                                                    if x["tokens"])
    data = json.loads(invoke(str(run_dir), "--table-dtype", "bf16", "--max-windows", "4", "--json").stdout)
    assert data["table_dtype"] == "bf16" and data["runs"][0]["quant_delta"] is not None
    assert all("quant_delta" in b for b in data["runs"][0]["buckets"])


# ---------------------------------------------------------------------------------------------
# bits per byte


def test_bits_per_byte_by_hand(run_dir, run, tmp_path):
    assert E.bits_per_byte(10.0, 5) == pytest.approx(10.0 / math.log(2) / 5)
    ids = np.asarray(run.tokenizer.tokenizer.encode(TEXT, add_special_tokens=False).ids)
    stream = np.concatenate([[run.separator_id], ids, [run.separator_id]])
    pos = np.arange(1, stream.size)  # every token and the closing separator (no bytes)
    assert E.utf8_bytes(run.tokenizer, stream, pos) == len(TEXT.encode("utf-8")) == 77
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    res = E.evaluate(E.EvalConfig(runs=[run_dir], corpus=CorpusSpec([str(tmp_path / "t.txt")])))
    r = res.runs[0]
    assert r.text == "corpus" and r.tokens == ids.size + 1 and r.bytes == 77
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / math.log(2) / 77, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_end_to_end(run_dir, baseline_dir, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = tmp_path / "ev"
    r = invoke(str(run_dir), "--knockout", "engram", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert "Loss on its own held-out split" in r.stdout and "≥100" in r.stdout and "no Engram" in r.stdout
    assert {p.name for p in out.iterdir()} == set(E.FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]  # no temp directories left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "engram.eval" and manifest["summary"]["knockout"] == "engram"
    table = pq.read_table(out / E.BUCKETS_FILE)
    assert table.column_names == ["run", "step", "run_dir", "kind", "bucket", "tokens", "loss", "knockout_loss",
                                  "delta", "delta_lo", "delta_hi", "table_dtype", "quant_loss", "quant_delta",
                                  "quant_delta_lo", "quant_delta_hi"]
    assert table.num_rows == 1 + len(E.COUNT_BUCKETS) + len(E.SCRIPT_BUCKETS) + 5  # exposure 0..4 (2 heads x 2 orders)
    exposure = table.filter(pc.equal(table["kind"], "exposure")).to_pylist()
    assert [x["bucket"] for x in exposure] == ["0", "1", "2", "3", "4"]
    assert all(x["delta_lo"] <= x["delta"] <= x["delta_hi"] for x in exposure if x["tokens"] > 1)
    assert "Loss by collision exposure: heads of layer 1" in r.stdout
    r = invoke(str(run_dir), str(baseline_dir), "--json", "--max-windows", "5")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [x["model"] for x in data["runs"]] == ["run", "baseline"] and data["bucket_n"] == 3
    assert [x["windows"] for x in data["runs"]] == [5, 5] and [x["engram_layers"] for x in data["runs"]] == [[1], []]


# ---------------------------------------------------------------------------------------------
# bad input: one clear line each


def test_error_not_a_run_or_without_a_checkpoint(run_dir, tmp_path):
    one_red_line(invoke(str(tmp_path / "nope")), "does not exist", "engram train")
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    shutil.rmtree(copy / "ckpt")
    one_red_line(invoke(str(copy)), "ckpt")


def test_error_empty_corpus(run_dir, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n")
    one_red_line(invoke(str(run_dir), str(tmp_path / "blank.txt")), "corpus is empty")


def test_error_knockout_of_a_pure_moe_run(run_dir, baseline_dir):
    one_red_line(invoke(str(run_dir), str(baseline_dir), "--knockout", "engram"), "has no Engram layers")
    one_red_line(invoke(str(run_dir), "--knockout", "experts"), "unknown knockout")


def test_error_table_dtype_unknown_or_without_tables(run_dir, baseline_dir):
    one_red_line(invoke(str(run_dir), "--table-dtype", "fp16"), "unknown table dtype 'fp16'", "fp8-e4m3")
    one_red_line(invoke(str(run_dir), str(baseline_dir), "--table-dtype", "fp8-e4m3"), "no tables to quantize")


def test_error_bucket_n_beyond_the_plan(run_dir):
    one_red_line(invoke(str(run_dir), "--bucket-n", "4"), "larger than the table plan", "--bucket-n 3")


def test_error_runs_of_different_tokenizers(run_dir, baseline_dir, monkeypatch):
    import engram_cli.eval.report
    import engram_cli.train.runs

    real = engram_cli.train.runs.load_run

    def load(path, *args, **kwargs):
        loaded = real(path, *args, **kwargs)
        other = replace(loaded.tokenizer, fingerprint="e" * 64)
        return replace(loaded, tokenizer=other) if Path(path) == baseline_dir else loaded

    monkeypatch.setattr(engram_cli.eval.report, "load_run", load)
    one_red_line(invoke(str(run_dir), str(baseline_dir)), "different tokenizers")
    with pytest.raises(ConfigError, match="different tokenizers"):
        E.evaluate(E.EvalConfig(runs=[run_dir, baseline_dir]))
