"""The token cache: a corpus tokenized once into one int32 stream of ORIGINAL tokenizer ids,
every document followed by the end-of-document token.

The stream is saved as ``stream.npy`` in ``<cache_dir>/tokens-<key>/`` and memory-mapped on later
reads. ``key`` is a sha256 of the corpus content fingerprint (:func:`corpus_fingerprint`: file
contents and reading options), the tokenizer and vocab-map fingerprints, ``max_tokens`` and the
end-of-document id, so a second reader of the same inputs skips the tokenizer and any change to
them makes a new entry. ``engram build-tables`` fills it in the tokenizer pass that counts
(:class:`TokenCacheWriter`) and counts from it when the entry exists (:func:`iter_cached_documents`);
``engram train``, ``eval`` and ``sweep`` read it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core.artifacts import (
    atomic_write_json,
    fsync_tree,
    make_temp_dir,
    sha256_file,
    swap_in,
    verify_hashes_default,
)
from engram_cli.core.errors import ArtifactError, InputError
from engram_cli.core.progress import ProgressFn, report
from engram_cli.corpus.spec import CorpusStats
from engram_cli.corpus.stream import corpus_fingerprint, iter_tokenized

CACHE_FORMAT = "engram.token_cache"
CACHE_VERSION = 2
STREAM_FILE = "stream.npy"
CACHE_META = "meta.json"


# ---------------------------------------------------------------------------------------------
# the token cache


@dataclass
class TokenCache:
    """The corpus as one memory-mapped stream of original ids (EOS after every document)."""

    path: Path             # the cache entry directory
    key: str               # sha256 of what the stream depends on (see module docstring)
    stream: np.ndarray     # (N,) int32, memory-mapped
    documents: int
    eos_id: int
    hit: bool              # True: read from the cache; False: tokenized by this call
    stats: dict[str, Any]  # corpus reading figures (documents, bytes, skipped files ...)


def cache_key(corpus_fp: dict[str, Any], tokenizer_fp: str, vocab_fp: str, max_tokens: int | None,
              eos_id: int) -> str:
    """sha256 over everything the cached stream depends on."""
    key = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "corpus_sha256": corpus_fp["corpus_sha256"],
           "hub": corpus_fp.get("hub", []), "shard": corpus_fp.get("shard"), "tokenizer": tokenizer_fp,
           "vocab": vocab_fp, "max_tokens": max_tokens, "eos_id": eos_id}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/../.engram-cache``: shared by the runs of one output folder."""
    return Path(run_dir).resolve().parent / ".engram-cache"


