"""Corpus input: text files, JSON lines, Parquet and Hugging Face datasets, as a document stream.

``engram build-tables``, ``engram train`` and ``engram inspect-gates`` read their text through
this module, so they accept the same inputs (``docs/corpus.md`` is the user-facing description):

* ``.txt`` / ``.md``: UTF-8 text; one document per file (``doc_mode="file"``) or one per non-empty
  line (``doc_mode="line"``);
* ``.jsonl`` / ``.ndjson`` / ``.json``: one JSON object per line, the document in field
  ``text_column`` (a ``.json`` file that holds one JSON array of objects is read whole);
* ``.parquet``: column ``text_column``, read one record batch at a time;
* a directory written by HF ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of which
  ``hf_split`` is read);
* ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face hub dataset, streamed (needs a network);
* any other directory: the supported files under it, recursively, in sorted order; a glob: its
  matches in sorted order.

Everything streams: memory does not grow with the size of the corpus, except that a whole file is
one document in ``file`` mode and a ``.json`` array is parsed whole.

Documents are numbered in reading order (sources in the order given); empty or blank documents
get no number. ``shard=(I, N)`` keeps the documents whose number is I modulo N, so N machines
reading the same inputs split them without overlap (every machine still reads all inputs).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engram_cli.artifacts import sha256_file
from engram_cli.errors import ConfigError, InputError
from engram_cli.progress import ProgressFn, report

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
HUB_PREFIX = "hf:"

# Tokenizer batches are closed at this many documents or this many UTF-8 bytes, whichever comes
# first: the byte cap keeps a batch of whole-file documents from holding gigabytes of text.
DEFAULT_BATCH_SIZE = 1024           # documents; see docs/corpus.md for the measurement
DEFAULT_BATCH_BYTES = 4 << 20       # 4 MiB of text per tokenizer call
_READ_CHUNK = 4 << 20               # bytes per read in the UTF-8 check
_PARQUET_BATCH_ROWS = 1024          # rows per Parquet record batch
_HF_BATCH_ROWS = 1000               # rows per batch read from a save_to_disk dataset
_MAX_BAD_RECORDS_KEPT = 20          # bad-record examples kept in CorpusStats
PIECE_CHARS = 1 << 20               # longer documents are tokenized in pieces (bounded memory)


@dataclass
class CorpusSpec:
    """What to read and which part of it. Built by the CLI from the shared corpus options."""

    sources: list[str]                       # paths, globs, directories or hf:NAME[:CONFIG]
    text_column: str = "text"                # field / column holding the text (jsonl, parquet, datasets)
    doc_mode: Literal["file", "line"] = "file"  # .txt/.md: a document per file, or per non-empty line
    shard: tuple[int, int] | None = None     # (I, N): keep documents whose index % N == I
    max_tokens: int | None = None            # stop after this many tokens (per shard); None = all
    hf_split: str = "train"                  # split of a DatasetDict or hub dataset
    skip_bad_files: bool = True              # skip (and count) unreadable / non-UTF-8 files; else refuse

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, os.PathLike)):
            self.sources = [self.sources]
        self.sources = [str(s) for s in self.sources]
        if not self.sources:
            raise ConfigError("no corpus given", "pass one or more files, directories, globs or hf:NAME")
        if self.doc_mode not in ("file", "line"):
            raise ConfigError(f"unknown document mode {self.doc_mode!r}",
                              "use `file` (one document per file) or `line` (one per line): --doc-mode / data.doc_mode")
        if self.shard is not None:
            i, n = self.shard
            if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
                raise ConfigError(f"shard {i}/{n} is impossible", "pass --shard I/N with 0 <= I < N")
            self.shard = (i, n)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {self.max_tokens}",
                              "pass a positive --max-tokens or leave it out")
        if not self.text_column:
            raise ConfigError("the text column name is empty", "pass --text-column NAME")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, checking 0 <= I < N (for ``--shard``)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard {text!r} is not of the form I/N", "pass e.g. --shard 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard {text} is impossible", "pass --shard I/N with 0 <= I < N")
    return i, n


@dataclass
class CorpusStats:
    """Figures about what was read; filled in while iterating."""

    documents: int = 0          # documents yielded (in this shard, within max_tokens)
    tokens: int = 0             # tokens yielded (iter_tokenized only)
    files: int = 0              # files / datasets opened and read
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), skipped
    bytes: int = 0              # UTF-8 bytes of the documents yielded
    documents_seen: int = 0     # documents read in all shards (before the shard filter)
    bad_records: int = 0        # JSON lines / records skipped (malformed, or text not a string)
    bad_record_examples: list[tuple[str, str]] = field(default_factory=list)  # ("path:line", reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "tokens": self.tokens, "files": self.files,
            "bytes": self.bytes, "documents_seen": self.documents_seen,
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files],
            "bad_records": self.bad_records,
            "bad_record_examples": [{"where": w, "reason": r} for w, r in self.bad_record_examples],
        }


# ---------------------------------------------------------------------------------------------
# resolving sources


@dataclass(frozen=True)
class Source:
    """One resolved input: a file, a save_to_disk directory or a hub dataset."""

    kind: Literal["text", "json", "parquet", "hf_disk", "hf_hub"]
    location: str                # file or directory path; hub dataset name for hf_hub
    config: str | None = None    # hub dataset configuration (hf_hub only)


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def _walk(directory: Path) -> Iterator[Source]:
    """Supported files under ``directory`` in sorted order; hidden entries are ignored."""
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_saved_dataset(entry):
                yield Source("hf_disk", str(entry))
            else:
                yield from _walk(entry)
        elif (kind := _kind_of(entry)) is not None:
            yield Source(kind, str(entry))


def _resolve_path(path: Path, given: str) -> list[Source]:
    if path.is_dir():
        if is_saved_dataset(path):
            return [Source("hf_disk", str(path))]
        found = list(_walk(path))
        if not found:
            raise InputError(f"directory {given} holds no corpus files",
                             f"put {', '.join(SUPPORTED)} files in it, or pass the files themselves")
        return found
    kind = _kind_of(path)
    if kind is None:
        raise InputError(f"{given}: unsupported file type {path.suffix or '(no extension)'!r}",
                         f"pass {', '.join(SUPPORTED)} files or a dataset directory made by save_to_disk")
    return [Source(kind, str(path))]


def resolve_sources(spec: CorpusSpec) -> list[Source]:
    """Expand the spec's sources (globs sorted, directories walked) into an ordered list.

    A path or glob that matches nothing raises :class:`InputError` naming it. A file reached
    twice (overlapping globs) is read once, at its first place.
    """
    out: list[Source] = []
    for given in spec.sources:
        if given.startswith(HUB_PREFIX):
            name, _, config = given[len(HUB_PREFIX):].partition(":")
            if not name:
                raise InputError(f"{given!r} names no dataset", "write hf:NAME or hf:NAME:CONFIG")
            out.append(Source("hf_hub", name, config or None))
        elif glob.has_magic(given):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise InputError(f"no file matches {given}", "check the pattern (quote it so the shell does not expand it)")
            for m in matches:
                out += _resolve_path(Path(m), m)
        else:
            path = Path(given).expanduser()
            if not path.exists():
                raise InputError(f"corpus path {given} does not exist", "check the path")
            out += _resolve_path(path, given)
    seen: set[Source] = set()
    unique = []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


# ---------------------------------------------------------------------------------------------
# reading one source


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# document and token streams


def iter_documents(spec: CorpusSpec, stats: CorpusStats | None = None) -> Iterator[str]:
    """The documents of the corpus (this shard's), in reading order.

    Sources are resolved at once, so a missing path raises here rather than at the first
    ``next``. Fills ``stats`` (documents, bytes, files, skipped files, bad records). Raises
    :class:`InputError` when the corpus (or this shard of it) has no document.
    """
    stats = CorpusStats() if stats is None else stats
    sources = resolve_sources(spec)
    return _documents(spec, sources, stats)


def _documents(spec: CorpusSpec, sources: list[Source], stats: CorpusStats) -> Iterator[str]:
    from engram_cli.readers import Reader

    reader = Reader(spec, stats)
    shard_i, shard_n = spec.shard or (0, 1)
    for source in sources:
        for text in reader.texts(source):
            if not text or text.isspace():
                continue
            index = stats.documents_seen
            stats.documents_seen += 1
            if index % shard_n != shard_i:
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
    if stats.documents == 0:
        raise empty_corpus_error(spec, stats)


def empty_corpus_error(spec: CorpusSpec, stats: CorpusStats) -> InputError:
    if stats.documents_seen and spec.shard:
        i, n = spec.shard
        return InputError(f"corpus is empty for shard {i}/{n}: the corpus has only {stats.documents_seen} documents",
                          "use fewer shards")
    skipped = f", {len(stats.skipped_files)} files skipped as unreadable" if stats.skipped_files else ""
    return InputError(f"corpus is empty: no documents in {', '.join(spec.sources)}{skipped}",
                      "check the paths, --text-column and --doc-mode")


def _batches(docs: Iterator[str], batch_size: int, batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= batch_size or size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def iter_tokenized(spec: CorpusSpec, tokenizer, *, stats: CorpusStats | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, batch_bytes: int = DEFAULT_BATCH_BYTES,
                   progress: ProgressFn | None = None) -> Iterator[list[np.ndarray]]:
    """Tokenize the corpus in batches; yields, per batch, one int32 array of ORIGINAL ids per document.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (``LoadedTokenizer.tokenizer``). Special tokens are
    not added. A batch closes at ``batch_size`` documents or ``batch_bytes`` characters. With
    ``spec.max_tokens`` the last document is cut so that at most that many tokens come out
    overall, and no further document is read. ``stats.documents``/``bytes`` then count only the
    documents that were (partly) yielded. Reports ``progress("tokenize", tokens, max_tokens,
    documents=..., tokens=..., skipped_files=...)`` after every batch.
    """
    if batch_size < 1 or batch_bytes < 1:
        raise ConfigError("the tokenizer batch size must be positive", "pass a positive batch size")
    stats = CorpusStats() if stats is None else stats
    docs = iter_documents(spec, stats)
    return _tokenized(spec, tokenizer, docs, stats, batch_size, batch_bytes, report(progress))


def split_long_document(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut a document longer than ``piece_chars`` into pieces to tokenize one after the other.

    Each cut is placed where the pre-tokenizer starts a new pre-token anyway, so the pieces'
    ids concatenated equal the whole document's (tested on the bundled tokenizer): right after a
    newline that is followed by a non-space, else just before a space that sits between two
    non-space characters; only a window of ``piece_chars`` with neither (e.g. unbroken CJK text)
    is cut hard, which can change the tokens at that one cut.
    """
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        lo, hi = start + piece_chars // 2, start + piece_chars
        cut = _newline_cut(text, lo, hi) or _space_cut(text, lo, hi) or hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _newline_cut(text: str, lo: int, hi: int) -> int | None:
    i = text.rfind("\n", lo, hi)
    while i >= lo:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo, i)
    return None


