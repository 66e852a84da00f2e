"""inspect-tables: the rows of a trained memory against their initial values, the counts laid over
them, every view of the whole-table report, the --ngram / --row queries with the logit lens, the
CLI end to end, and one test per bad input.

A tiny run (conftest's ``train_tiny_run``: 2 steps, Engram at block 1, 2 heads per order, ~1009
slots per head) is trained once for this module.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from engram_cli import inspect_tables as I
from engram_cli.cli import app
from engram_cli.core.errors import ArtifactError, ConfigError
from engram_cli.inspect_tables import rows as R
from engram_cli.tables.build import NGRAMS_DIR, load_tables
from engram_cli.tables.hashing import hash_ngrams
from engram_cli.tables.stats import NgramStats
from engram_cli.train.runs import load_run

from cli_asserts import one_red_line

runner = CliRunner()
LAYER = 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_tiny_run) -> Path:
    # a "module" run (tables in model.safetensors); store runs: tests/test_store_train.py
    return train_tiny_run(tmp_path_factory.mktemp("inspect_tables") / "run", "train.table_store=module")


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, with_model=False, verify=False)


@pytest.fixture(scope="module")
def layer(run, tiny_tables):
    return I.layer_ngrams(NgramStats.load(Path(tiny_tables) / NGRAMS_DIR), run.plan, LAYER)


@pytest.fixture(scope="module")
def report(run_dir):
    return I.inspect_tables(I.InspectTablesConfig(run=run_dir, block_rows=300))


def full_table(run) -> np.ndarray:
    return load_file(str(run.checkpoint.path / "model.safetensors"))[I.table_key(LAYER)].numpy()


# ---------------------------------------------------------------------------------------------
# rows: trained, initial, updated


def test_initial_rows_are_the_trainers_exactly(run):
    """A row the optimizer never updated still holds its initial value bit for bit; every updated row moved."""
    w = full_table(run)
    w0 = I.initial_rows(run, LAYER, slice(None))
    upd = I.updated_rows(run, LAYER, w.shape[0])
    assert w0.shape == w.shape and 0 < upd.sum() < w.shape[0]
    assert np.array_equal(w[~upd], w0[~upd])
    assert (np.linalg.norm(w[upd] - w0[upd], axis=1) > 0).all()


def test_initial_rows_leave_the_callers_generator_alone(run_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fresh = load_run(run_dir, with_model=False, verify=False)
    R._INITIAL.clear()  # rebuild the model: draws from a forked generator
    I.initial_rows(fresh, LAYER, slice(0, 2))
    assert torch.equal(torch.rand(3), expected)


def test_untrained_state_has_no_movement(run, tmp_path):
    """At a step-0 state (the checkpoint's tables replaced by the trainer's initial tables) nothing moved."""
    w0 = I.initial_rows(run, LAYER, slice(None))
    ln = I.layer_ngrams(NgramStats.load(Path(run.config["run"]["tables"]) / NGRAMS_DIR), run.plan, LAYER)

    class InitialTable:  # the table provider at step 0
        def shape(self, layer):
            return w0.shape

        def read(self, layer, a, b):
            return w0[a:b]

    s = I.survey_layer(run, InitialTable(), ln, run.vocab, block_rows=500, top=3, sharing=2, duplicate_rows=64,
                       duplicate_cosine=0.95)
    assert (s.movement == 0).all() and s.top_rows == []


def test_table_rows_reads_slices(run):
    w = full_table(run)
    with I.TableRows(run) as t:
        assert t.shape(LAYER) == w.shape
        assert np.array_equal(t.read(LAYER, 5, 17), w[5:17])


# ---------------------------------------------------------------------------------------------
# the counts over the rows


def test_layer_ngrams_loads_match_the_hash(run, layer, tiny_tables):
    stats = NgramStats.load(Path(tiny_tables) / NGRAMS_DIR)
    for h in layer.heads:
        load = layer.load[h.offset:h.offset + h.size]
        assert load.sum() == stats.distinct(h.n)
        assert layer.count[h.offset:h.offset + h.size].sum() == stats.total(h.n)
    # the slots are hash_ngrams' at the last position of each n-gram
    keys = stats.ngrams[3][:50]
    ref = np.asarray(hash_ngrams(keys, run.plan, LAYER))[:, -1, :]
    for h in (hh for hh in layer.heads if hh.n == 3):
        assert np.array_equal(layer.head_slots(h.head)[:50], ref[:, h.head])


# ---------------------------------------------------------------------------------------------
# the whole-table report


def test_streaming_equals_the_whole_table(run, report):
    """Blocks of 300 rows (heads are ~1009) give what the whole table computed at once gives."""
    w, w0 = full_table(run), I.initial_rows(run, LAYER, slice(None))
    s = report.layers[0]
    np.testing.assert_allclose(s.norm, np.linalg.norm(w, axis=1), rtol=1e-6)
    np.testing.assert_allclose(s.movement, np.linalg.norm(w - w0, axis=1), rtol=1e-6, atol=0)
    upd = I.updated_rows(run, LAYER, w.shape[0])
    for h in s.heads:
        rows = slice(run.plan.head_offsets(LAYER)[h.head], run.plan.head_offsets(LAYER)[h.head] + h.rows)
        x = w[rows][upd[rows]].astype(np.float64)
        sv = np.linalg.svd(x, compute_uv=False)
        np.testing.assert_allclose(h.singular_values, sv, rtol=1e-6, atol=1e-9)
        assert h.updated == upd[rows].sum()
        assert h.addressed + h.never_touched + h.updated_not_addressed == h.rows
        assert h.load_1 + h.load_2 + h.load_3plus == h.addressed
        assert h.count_share_1 + h.count_share_2 + h.count_share_3plus == pytest.approx(1.0)


def test_serving_precision_errors_streamed_equal_the_whole_table(run, report):
    """The per-head bf16 / fp8 errors, accumulated over blocks of 300 rows, equal the quantizer's
    figures for each head's whole table (issue: can these tables be served in fp8?)."""
    import torch

    from engram_cli.model.quant import head_quantization_errors

    w = torch.from_numpy(full_table(run))
    heads = report.layers[0].heads
    sizes = [h.rows for h in heads]
    for dtype, rel, mx in (("bf16", "bf16_rel_l2", "bf16_max_abs"), ("fp8-e4m3", "fp8_rel_l2", "fp8_max_abs")):
        for h, (want_rel, want_max) in zip(heads, head_quantization_errors(w, sizes, dtype)):
            assert getattr(h, rel) == pytest.approx(want_rel, rel=1e-9) and getattr(h, mx) == pytest.approx(want_max)
    assert all(0 < h.bf16_rel_l2 < h.fp8_rel_l2 < 0.1 for h in heads)  # fp8 loses more than bf16, both little


