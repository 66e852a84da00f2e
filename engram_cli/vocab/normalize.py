"""Vocabulary canonicalization (``engram normalize-vocab``) and the canonical id map.

Engram hashes N-grams of *canonical* ids rather than raw tokenizer ids, so that ``Apple`` and
``apple``, ``é`` and ``e``, or `` the`` and ``the`` address the same table slots (the paper,
Section 2.2 "tokenizer compression"; about 23% fewer ids for DeepSeek's 128k vocabulary).

The canonical key of a token follows the reference Engram implementation exactly, so maps made
here are interchangeable with it:

1. decode the id alone, keeping special tokens;
2. if the text contains U+FFFD (the token is a fragment of a UTF-8 sequence) the key is the raw
   vocabulary entry;
3. otherwise the key is the text after NFKC → NFD → strip accents (combining marks) → lowercase
   → each run of ``[ \\t\\r\\n]`` to one space → strip, except that a text that is exactly one space
   is kept; an empty result falls back to the decoded text.

Tokens with equal keys share one canonical id, numbered in order of first appearance by
ascending original id. The normalizer is HF ``tokenizers``' own (Rust) ``normalizers``, the
same building blocks the reference uses.

Artifact (``engram.vocab``): ``vocab_map.npy`` (int64, original id → canonical id),
``canonical_vocab.parquet`` (canonical_id, key, member_count, member_ids) and ``manifest.json``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, normalizers

from engram_cli.core.artifacts import artifact_dir, check_output_dir, holds_output_lock, read_manifest
from engram_cli.core.errors import ArtifactError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.vocab.tokenizer import DEFAULT_TOKENIZER, LoadedTokenizer, load_tokenizer

VOCAB_MAP_FILE = "vocab_map.npy"
CANONICAL_FILE = "canonical_vocab.parquet"
REPLACEMENT_CHAR = "\ufffd"
# A private-use character marks the lone-space token so that Strip() leaves it alone.
_SENTINEL = "\ue000"

#: normalization steps in the order the report adds them up (see ``step_ablation``)
STEPS = ("nfkc", "lowercase", "strip_accents", "whitespace")


@dataclass(frozen=True)
class NormalizeSteps:
    """Which normalization steps are on. All on = the reference Engram canonicalization."""

    nfkc: bool = True           # Unicode compatibility composition (full-width → ASCII, ligatures)
    strip_accents: bool = True  # NFD then drop combining marks (é → e)
    lowercase: bool = True      # Unicode lowercase
    whitespace: bool = True     # fold [ \t\r\n]+ to one space, strip ends (a lone space is kept)

    def describe(self) -> str:
        on = [s for s in STEPS if getattr(self, s)]
        return " + ".join(on) if on else "none"


def make_normalizer(steps: NormalizeSteps, *, per_token: bool = True):
    """Build the ``tokenizers`` normalizer for the chosen steps (None when all are off).

    ``per_token=True`` gives the reference's normalizer for one token's text, including the
    lone-space rule and the final Strip. ``per_token=False`` leaves out those two, which depend
    on the token's boundaries; :func:`canonical_keys` applies them after splitting.
    """

    seq = []
    if steps.nfkc:
        seq.append(normalizers.NFKC())
    if steps.strip_accents:
        seq += [normalizers.NFD(), normalizers.StripAccents()]
    if steps.lowercase:
        seq.append(normalizers.Lowercase())
    if steps.whitespace:
        seq.append(normalizers.Replace(Regex(r"[ \t\r\n]+"), " "))
        if per_token:
            seq += [normalizers.Replace(Regex(r"^ $"), _SENTINEL), normalizers.Strip(),
                    normalizers.Replace(_SENTINEL, " ")]
    return normalizers.Sequence(seq) if seq else None


def decode_vocabulary(tok: LoadedTokenizer) -> tuple[list[str], list[str | None]]:
    """Decode every id alone (special tokens kept) and fetch its raw vocabulary entry."""
    t = tok.tokenizer
    # a plain loop: decode_batch's thread pool costs more than it saves on one-id inputs
    texts = [t.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]
    raw = [t.id_to_token(i) for i in range(tok.vocab_size)]
    return texts, raw


# Characters Rust's ``char::is_whitespace`` (Unicode White_Space) accepts, which is what the
# ``Strip`` normalizer removes; Python's ``str.strip()`` alone would also drop \x1c-\x1f.
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


_ASCII_WS = re.compile(r"[ \t\r\n]+")


def _separator(texts: list[str]) -> str:
    """A private-use character that occurs in no token text."""
    present = set("".join(texts)) if any("\ue000" <= c <= "\uf8ff" for t in texts for c in t) else set()
    for cp in range(0xE001, 0xF8FF):
        if chr(cp) not in present:
            return chr(cp)
    raise InputError("every private-use character occurs in the vocabulary", "report this tokenizer as a bug")


def canonical_keys(texts: list[str], raw: list[str | None], steps: NormalizeSteps) -> list[str]:
    """The canonical key of every token, given its decoded text and raw entry (see module doc).

    ASCII texts are normalized with ``str`` methods (exact for ASCII). All other texts are
    normalized in ONE call of the Rust normalizer, joined by a private-use separator: per-call
    overhead would otherwise dominate (129k calls). The separator is a
    starter (no composition or canonical reordering crosses it), is neither cased nor
    case-ignorable (so context-dependent lowercasing such as final sigma sees the token alone),
    and is untouched by every step; the boundary-dependent rules (lone space, strip) are applied
    per token after splitting. ``tests/test_vocab.py`` checks equality with the per-token
    reference normalizer over the whole DeepSeek vocabulary.
    """
    # ASCII texts: NFKC, NFD and accent stripping are the identity and lowercasing is A-Z → a-z,
    # so plain str methods give exactly the normalizer's result at a fraction of the cost.
    ascii_idx = [i for i, t in enumerate(texts) if t.isascii()]
    other_idx = [i for i, t in enumerate(texts) if not t.isascii()]
    normalized: list[str] = [""] * len(texts)
    for i in ascii_idx:
        t = texts[i]
        if steps.lowercase:
            t = t.lower()
        if steps.whitespace:
            t = _ASCII_WS.sub(" ", t)
        normalized[i] = t
    norm = make_normalizer(steps, per_token=False)
    others = [texts[i] for i in other_idx]
    sep = _separator(others)
    joined = sep.join(others)
    parts = (norm.normalize_str(joined) if norm is not None else joined).split(sep) if others else []
    if len(parts) != len(others):  # cannot happen unless a step touched the separator
        raise AssertionError("normalizer changed the token separator")
    for i, part in zip(other_idx, parts):
        normalized[i] = part
    keys = []
    for text, entry, key in zip(texts, raw, normalized):
        if REPLACEMENT_CHAR in text:
            keys.append(entry if entry is not None else text)
            continue
        if steps.whitespace and key != " ":
            key = key.strip(_WHITE_SPACE)
        keys.append(key if key else text)
    return keys


def canonical_keys_reference(texts: list[str], raw: list[str | None], steps: NormalizeSteps) -> list[str]:
    """Token-by-token transcription of the reference (one normalizer call per token); slow."""
    norm = make_normalizer(steps, per_token=True)
    keys = []
    for text, entry in zip(texts, raw):
        if REPLACEMENT_CHAR in text:
            keys.append(entry if entry is not None else text)
            continue
        key = norm.normalize_str(text) if norm is not None else text
        keys.append(key if key else text)
    return keys


def group_keys(keys: list[str]) -> np.ndarray:
    """Canonical id per token: equal keys share an id, ids in order of first appearance."""
    first: dict[str, int] = {}
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        out[i] = first.setdefault(k, len(first))
    return out


class VocabMap:
    """Maps original token ids to canonical ids; what ``load_vocab`` returns.

    >>> vm = load_vocab("out/vocab")                       # doctest: +SKIP
    >>> vm(np.array([[1, 2, 3]]))                          # doctest: +SKIP
    array([[1, 2, 3]])

    Works on NumPy arrays and torch tensors of any shape (the result has the same type, shape
    and, for torch, device). Ids outside ``[0, original_vocab_size)`` raise ``InputError``.
    """

    def __init__(self, table: np.ndarray, *, canonical_vocab_size: int,
                 tokenizer_fingerprint: str, source: str = "", fingerprint: str = ""):
        self.table = np.ascontiguousarray(table, dtype=np.int64)  # (V_orig,)
        self.canonical_vocab_size = int(canonical_vocab_size)
        self.original_vocab_size = int(self.table.shape[0])
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.source = source
        self.fingerprint = fingerprint  # sha256 of vocab_map.npy
        self._torch_tables: dict[Any, Any] = {}
        self._keys: list[str] | None = None

    def __repr__(self) -> str:
        return (f"VocabMap({self.original_vocab_size} ids -> {self.canonical_vocab_size} canonical, "
                f"source={self.source!r})")

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.original_vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside this vocabulary (0..{self.original_vocab_size - 1})",
                             "use ids from the tokenizer this vocab map was built from")

    def __call__(self, ids):
        if type(ids).__module__.startswith("torch"):
            import torch  # lazy: torch is loaded only where tensors are given; build-tables and normalize-vocab never need it

            if ids.numel():
                self._check_range(int(ids.min()), int(ids.max()))
            table = self._torch_tables.get(ids.device)
            if table is None:
                table = torch.from_numpy(self.table).to(ids.device)
                self._torch_tables[ids.device] = table
            return table[ids.long()]
        arr = np.asarray(ids)
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"token ids must be integers, got {arr.dtype}", "pass an integer array")
        if arr.size:
            self._check_range(int(arr.min()), int(arr.max()))
        return self.table[arr]

    def keys(self) -> list[str]:
        """The canonical key of every canonical id (what the Engram tables key on), read once from
        the artifact's ``canonical_vocab.parquet``: e.g. " the" for "The", " The" and "the"."""
        if self._keys is None:

            path = Path(self.source) / CANONICAL_FILE
            try:
                # ParquetFile, not read_table: read_table loads pyarrow.dataset, which imports pandas (~1 s)
                t = pq.ParquetFile(path).read(columns=["canonical_id", "key"])
            except (OSError, KeyError, ValueError) as e:
                raise ArtifactError(f"{path} is not a readable canonical vocabulary ({e.__class__.__name__})",
                                    "recreate it with `engram normalize-vocab --force`") from e
            ids = t.column("canonical_id").to_numpy()
            if len(ids) != self.canonical_vocab_size or not np.array_equal(ids, np.arange(len(ids))):
                raise ArtifactError(f"{path} does not list canonical ids 0..{self.canonical_vocab_size - 1}",
                                    "recreate it with `engram normalize-vocab --force`")
            self._keys = t.column("key").to_pylist()
        return self._keys

    def check_tokenizer(self, tok: LoadedTokenizer) -> None:
        """Refuse a tokenizer other than the one this map was built from."""
        if tok.fingerprint != self.tokenizer_fingerprint:
            raise ArtifactError(
                f"vocab artifact {self.source} was built from another tokenizer "
                f"(sha256 {self.tokenizer_fingerprint[:12]}…, in use {tok.fingerprint[:12]}…)",
                "pass the same --tokenizer, or rebuild it with `engram normalize-vocab`")