def _space_cut(text: str, lo: int, hi: int) -> int | None:
    i = text.rfind(" ", lo, hi)
    while i > lo:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo, i)
    return None


def _encode(tokenizer, batch: list[str], batch_bytes: int) -> list[np.ndarray]:
    """Original ids of every document of ``batch``; long documents go through in pieces so that
    one call never holds more than about ``batch_bytes`` of text (memory stays bounded)."""
    pieces, owner = [], []
    for j, doc in enumerate(batch):
        parts = split_long_document(doc, PIECE_CHARS) if len(doc) > PIECE_CHARS else [doc]
        pieces += parts
        owner += [j] * len(parts)
    ids: list[list[np.ndarray]] = [[] for _ in batch]
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which nothing here reads
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    start = 0
    while start < len(pieces):
        end, size = start, 0
        while end < len(pieces) and (end == start or size + len(pieces[end]) <= batch_bytes):
            size += len(pieces[end])
            end += 1
        try:
            encodings = encode(pieces[start:end], add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - the tokenizer's own error, reported in one line
            raise InputError(f"the tokenizer cannot encode this corpus: {_first_line(e)}",
                             "use a tokenizer that encodes any text (a WordLevel model needs an unk_token)") from e
        for k, e in zip(range(start, end), encodings):
            ids[owner[k]].append(np.array(e.ids, dtype=np.int32))
        start = end
    return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in ids]


