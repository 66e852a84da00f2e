"""normalize-vocab on the real DeepSeek vocabulary: merges, fragments, determinism, steps."""

from __future__ import annotations

import numpy as np
import pytest

from engram_cli.core.errors import ArtifactError, InputError
from engram_cli.vocab.normalize import (
    NormalizeSteps,
    NormalizeVocabConfig,
    canonical_keys,
    decode_vocabulary,
    group_keys,
    load_vocab,
    normalize_vocab,
)


def tid(tok, s: str) -> int:
    i = tok.tokenizer.token_to_id(s)
    assert i is not None, s
    return i


def test_case_and_accent_variants_merge(deepseek, vocab):
    # byte-level BPE spells a leading space as "Ġ"; é is "Ã©" in byte-level form
    for a, b in [("Apple", "apple"), ("ĠApple", "Ġapple"), ("ĠApple", "apple"), ("Ã©", "e"), ("ĠTHE", "Ġthe")]:
        assert vocab(np.array([tid(deepseek, a)]))[0] == vocab(np.array([tid(deepseek, b)]))[0], (a, b)


def test_distinct_words_stay_distinct(deepseek, vocab):
    ids = [tid(deepseek, s) for s in ["apple", "Ġbanana", "the", "Ġcat"]]
    assert len(set(vocab(np.array(ids)).tolist())) == 4


def test_byte_fragment_tokens_stay_distinct(deepseek):
    texts, raw = decode_vocabulary(deepseek)
    frag = [i for i, t in enumerate(texts) if "\ufffd" in t]
    assert len(frag) > 1000  # partial UTF-8 sequences in a byte-level BPE
    keys = canonical_keys(texts, raw, NormalizeSteps())
    # each fragment is keyed by its own raw vocabulary entry, so no two fragments merge
    assert len({keys[i] for i in frag}) == len(frag)
    assert all(keys[i] == raw[i] for i in frag)


def test_reduction_matches_paper_ballpark(vocab):
    reduction = 1 - vocab.canonical_vocab_size / vocab.original_vocab_size
    assert vocab.original_vocab_size == 129_280
    assert 0.20 < reduction < 0.26  # the paper reports about 23%


def test_special_and_single_space_tokens(deepseek, vocab):
    texts, raw = decode_vocabulary(deepseek)
    keys = canonical_keys(texts, raw, NormalizeSteps())
    assert keys[0] == "<|begin▁of▁sentence|>"  # special tokens are decoded, kept, and NFKC-folded (｜ → |)
    assert keys[tid(deepseek, "Ġ")] == " "       # a lone space stays a space
    assert keys[tid(deepseek, "ĊĊ")] == " "      # whitespace runs fold onto it


def test_mapping_is_deterministic(deepseek, vocab):
    texts, raw = decode_vocabulary(deepseek)
    again = group_keys(canonical_keys(texts, raw, NormalizeSteps()))
    np.testing.assert_array_equal(again, vocab.table)
    # canonical ids are numbered in order of first appearance
    first = np.unique(vocab.table, return_index=True)[1]
    assert np.all(np.diff(first) > 0)


@pytest.mark.parametrize("step", ["lowercase", "strip_accents", "whitespace", "nfkc"])
def test_turning_a_step_off_keeps_more_ids(deepseek, vocab, step):
    texts, raw = decode_vocabulary(deepseek)
    fewer = NormalizeSteps(**{step: False})
    size = int(group_keys(canonical_keys(texts, raw, fewer)).max()) + 1
    assert size > vocab.canonical_vocab_size


def test_no_lowercase_keeps_case(deepseek):
    texts, raw = decode_vocabulary(deepseek)
    keys = canonical_keys(texts, raw, NormalizeSteps(lowercase=False))
    assert keys[tid(deepseek, "Apple")] != keys[tid(deepseek, "apple")]


def test_vocab_map_numpy_and_torch(vocab):
    torch = pytest.importorskip("torch")
    ids = np.array([[0, 1, 2], [100, 5000, 129279]])
    out = vocab(ids)
    assert out.shape == ids.shape and out.dtype == np.int64
    t = vocab(torch.tensor(ids))
    assert isinstance(t, torch.Tensor) and t.tolist() == out.tolist()


@pytest.mark.parametrize("bad", [-1, 129_280, 10**9])
def test_vocab_map_rejects_out_of_range(vocab, bad):
    with pytest.raises(InputError, match="outside this vocabulary"):
        vocab(np.array([1, bad]))


def test_artifact_files_and_manifest(vocab_dir, deepseek):
    assert sorted(p.name for p in vocab_dir.iterdir()) == ["canonical_vocab.parquet", "manifest.json", "vocab_map.npy"]
    import json

    import pyarrow.parquet as pq

    m = json.loads((vocab_dir / "manifest.json").read_text())
    assert m["format"] == "engram.vocab" and m["format_version"] == 1
    assert m["inputs"]["tokenizer"]["sha256"] == deepseek.fingerprint
    t = pq.read_table(vocab_dir / "canonical_vocab.parquet")
    assert t.column_names == ["canonical_id", "key", "member_count", "member_ids"]
    assert sum(t.column("member_count").to_pylist()) == 129_280
    assert t.num_rows == m["summary"]["canonical_vocab_size"]


def test_load_rejects_damaged_artifacts(vocab_dir, tmp_path):
    import shutil

    broken = tmp_path / "v"
    shutil.copytree(vocab_dir, broken)
    (broken / "vocab_map.npy").unlink()
    with pytest.raises(ArtifactError, match="vocab_map.npy is missing.*engram normalize-vocab"):
        load_vocab(broken)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_vocab(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_vocab(tmp_path / "empty")


def test_existing_output_refused_then_forced(tmp_path, vocab_dir):
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        normalize_vocab(NormalizeVocabConfig(out=out, ablation=False))
    assert (out / "keep.txt").exists()


def test_failed_run_leaves_previous_artifact_intact(tmp_path, vocab_dir):
    import shutil

    out = tmp_path / "v"
    shutil.copytree(vocab_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError):
        normalize_vocab(NormalizeVocabConfig(out=out, tokenizer=str(tmp_path / "missing.json"), force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("steps", [NormalizeSteps(), NormalizeSteps(lowercase=False),
                                   NormalizeSteps(whitespace=False), NormalizeSteps(nfkc=False, strip_accents=False)])
def test_batched_normalization_equals_per_token_reference(deepseek, steps):
    from engram_cli.vocab.normalize import canonical_keys_reference

    texts, raw = decode_vocabulary(deepseek)
    assert canonical_keys(texts, raw, steps) == canonical_keys_reference(texts, raw, steps)


def test_separator_handles_combining_marks_and_sigma():
    # a lone combining mark must not compose with the previous token; final sigma is per token
    texts = ["e", "\u0301", "ΑΣ", "Σ", " ", "  x  ", "\t\n"]
    raw = list(texts)
    from engram_cli.vocab.normalize import canonical_keys_reference

    for steps in [NormalizeSteps(), NormalizeSteps(strip_accents=False)]:
        assert canonical_keys(texts, raw, steps) == canonical_keys_reference(texts, raw, steps)