def entry_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """The entry directory of ``key`` under ``cache_dir`` (present or not); refuses a ``cache_dir``
    that is a file."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"token cache path {cache_dir} is a file, not a directory",
                         "pass a directory as --cache-dir (it is created if missing)")
    return cache_dir / f"tokens-{key[:20]}"


def load_or_build_token_cache(spec, tokenizer, vocab, cache_dir: str | os.PathLike, *, eos_id: int,
                              corpus_fp: dict[str, Any] | None = None,
                              progress: ProgressFn | None = None) -> TokenCache:
    """Return the cached stream for (corpus, tokenizer, vocab, max_tokens, EOS), tokenizing on a miss.

    ``spec`` is a :class:`engram_cli.corpus.spec.CorpusSpec`, ``tokenizer`` a ``LoadedTokenizer``,
    ``vocab`` the ``VocabMap`` (only its fingerprint enters the key). A miss is written through a
    :class:`TokenCacheWriter`: a crash never leaves a half-written entry and two runs building the
    same entry at once both end with a complete one.
    """

    progress = report(progress)
    corpus_fp = corpus_fp if corpus_fp is not None else corpus_fingerprint(spec)
    key = cache_key(corpus_fp, tokenizer.fingerprint, vocab.fingerprint, spec.max_tokens, eos_id)
    cached = _open_entry(entry_path(cache_dir, key), key)
    if cached is not None:
        return cached
    try:
        with TokenCacheWriter(cache_dir, key, eos_id, tokenizer.fingerprint) as writer:
            stats = CorpusStats()
            for docs in iter_tokenized(spec, tokenizer.tokenizer, stats=stats, progress=progress):
                writer.add(docs)
            return writer.commit(stats)
    except OSError as e:
        raise cache_write_error(e, cache_dir) from e


def cache_write_error(e: OSError, cache_dir: str | os.PathLike) -> OSError | ArtifactError:
    """An OSError met while writing in ``cache_dir`` as one line naming ``--cache-dir``; any other
    (a corpus file, say) as it is, for the usual one-line disk error."""
    cache_dir = Path(cache_dir)
    if e.filename is None or not Path(e.filename).absolute().is_relative_to(cache_dir.absolute()):
        return e
    name = errno.errorcode.get(e.errno or 0, "OSError")
    return ArtifactError(f"cannot write the token cache in {cache_dir}: {e.strerror or e} on {e.filename} ({name})",
                         "pass a writable --cache-dir (it is created if missing)")


def cache_dir_holding(key: str, default: str | os.PathLike, *others: str | os.PathLike | None) -> Path:
    """The first of ``default, *others`` that holds an entry for ``key`` (its meta file: loading
    verifies the rest), else ``default``, where a miss is then built. ``engram train`` passes the
    directory the tables' build-tables filled as another, so a run whose ``--out`` is elsewhere
    (a sweep's runs) still reads the stream build-tables wrote."""
    for d in (default, *others):
        if d is not None and Path(d).is_dir() and (entry_path(d, key) / CACHE_META).is_file():
            return Path(d)
    return Path(default)


def find_token_cache(cache_dir: str | os.PathLike, key: str) -> TokenCache | None:
    """The intact cache entry for ``key`` (see :func:`cache_key`) under ``cache_dir``, or None;
    never tokenizes. Readers of a finished run (``engram eval``) find its exact training stream
    this way without needing the corpus files."""
    cache_dir = Path(cache_dir)
    return _open_entry(entry_path(cache_dir, key), key) if cache_dir.is_dir() else None


def _open_entry(entry: Path, key: str, known_sha256: str | None = None) -> TokenCache | None:
    meta_path = entry / CACHE_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        stream = np.load(entry / STREAM_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # a damaged entry is rebuilt, not trusted
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION \
            or meta.get("key") != key or stream.dtype != np.int32 or stream.ndim != 1 \
            or stream.shape[0] != meta.get("tokens"):
        return None
    if (known_sha256 is None or meta.get("stream_sha256") != known_sha256) and verify_hashes_default() \
            and sha256_file(entry / STREAM_FILE) != meta.get("stream_sha256"):
        return None  # edited in place: rebuilt
    return TokenCache(path=entry, key=key, stream=stream, documents=int(meta["documents"]),
                      eos_id=int(meta["eos_id"]), hit=True, stats=meta.get("corpus_stats", {}))


class TokenCacheWriter:
    """Writes one cache entry from the tokenized documents handed to it batch by batch, so that
    whoever tokenizes the corpus (:func:`load_or_build_token_cache`, or ``engram build-tables``
    while it counts) fills the cache in the same pass, without holding the corpus in memory.

    The ids go straight into ``stream.npy`` in a temp directory beside the entry, behind a
    ``.npy`` header written for an empty stream; :meth:`commit` rewrites the header in place for
    the final length (NumPy pads the header so that the shape can grow: its size does not change),
    hashes the file once, writes ``meta.json`` and renames the directory into place. The file is
    byte for byte what ``np.save`` writes for the same array (tested). Leaving the ``with`` block
    without a commit (an error, an interrupt) removes the temp directory: no partial entry is ever
    visible under the entry's name.
    """

    def __init__(self, cache_dir: str | os.PathLike, key: str, eos_id: int, tokenizer_fp: str) -> None:
        self.entry = entry_path(cache_dir, key)
        self.key, self.eos_id, self.tokenizer_fp = key, eos_id, tokenizer_fp
        self.tokens = self.documents = 0
        self._made_dir = not self.entry.parent.exists()  # removed again if nothing is committed
        self.entry.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = make_temp_dir(self.entry)
        self._stream = self._tmp / STREAM_FILE
        self._file = open(self._stream, "wb")  # noqa: SIM115 - closed by commit / close
        self._header = _npy_header(0)
        self._file.write(self._header)

    def __enter__(self) -> TokenCacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def add(self, docs: list[np.ndarray]) -> None:
        """Append one batch of documents (ORIGINAL ids each), every non-empty one followed by the
        end-of-document id; an empty document adds nothing (as it adds no separator when counted)."""
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        self.add_concatenated(flat, lengths)

    def add_concatenated(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """:meth:`add` for a batch given as its documents' ids one after another and each
        document's length (what build-tables has at hand for counting): no Python step per document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        kept = lengths[lengths > 0]
        if not kept.shape[0]:
            return
        out = np.empty(ids.shape[0] + kept.shape[0], dtype=np.int32)   # (tokens + documents,)
        eos_at = np.cumsum(kept + 1) - 1                               # each document's end, shifted
        is_id = np.ones(out.shape[0], dtype=bool)
        is_id[eos_at] = False
        out[is_id] = ids
        out[eos_at] = self.eos_id
        self._file.write(out.astype("<i4", copy=False).tobytes())
        self.tokens += out.shape[0]
        self.documents += kept.shape[0]

    def commit(self, stats: CorpusStats) -> TokenCache:
        """Finish the entry (``stats``: the corpus reading figures of the pass) and return it."""
        header = _npy_header(self.tokens)
        if len(header) != len(self._header):  # pragma: no cover - NumPy pads the header for growth
            raise ArtifactError(f"cannot finish the token cache header for {self.tokens} tokens",
                                "report this (NumPy's .npy header changed size)")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": self.key, "tokens": self.tokens,
                "stream_sha256": sha256_file(self._stream),
                "documents": self.documents, "eos_id": self.eos_id, "tokenizer": self.tokenizer_fp,
                "corpus_stats": stats.to_dict()}
        atomic_write_json(self._tmp / CACHE_META, meta)
        fsync_tree(self._tmp)
        entry, ours = self.entry, None
        if _open_entry(entry, self.key) is None:  # else another process finished the same entry first
            try:
                swap_in(self._tmp, entry)  # (replacing a damaged entry in the way)
                ours = meta["stream_sha256"]
            except OSError:  # another process's entry landed between our renames
                shutil.rmtree(entry.with_name(f".{entry.name}.new-{os.getpid()}"), ignore_errors=True)
                if _open_entry(entry, self.key) is None:
                    raise
        self.close()
        # read back; the stream's hash is not computed again where it is the file just hashed
        cached = _open_entry(entry, self.key, known_sha256=ours)
        if cached is None:  # pragma: no cover - only if the file system lost what we just wrote
            raise ArtifactError(f"token cache entry {entry} could not be read back", "check the --cache-dir disk")
        cached.hit = False
        return cached

    def close(self) -> None:
        """Drop what was not committed (nothing after a commit), and the cache directory if this
        writer made it and it is still empty."""
        self._file.close()
        if self._tmp.exists():
            shutil.rmtree(self._tmp, ignore_errors=True)
            if self._made_dir:
                with contextlib.suppress(OSError):  # not empty: another writer's entry is there
                    self.entry.parent.rmdir()


def _npy_header(n: int) -> bytes:
    """The ``.npy`` header of an int32 array of shape (n,), as ``np.save`` writes it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i4")),
                                               "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def iter_cached_documents(cache: TokenCache, chunk_tokens: int = 1 << 23) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The cached stream as the documents it was made of: per chunk of about ``chunk_tokens``
    tokens, (their ids one after another without the end-of-document ids, each document's length).

    Only exact where :func:`splits_into_documents` holds; a chunk ends after a whole document.
    """
    s, eos = cache.stream, cache.eos_id
    n, start = int(s.shape[0]), 0
    while start < n:
        end = min(start + chunk_tokens, n)
        while True:
            chunk = np.asarray(s[start:end])
            ends = np.flatnonzero(chunk == eos)
            if ends.size or end == n:
                break
            end = min(end + chunk_tokens, n)  # one document longer than a chunk
        if not ends.size:  # pragma: no cover - a stream always ends with the end-of-document id
            raise ArtifactError(f"token cache entry {cache.path} does not end a document", "delete the entry")
        chunk = chunk[: ends[-1] + 1]
        keep = np.ones(chunk.shape[0], dtype=bool)
        keep[ends] = False
        yield chunk[keep], np.diff(ends, prepend=-1) - 1
        start += int(ends[-1]) + 1


def splits_into_documents(cache: TokenCache, chunk_tokens: int = 1 << 23) -> bool:
    """Whether the stream's end-of-document ids are exactly its documents' ends: no document held
    the id in its own text and no document was empty (an empty one leaves no trace in the stream)."""
    if int(cache.stats.get("documents", -1)) != cache.documents:
        return False
    s, n = cache.stream, int(cache.stream.shape[0])
    found = sum(int(np.count_nonzero(np.asarray(s[i:i + chunk_tokens]) == cache.eos_id))
                for i in range(0, n, chunk_tokens))
    return found == cache.documents
