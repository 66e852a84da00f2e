"""inspect-gates: gates straight from the forward pass, windows, pictures, corpus aggregates, CLI, errors.

A tiny run is trained once per session through the train library (a few steps on a 4k-token
corpus); the tests read its gates back and compare them with direct forward calls of the model.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engram_cli import gates as G
from engram_cli.core import plotting
from engram_cli.core.errors import ConfigError, InputError
from engram_cli.corpus.spec import CorpusSpec

from cli_asserts import one_red_line

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
CORPUS = [str(SAMPLE / "sotu" / "1941-roosevelt.txt"), str(SAMPLE / "sentences.txt")]
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.moe_num_experts=4",
        "model.moe_expert_hidden=32", "train.batch_size=4", "train.warmup_steps=1", "train.eval_batches=1",
        "data.val_chunk_tokens=256"]  # fmt: skip
TEXT = "Alexander the Great founded more than a dozen cities.\n北京大学位于北京市海淀区。"


# ---------------------------------------------------------------------------------------------
# fixtures: tables and tiny trained runs


@pytest.fixture(scope="session")
def tables_dir(tmp_path_factory, vocab_dir) -> Path:
    from engram_cli.corpus.spec import CorpusSpec
    from engram_cli.tables.build import BuildTablesConfig, build_tables

    out = tmp_path_factory.mktemp("gates") / "tables"
    build_tables(BuildTablesConfig(vocab=vocab_dir, out=out, corpus=CorpusSpec(CORPUS), layer_ids=(0, 1), n_head_per_ngram=2,
                                   embed_dim_per_head=8, target_size=2003))
    return out


def _train(out: Path, tables: Path, steps: int, allocation: float | None = None) -> Path:
    from engram_cli.train import TrainConfig, load_settings, train

    settings = load_settings(None, TINY + [f"train.steps={steps}", f"train.eval_interval={steps}",
                                           "train.checkpoint_interval=1", "train.keep_checkpoints=3"])
    train(TrainConfig(out=out, tables=tables, sources=CORPUS, settings=settings, device="cpu",
                      allocation=allocation, cache_dir=out.parent / "cache"))
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tables_dir) -> Path:
    """A 3-step run with Engram at blocks 0 and 1; checkpoints at steps 1, 2 and 3."""
    return _train(tmp_path_factory.mktemp("gates") / "run-a", tables_dir, steps=3)


@pytest.fixture(scope="session")
def baseline_dir(tmp_path_factory, tables_dir) -> Path:
    """A pure-MoE run (allocation 1.0): no Engram layers."""
    return _train(tmp_path_factory.mktemp("gates") / "baseline", tables_dir, steps=1, allocation=1.0)


@pytest.fixture(scope="session")
def run(run_dir) -> G.LoadedRun:
    return G.load_run_model(run_dir)


@pytest.fixture(scope="session")
def run_hc2(run) -> G.LoadedRun:
    """The trained run's tokenizer, vocab and plan with a (randomly initialized) hc = 2 model."""
    from engram_cli.model.transformer import EngramModel

    torch.manual_seed(0)
    model = EngramModel(replace(run.model.config, engram_hc_mult=2), run.model.plan).eval()
    return replace(run, model=model, model_config=model.config, name="hc2")