def load_vocab(directory: str | os.PathLike) -> VocabMap:
    """Load and validate an ``engram.vocab`` artifact made by ``engram normalize-vocab``."""
    manifest = read_manifest(directory, "engram.vocab")
    path = Path(directory) / VOCAB_MAP_FILE
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable .npy array", "recreate it with `engram normalize-vocab --force`") from e
    summary = manifest.get("summary", {})
    csize = summary.get("canonical_vocab_size")
    if table.dtype != np.int64 or table.ndim != 1 or table.shape[0] != summary.get("original_vocab_size"):
        raise ArtifactError(f"{path} does not match its manifest (dtype/shape)",
                            "recreate it with `engram normalize-vocab --force`")
    if table.size and (table.min() < 0 or table.max() >= csize):
        raise ArtifactError(f"{path} holds canonical ids outside 0..{csize - 1}",
                            "recreate it with `engram normalize-vocab --force`")
    return VocabMap(table, canonical_vocab_size=csize,
                    tokenizer_fingerprint=manifest["inputs"]["tokenizer"]["sha256"],
                    source=str(directory), fingerprint=manifest["files"][VOCAB_MAP_FILE]["sha256"])


# ---------------------------------------------------------------------------------------------
# normalize-vocab


@dataclass
class NormalizeVocabConfig:
    """Options of ``engram normalize-vocab``."""

    out: Path                              # artifact directory to write
    tokenizer: str = DEFAULT_TOKENIZER     # `deepseek`, a tokenizer.json path/dir, or hf:NAME
    steps: NormalizeSteps = field(default_factory=NormalizeSteps)
    force: bool = False                    # replace an existing output directory
    top_groups: int = 10                   # merge groups listed in the report
    ablation: bool = True                  # measure each step's contribution (4 extra passes)


