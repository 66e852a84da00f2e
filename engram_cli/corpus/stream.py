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

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core.artifacts import sha256_file
from engram_cli.core.errors import ConfigError, InputError, first_line
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.readers import Reader
from engram_cli.corpus.spec import CorpusSpec, CorpusStats, Source, resolve_sources

PIECE_CHARS = 1 << 20               # longer documents are tokenized in pieces (bounded memory)
DEFAULT_BATCH_BYTES = 4 << 20       # 4 MiB of text per tokenizer call
DEFAULT_BATCH_SIZE = 1024           # documents; see docs/corpus.md for the measurement
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
            raise InputError(f"the tokenizer cannot encode this corpus: {first_line(e)}",
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


def prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Tokenization (Rust, releases the GIL) then overlaps with counting in the calling thread.
    An exception in the producer is re-raised in the consumer; closing the consumer early stops
    the producer at its next item.
    """

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((True, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=produce, name="engram-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


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