def direct_gates(run: G.LoadedRun, text: str) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One plain forward of [separator] + text: (gates the model returned, gates a hook saw), (T+1, hc) each."""
    ids, _ = G.encode_text(run, text)
    ids = np.concatenate([[run.separator_id], ids])
    idx = torch.from_numpy(np.asarray(run.to_model_ids(ids), dtype=np.int64))[None]
    canon = torch.from_numpy(np.asarray(run.vocab(ids), dtype=np.int64))[None]
    seen = {}
    hooks = [run.model.blocks[layer].engram.register_forward_hook(
        lambda mod, args, output, layer=layer: seen.__setitem__(layer, output[1].detach()))
        for layer in run.layer_ids]
    try:
        with torch.no_grad():
            out = run.model(idx, canon, return_gates=True)
    finally:
        for h in hooks:
            h.remove()
    return {k: v[0] for k, v in out.gates.items()}, {k: v[0] for k, v in seen.items()}


def invoke(*args: str, input: str | None = None):
    from engram_cli.cli import app

    return CliRunner().invoke(app, ["inspect-gates", *args], input=input)


# ---------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("length,block,overlap", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 0),
                                                  (50, 8, 7), (1000, 32, 16)])
def test_windows_tile_the_sequence_with_context(length, block, overlap):
    wins = G.plan_windows(length, block, overlap)
    assert wins[0][0] == 0 and wins[-1][1] == length
    kept = np.concatenate([np.arange(keep, end) for _, end, keep in wins])
    assert np.array_equal(kept, np.arange(length))  # every position exactly once, in order
    for start, end, keep in wins:
        assert 0 < end - start <= block and start <= keep < end
        assert start == 0 or keep - start >= overlap


# ---------------------------------------------------------------------------------------------
# values: exactly the gates of the model's own forward pass


def test_gates_are_the_forward_pass_gates(run):
    trace = G.trace_text(run, TEXT)
    returned, hooked = direct_gates(run, TEXT)
    T = len(trace.tokens)
    assert T + 1 <= run.block_size and trace.windows == 1
    assert trace.gates.shape == (len(run.layer_ids) * run.hc_mult, T) and trace.row_labels == ["L0", "L1"]
    for layer in run.layer_ids:
        np.testing.assert_allclose(trace.gate(layer), returned[layer][1:, 0].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(trace.gate(layer), hooked[layer][1:, 0].numpy(), rtol=0, atol=1e-6)
    assert "".join(trace.tokens) == TEXT
    assert np.array_equal(trace.canonical_ids, run.vocab(trace.ids))


def test_long_text_windows_equal_direct_forward_of_each_window(run):
    text = " ".join(open(SAMPLE / "sentences.txt", encoding="utf-8").read().split("\n")[:4])
    trace = G.trace_text(run, text, separator=False, overlap=8)
    T = len(trace.tokens)
    wins = G.plan_windows(T, run.block_size, 8)
    assert trace.windows == len(wins) > 2
    for start, end, keep in wins:
        idx = torch.from_numpy(trace.model_ids[start:end])[None]
        canon = torch.from_numpy(trace.canonical_ids[start:end])[None]
        with torch.no_grad():
            out = run.model(idx, canon, return_gates=True)
        for r, (layer, b) in enumerate(trace.rows):
            np.testing.assert_allclose(trace.gates[r, keep:end], out.gates[layer][0, keep - start:, b].numpy(),
                                       rtol=0, atol=1e-5)


def test_hyper_connection_branches(run_hc2):
    trace = G.trace_text(run_hc2, TEXT)
    returned, hooked = direct_gates(run_hc2, TEXT)
    assert trace.gates.shape == (4, len(trace.tokens))
    assert trace.row_labels == ["L0.b0", "L0.b1", "L1.b0", "L1.b1"]
    for layer in run_hc2.layer_ids:
        for b in range(2):
            np.testing.assert_allclose(trace.gate(layer, b), hooked[layer][1:, b].numpy(), atol=1e-6)
            np.testing.assert_allclose(trace.gate(layer, b), returned[layer][1:, b].numpy(), atol=1e-6)
    rec = trace.records()[0]
    assert set(rec) == {"index", "token", "id", "canonical_id", "model_id", "gates"}
    assert set(rec["gates"]) == set(trace.row_labels)
    table = G.trace_table([trace])
    assert [c for c in table.column_names if c.startswith("gate_")] == ["gate_L0_b0", "gate_L0_b1",
                                                                        "gate_L1_b0", "gate_L1_b1"]


def test_display_of_tokens():
    from engram_cli.core.text import display_token

    assert display_token(" the") == "␣the" and display_token(".\n") == ".⏎" and display_token("\t") == "⇥"
    assert display_token("") == "·" and display_token("\u200b") == "\\u200b"
    assert G.token_texts("𠀀x", [(0, 1), (0, 1), (1, 2)]) == ["𠀀", "", "x"]
    assert G.readable_on(G.gate_rgb(0.0)) == "white" and G.readable_on(G.gate_rgb(1.0)) == "black"
    assert G.gate_rgb(0.5) == tuple(int(G.VIRIDIS_ANCHORS[5][i:i + 2], 16) for i in (1, 3, 5))


# ---------------------------------------------------------------------------------------------
# pictures


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_heatmap_png_and_svg(run, tmp_path):
    one = G.trace_text(run, TEXT)
    other = replace(one, model="run-b", step=7, gates=1 - one.gates)
    warnings = G.plot_gate_heatmap([one], tmp_path / "a.png", tmp_path / "a.svg")
    # the text has Chinese tokens: no warning where a CJK font is installed, one naming it where not
    if plotting.find_cjk_font():
        assert warnings == []
    else:  # the text has Chinese tokens: without a CJK font the picture says so (and that they show as boxes)
        assert warnings and "CJK" in warnings[0] and all("boxes" in w for w in warnings)
    G.plot_gate_heatmap([one, other], tmp_path / "b.png", None)
    G.plot_gate_heatmap([one], tmp_path / "c.png", None, wrap=8)
    a, b, c = (_pixels(tmp_path / f"{k}.png") for k in "abc")
    T = len(one.tokens)
    # ~0.2 in per token at 200 dpi, plus margins and the colour bar
    dpi = plotting.DPI
    assert 0.2 * T * dpi < a.shape[1] < (0.2 * T + 2.5) * dpi and 0.5 * dpi < a.shape[0] < 3 * dpi
    assert b.shape[0] > a.shape[0] and b.shape[1] >= a.shape[1]  # two runs stacked
    assert c.shape[0] > 1.5 * a.shape[0] and c.shape[1] < a.shape[1]  # wrapped into rows
    for px in (a, b, c):
        assert px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # not blank
    svg = (tmp_path / "a.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 20_000


def test_heatmap_without_a_cjk_font_warns_and_still_draws(run, tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "find_cjk_font", lambda: None)
    warnings = G.plot_gate_heatmap([G.trace_text(run, TEXT)], tmp_path / "a.png", None)
    assert any("CJK" in w for w in warnings) and (tmp_path / "a.png").stat().st_size > 10_000
    assert G.plot_gate_heatmap([G.trace_text(run, "plain ascii")], tmp_path / "b.png", None) == []


# ---------------------------------------------------------------------------------------------
# corpus mode == brute force


def test_corpus_aggregates_equal_brute_force(run, run_dir, tmp_path):
    import pyarrow.parquet as pq

    lines = open(SAMPLE / "sentences.txt", encoding="utf-8").read().splitlines()
    docs = lines[:6] + [" ".join(lines[6:10])]  # one document longer than block_size
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    res = G.inspect_gates(G.InspectGatesConfig(model=run_dir, corpus=CorpusSpec([str(tmp_path / "c.jsonl")]),
                                               out=tmp_path / "g", min_count=1, top=3, bins=10))
    # brute force: each document alone through one plain forward per block-sized window
    per_ngram = defaultdict(list)
    all_gates, by_id = [], defaultdict(list)
    for d in docs:
        ids = np.asarray(run.tokenizer.tokenizer.encode(d, add_special_tokens=False).ids)
        seq = np.concatenate([[run.separator_id], ids])
        gates = np.zeros((len(seq), 2))
        for start, end, keep in G.plan_windows(len(seq), run.block_size, run.block_size // 2):
            with torch.no_grad():
                out = run.model(torch.from_numpy(run.to_model_ids(seq[start:end]))[None],
                                torch.from_numpy(run.vocab(seq[start:end]))[None], return_gates=True)
            for r, layer in enumerate(run.layer_ids):
                gates[keep:end, r] = out.gates[layer][0, keep - start:, 0].numpy()
        gates, canon = gates[1:], run.vocab(ids)
        for t in range(len(ids)):
            all_gates.append(gates[t])
            by_id[int(ids[t])].append(gates[t])
            for n in range(1, 4):
                if t >= n - 1:
                    per_ngram[tuple(canon[t - n + 1:t + 1].tolist())].append(gates[t])
    all_gates = np.array(all_gates)
    assert res.tokens == len(all_gates) and res.documents == len(docs)
    for r, lab in enumerate(res.rows):
        assert res.mean[lab] == pytest.approx(all_gates[:, r].mean(), abs=1e-6)
        assert res.std[lab] == pytest.approx(all_gates[:, r].std(), abs=1e-5)
        expected_hist = np.bincount(np.clip((all_gates[:, r] * 10).astype(int), 0, 9), minlength=10)
        assert res.histogram[lab] == expected_hist.tolist()
    table = pq.read_table(tmp_path / "g" / G.NGRAMS_FILE).to_pylist()
    assert len(table) == len(per_ngram)  # min_count=1: every n-gram is saved
    for row in table:
        seen = np.array(per_ngram[tuple(row["canonical_ids"])])
        assert row["count"] == len(seen) and row["n"] == len(row["canonical_ids"])
        assert row["gate_L0"] == pytest.approx(seen[:, 0].mean(), abs=1e-6)
        assert row["gate_L1"] == pytest.approx(seen[:, 1].mean(), abs=1e-6)
    # ranked lists: the highest mean gate among the 2-grams of layer 1 (ties broken by count)
    best = max(((np.mean(np.array(v)[:, 1]), len(v)) for k, v in per_ngram.items() if len(k) == 2))
    top = next(e for e in res.extremes if e["layer"] == 1 and e["n"] == 2 and e["kind"] == "highest" and e["rank"] == 1)
    assert top["gate"] == pytest.approx(best[0], abs=1e-6)
    # frequency buckets: mean gate over the tokens whose corpus frequency is in [2^k, 2^(k+1))
    freq = {i: len(v) for i, v in by_id.items()}
    for row in res.frequency:
        members = [g for i, v in by_id.items() if row["freq_lo"] <= freq[i] <= row["freq_hi"] for g in v]
        r = res.rows.index(row["row"])
        assert row["tokens"] == len(members)
        assert row["mean_gate"] == pytest.approx(np.mean(np.array(members)[:, r]), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_text_mode_end_to_end(run_dir, tmp_path):
    out = tmp_path / "g"
    r = invoke("--model", str(run_dir), TEXT, "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert "run-a (step 3)" in r.stdout and "Gate α per row" in r.stdout and "gate α" in r.stdout
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokens.parquet", "gates.png", "gates.svg"}
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no temp directories left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "engram.gates" and manifest["summary"]["mode"] == "text"


def test_cli_json_csv_and_stdin(run_dir, tmp_path):
    r = invoke("-m", str(run_dir), "-", "--json", "--csv", str(tmp_path / "t.csv"), input="By the way, hello.")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    (trace,) = data["runs"]
    assert trace["step"] == 3 and [t["token"] for t in trace["tokens"]][:3] == ["By", " the", " way"]
    assert set(trace["tokens"][0]["gates"]) == {"L0", "L1"}
    csv = (tmp_path / "t.csv").read_text().splitlines()
    assert csv[0].startswith('"run","step","index","token"') and len(csv) == 1 + len(trace["tokens"])


def test_cli_compare_two_steps(run_dir, tmp_path):
    out = tmp_path / "cmp"
    r = invoke("-m", str(run_dir), "--step", "1", "--compare-step", "3", TEXT, "-o", str(out), "-q",
               "--parquet", str(tmp_path / "t.parquet"))
    assert r.exit_code == 0, r.output
    assert "A = run-a (step 1)" in r.stdout and "B = run-a (step 3)" in r.stdout
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokens.parquet", "gates.png", "gates.svg"}
    import pyarrow.parquet as pq

    assert sorted(set(pq.read_table(tmp_path / "t.parquet").column("step").to_pylist())) == [1, 3]


def test_cli_corpus_mode_end_to_end(run_dir, tmp_path):
    out = tmp_path / "gc"
    (tmp_path / "extra.txt").write_text("One more line.\nAnd another one.\n")
    r = invoke("-m", str(run_dir), "--corpus", CORPUS[1], str(tmp_path / "extra.txt"), "--doc-mode", "line",
               "--out", str(out), "-q", "--min-count", "2")  # the second source arrives as a positional
    assert r.exit_code == 0, r.output
    assert "n-grams by mean gate" in r.stdout and "by token frequency" in r.stdout
    assert {p.name for p in out.iterdir()} == {"manifest.json", "ngrams.parquet", "histogram.parquet",
                                               "frequency.parquet", "gate_histogram.png", "gate_by_frequency.png"}
    for png in ("gate_histogram.png", "gate_by_frequency.png"):
        assert _pixels(out / png).std() > 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["documents"] == 14 and manifest["inputs"]["corpus"]["corpus_sha256"]


# ---------------------------------------------------------------------------------------------
# bad input: one clear line each


def test_error_run_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    one_red_line(invoke("-m", str(tmp_path / "empty"), "hello"), "engram train")
    one_red_line(invoke("-m", str(tmp_path / "nope"), "hello"), "does not exist", "engram train")


def test_error_empty_text(run_dir, tmp_path):
    one_red_line(invoke("-m", str(run_dir), "   \n"), "text is empty")
    (tmp_path / "e.txt").write_text("")
    one_red_line(invoke("-m", str(run_dir), "-f", str(tmp_path / "e.txt")), "text is empty")
    one_red_line(invoke("-m", str(run_dir)), "no text given", "--corpus")


def test_error_corpus_without_tokens(run_dir, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n")
    one_red_line(invoke("-m", str(run_dir), "--corpus", str(tmp_path / "blank.txt")), "corpus is empty")


def test_error_model_without_engram_layers(baseline_dir):
    one_red_line(invoke("-m", str(baseline_dir), "hello"), "this model has no Engram layers")


def test_error_tokenizer_fingerprint_changed(run_dir, tmp_path):
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"]["tokenizer"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_red_line(invoke("-m", str(copy), "hello"), "another tokenizer")


def test_error_compare_needs_the_same_tokenizer(run, monkeypatch):
    other_tok = replace(run.tokenizer, fingerprint="e" * 64)
    monkeypatch.setattr(G.report, "load_run_model", lambda d, step=None, device="cpu":
                        run if step != 9 else replace(run, tokenizer=other_tok))
    with pytest.raises(ConfigError, match="different tokenizers"):
        G.inspect_gates(G.InspectGatesConfig(model=Path("x"), text="hi", compare_step=9))


def test_exports_never_overwrite_without_force_nor_an_input(run_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Alexander the Great founded many cities.")
    for flag in ("--csv", "--parquet"):
        one_red_line(invoke("-m", str(run_dir), "-f", str(notes), flag, str(notes), "--force"),
                     "is an input of this command")
        one_red_line(invoke("-m", str(run_dir), "hi", flag, str(run_dir / "x.csv"), "--force"), "inside the input")
    assert notes.read_text() == "Alexander the Great founded many cities."
    (tmp_path / "old.csv").write_text("keep me")
    one_red_line(invoke("-m", str(run_dir), "hi", "--csv", str(tmp_path / "old.csv")), "already exists", "--force")
    assert (tmp_path / "old.csv").read_text() == "keep me"
    r = invoke("-m", str(run_dir), "hi", "--csv", str(tmp_path / "old.csv"), "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "old.csv").read_text().startswith('"run"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "old.csv"]  # no temp files left


def test_error_conflicting_options(run_dir, tmp_path):
    one_red_line(invoke("-m", str(run_dir), "hi", "--csv", "a.csv", "--parquet", "a.parquet"), "either --csv")
    one_red_line(invoke("-m", str(run_dir), "--corpus", CORPUS[1], "--compare-step", "1"), "--compare")
    one_red_line(invoke("-m", str(run_dir), "hi", "there"), "one TEXT", "quote")
    with pytest.raises(InputError, match="does not exist"):
        G.inspect_gates(G.InspectGatesConfig(model=run_dir, text_file=tmp_path / "missing.txt"))