@dataclass
class StepRow:
    """Canonical vocabulary size with the steps up to and including ``step`` turned on."""

    steps: str
    canonical_vocab_size: int
    reduction_pct: float


@dataclass
class MergeGroup:
    canonical_id: int
    key: str
    member_count: int
    members: list[str]  # decoded member texts (first few), for display


@dataclass
class NormalizeVocabResult:
    out: Path
    tokenizer: dict
    steps: str
    original_vocab_size: int
    canonical_vocab_size: int
    reduction_pct: float
    byte_fragment_tokens: int            # tokens keyed by their raw entry (U+FFFD when decoded)
    ablation: list[StepRow]
    largest_groups: list[MergeGroup]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def reduction(original: int, canonical: int) -> float:
    return 100.0 * (1 - canonical / original) if original else 0.0


def step_ablation(texts, raw, steps: NormalizeSteps, original: int) -> list[StepRow]:
    """Canonical size as the enabled steps are added one at a time, in ``STEPS`` order."""
    rows, on = [], {}
    for s in STEPS:
        if not getattr(steps, s):
            continue
        on[s] = True
        partial = NormalizeSteps(**{k: on.get(k, False) for k in STEPS})
        size = int(group_keys(canonical_keys(texts, raw, partial)).max()) + 1
        rows.append(StepRow(partial.describe(), size, reduction(original, size)))
    return rows