def _tokenized(spec, tokenizer, docs, stats, batch_size, batch_bytes, progress) -> Iterator[list[np.ndarray]]:
    limit = spec.max_tokens
    tokens = documents = nbytes = 0
    for batch in _batches(docs, batch_size, batch_bytes):
        out = _encode(tokenizer, batch, batch_bytes)
        done = False
        if limit is not None and tokens + sum(len(a) for a in out) >= limit:
            kept = []
            for a in out:  # keep whole documents, then cut the one that crosses the limit
                if tokens + len(a) >= limit:
                    kept.append(a[: limit - tokens])
                    tokens = limit
                    break
                kept.append(a)
                tokens += len(a)
            out, done = kept, True
        else:
            tokens += sum(len(a) for a in out)
        documents += len(out)
        nbytes += sum(len(d.encode("utf-8")) for d in batch[: len(out)])
        stats.tokens, stats.documents, stats.bytes = tokens, documents, nbytes
        progress("tokenize", tokens, limit, documents=documents, tokens=tokens,
                 skipped_files=len(stats.skipped_files))
        yield out
        if done:
            return
    if tokens == 0:
        raise InputError(f"corpus is empty: its {documents} documents hold no tokens",
                         "check the input files and --text-column")


# ---------------------------------------------------------------------------------------------
# fingerprint for manifests