def test_report_reuses_the_collision_measurement(report):
    assert report.collision_check.startswith("matches build-tables' measurement (4 heads)")


def test_frequency_bins(report):
    assert I.count_bin(np.array([0, 1, 2, 3, 4, 7, 8, 1000])).tolist() == [0, 1, 2, 2, 3, 3, 4, 10]
    s = report.layers[0]
    assert sum(r["rows"] for r in s.frequency) == s.norm.shape[0]
    by = {(r["n"], r["count_range"]): r for r in s.frequency}
    assert by[(2, "0")]["updated_share"] < by[(2, "4–7")]["updated_share"]  # frequent rows get trained


def test_spectrum_and_duplicates_helpers():
    assert I.effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert I.effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    x = np.array([[1.0, 0], [2.0, 0.01], [0, 1.0]])
    assert I.near_duplicates(x, 0.99) == 2 and I.near_duplicates(x[:1], 0.99) == 0


def test_top_rows_hold_their_ngrams(report, run):
    tops = report.layers[0].top_rows
    assert tops and all(r["movement"] > 0 for r in tops)
    for r in tops[:4]:
        ids = np.array([g["ids"] for g in r["ngrams"]])
        if ids.size:
            slots = np.asarray(hash_ngrams(ids, replace(run.plan, boundary="pad-start"), LAYER))[:, -1, r["head"]]
            assert (slots == r["slot"]).all()
    moves = [r["movement"] for r in tops if r["head"] == 0]
    assert moves == sorted(moves, reverse=True)


# ---------------------------------------------------------------------------------------------
# queries and the logit lens