@holds_output_lock(lambda config: config.out)
def normalize_vocab(config: NormalizeVocabConfig, progress: ProgressFn | None = None) -> NormalizeVocabResult:
    """Canonicalize a tokenizer's vocabulary and write an ``engram.vocab`` artifact."""
    progress = report(progress)

    check_output_dir(config.out, config.force, "engram.vocab")  # fail before the expensive part
    tok = load_tokenizer(config.tokenizer)
    n_tasks = 3 + (len([s for s in STEPS if getattr(config.steps, s)]) if config.ablation else 0)
    progress("normalize", 0, n_tasks)
    texts, raw = decode_vocabulary(tok)
    progress("normalize", 1, n_tasks)
    keys = canonical_keys(texts, raw, config.steps)
    table = group_keys(keys)
    progress("normalize", 2, n_tasks)
    n_canon = int(table.max()) + 1 if table.size else 0
    if n_canon == 0:
        raise InputError(f"tokenizer {tok.source} has an empty vocabulary", "pass a real tokenizer.json")

    # canonical entries: key (of the first member), members in ascending id order
    order = np.argsort(table, kind="stable")                       # ids grouped by canonical id
    counts = np.bincount(table, minlength=n_canon)                 # (C,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first_member = order[starts]
    canon_keys = [keys[i] for i in first_member]
    fragments = sum(REPLACEMENT_CHAR in t for t in texts)

    ablation = []
    if config.ablation:
        ablation = step_ablation(texts, raw, config.steps, tok.vocab_size)
        progress("normalize", n_tasks, n_tasks)

    biggest = np.argsort(-counts, kind="stable")[: config.top_groups]
    groups = [MergeGroup(int(c), canon_keys[c], int(counts[c]),
                         [texts[i] for i in order[starts[c]: starts[c] + min(counts[c], 8)]])
              for c in biggest if counts[c] > 1]


    member_lists = np.split(order, np.cumsum(counts)[:-1])
    entries = pa.table({
        "canonical_id": pa.array(np.arange(n_canon, dtype=np.int64)),
        "key": pa.array(canon_keys, type=pa.string()),
        "member_count": pa.array(counts.astype(np.int64)),
        "member_ids": pa.array([m.astype(np.int64) for m in member_lists], type=pa.list_(pa.int64())),
    })
    result = NormalizeVocabResult(
        out=Path(config.out), tokenizer=tok.describe(), steps=config.steps.describe(),
        original_vocab_size=tok.vocab_size, canonical_vocab_size=n_canon,
        reduction_pct=reduction(tok.vocab_size, n_canon), byte_fragment_tokens=int(fragments),
        ablation=ablation, largest_groups=groups)
    with artifact_dir(config.out, "engram.vocab", force=config.force) as w:
        np.save(w.path(VOCAB_MAP_FILE), table, allow_pickle=False)
        pq.write_table(entries, w.path(CANONICAL_FILE))
        w.config = {"tokenizer": config.tokenizer, "steps": asdict(config.steps)}
        w.inputs = {"tokenizer": tok.describe()}
        w.summary = {
            "original_vocab_size": tok.vocab_size,
            "canonical_vocab_size": n_canon,
            "reduction_pct": round(result.reduction_pct, 3),
            "byte_fragment_tokens": int(fragments),
            "ablation": [asdict(r) for r in ablation],
        }
    progress("normalize", n_tasks, n_tasks)
    return result


def merge_histogram(table: np.ndarray) -> Counter:
    """How many canonical ids have k members, for k = 1, 2, ... (for reports and tests)."""
    return Counter(np.bincount(table).tolist())