def corpus_fingerprint(spec: CorpusSpec, progress: ProgressFn | None = None) -> dict[str, Any]:
    """What a manifest records about the corpus: every input file with size and sha256.

    ``corpus_sha256`` hashes the file contents in order with the reading options (text column,
    document mode, split), not the paths nor the shard, so shards of one corpus read on different
    machines (different mount points) agree on it; the merge checks that. Hub datasets are
    recorded by name, config and split only (their content cannot be hashed without reading it).
    """
    progress = report(progress)
    sources = resolve_sources(spec)
    files: list[Path] = []
    hub: list[dict[str, Any]] = []
    for s in sources:
        if s.kind == "hf_hub":
            hub.append({"name": s.location, "config": s.config, "split": spec.hf_split})
        elif s.kind == "hf_disk":
            files += sorted(p for p in Path(s.location).rglob("*") if p.is_file())
        else:
            files.append(Path(s.location))
    total = sum(_size(p) for p in files)
    done = 0
    records = []
    h = hashlib.sha256()
    h.update(json.dumps({"text_column": spec.text_column, "doc_mode": spec.doc_mode,
                         "hf_split": spec.hf_split}, sort_keys=True).encode())
    for p in files:
        size = _size(p)
        try:
            digest = sha256_file(p)
        except OSError:
            digest = None  # unreadable: the reader skips or refuses it
        records.append({"path": str(p), "bytes": size, "sha256": digest})
        h.update(f"{digest} {size}\n".encode())
        done += size
        progress("hash", done, total)
    for d in hub:
        h.update(json.dumps(d, sort_keys=True).encode())
    return {
        "sources": list(spec.sources),
        "text_column": spec.text_column,
        "doc_mode": spec.doc_mode,
        "hf_split": spec.hf_split,
        "shard": list(spec.shard) if spec.shard else None,
        "max_tokens": spec.max_tokens,
        "files": records,
        "hub": hub,
        "bytes": total,
        "corpus_sha256": h.hexdigest(),
    }


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0