def test_ngram_query_and_lens(run_dir):
    res = I.inspect_tables(I.InspectTablesConfig(run=run_dir, ngrams=[" of the"], top=5))
    q = res.queries[0]
    run = load_run(run_dir, device="cpu")
    canon = np.asarray(run.vocab(np.array(q["ids"])))
    slots = np.asarray(hash_ngrams(canon, run.plan, LAYER))[-1]
    lay = q["layers"][0]
    assert [h["slot"] for h in lay["heads"]] == [int(slots[h]) for h in (0, 1)]  # only order 2 is formed
    assert lay["heads"][0]["own_count"] > 0 and lay["heads"][0]["ngrams"][0]["ngram"] == "of the"
    # the lens against the model itself: W_V(e) -> final norm -> LM head
    model = run.model
    eng = model.blocks[LAYER].engram
    e = eng.tables(torch.as_tensor(slots).view(1, 1, -1)).flatten(start_dim=-2)[0, 0].detach()
    e[2 * 8:] = 0  # order 3 is not formed by two tokens
    with torch.no_grad():
        p = torch.softmax(model.lm_head(model.final_norm(eng.value_proj(e))), dim=-1)
    top = torch.topk(p, 5)
    assert [t["model_id"] for t in lay["lens"]] == top.indices.tolist()
    np.testing.assert_allclose([t["prob"] for t in lay["lens"]], top.values.numpy(), rtol=1e-5)
    assert set(lay["lens_by_order"]) == {"2"}


def test_row_query(run_dir, layer):
    res = I.inspect_tables(I.InspectTablesConfig(run=run_dir, rows=["1:2:5"], sharing=100))
    q = res.queries[0]
    assert q["row"] == layer.heads[2].offset + 5 and q["load"] == layer.load[q["row"]]
    assert sum(g["count"] for g in q["ngrams"]) == layer.count[q["row"]]


# ---------------------------------------------------------------------------------------------
# bad input: one error each


def test_error_run_without_engram_layers(tmp_path, train_tiny_run):
    moe = train_tiny_run(tmp_path / "moe", allocation=1.0)
    with pytest.raises(ConfigError, match="no Engram layers"):
        I.inspect_tables(I.InspectTablesConfig(run=moe))


def test_error_tables_of_another_plan(run_dir, tmp_path, tiny_tables, vocab_dir):
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.tables.build import BuildTablesConfig, build_tables

    other = tmp_path / "other"
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=other, corpus=CorpusSpec(
        [str(p) for p in sorted((Path(__file__).parents[1] / "sample_data" / "sotu").glob("*.txt"))[:1]],
        max_tokens=500), layer_ids=(1,), n_head_per_ngram=2, embed_dim_per_head=8, target_size=503))
    assert load_tables(other).plan != load_tables(tiny_tables).plan
    one_red_line(runner.invoke(app, ["inspect-tables", str(run_dir), "--tables", str(other)]),
                 "another table plan")


@pytest.mark.parametrize("text, needle", [("a b c d e", "longer than the largest order 3"),
                                          ("海淀区", "only of unknown tokens"),
                                          ("the", "1 token")])
def test_error_bad_ngram(run_dir, text, needle):
    one_red_line(runner.invoke(app, ["inspect-tables", str(run_dir), "--ngram", text]), needle)


@pytest.mark.parametrize("row, needle", [("1:0:1009", "outside head 0's table"), ("1:9:0", "outside the layer's heads"),
                                         ("0:0:0", "layer 0 has no Engram table"), ("1-0-5", "not LAYER:HEAD:SLOT")])
def test_error_bad_row(run_dir, row, needle):
    one_red_line(runner.invoke(app, ["inspect-tables", str(run_dir), "--row", row]), needle)


def test_error_missing_step(run_dir):
    one_red_line(runner.invoke(app, ["inspect-tables", str(run_dir), "--step", "7"]), "no checkpoint at step 7")


def test_error_corrupt_table(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    step = json.loads((bad / "ckpt" / "latest.json").read_text())["dir"]
    (bad / "ckpt" / step / "model.safetensors").write_bytes(b"\x00" * 8 + b"garbage")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        I.inspect_tables(I.InspectTablesConfig(run=bad, rows=["1:0:0"]))


# ---------------------------------------------------------------------------------------------
# the command line, end to end


def test_cli_report_writes_exactly_its_files(run_dir, tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["inspect-tables", str(run_dir), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "Collision load" in r.stdout and "moved most" in r.stdout
    assert {p.name for p in out.iterdir()} == {"manifest.json", *I.REPORT_FILES}
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == I.FORMAT and set(manifest["files"]) == set(I.REPORT_FILES)
    one_red_line(runner.invoke(app, ["inspect-tables", str(run_dir), "--out", str(out)]), "exists")


def test_cli_query_json_and_files(run_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["inspect-tables", str(run_dir), "--ngram", " of the", "--row", "1:3:7", "--json",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [q["kind"] for q in d["queries"]] == ["ngram", "row"] and "gate" in d["lens"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", I.QUERIES_FILE}
    r = runner.invoke(app, ["inspect-tables", str(run_dir), "--ngram", " of the"])
    assert r.exit_code == 0 and "memory lens" in r.stdout and "gate and conv left out" in r.stdout
