"""The token cache: a corpus tokenized once into one int32 stream of ORIGINAL tokenizer ids,
every document followed by the end-of-document token.

The stream is saved as ``stream.npy`` in ``<cache_dir>/tokens-<key>/`` and memory-mapped on later
reads. ``key`` is a sha256 of the corpus content fingerprint (:func:`corpus_fingerprint`: file
contents and reading options), the tokenizer and vocab-map fingerprints, ``max_tokens`` and the
end-of-document id, so a second reader of the same inputs skips the tokenizer and any change to
them makes a new entry. ``engram build-tables`` fills it while counting; ``engram train``, ``eval``
and ``sweep`` read it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
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


def load_or_build_token_cache(spec, tokenizer, vocab, cache_dir: str | os.PathLike, *, eos_id: int,
                              corpus_fp: dict[str, Any] | None = None,
                              progress: ProgressFn | None = None) -> TokenCache:
    """Return the cached stream for (corpus, tokenizer, vocab, max_tokens, EOS), tokenizing on a miss.

    ``spec`` is a :class:`engram_cli.corpus.spec.CorpusSpec`, ``tokenizer`` a ``LoadedTokenizer``,
    ``vocab`` the ``VocabMap`` (only its fingerprint enters the key). A new entry is written to a
    temp directory and renamed into place, so a crash never leaves a half-written entry and two
    runs building the same entry at once both end with a complete one.
    """

    progress = report(progress)
    corpus_fp = corpus_fp if corpus_fp is not None else corpus_fingerprint(spec)
    key = cache_key(corpus_fp, tokenizer.fingerprint, vocab.fingerprint, spec.max_tokens, eos_id)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"token cache path {cache_dir} is a file, not a directory",
                         "pass a directory as --cache-dir (it is created if missing)")
    entry = cache_dir / f"tokens-{key[:20]}"
    cached = _open_entry(entry, key)
    if cached is not None:
        return cached
    try:
        return _build_entry(spec, tokenizer, entry, key, eos_id, progress)
    except OSError as e:
        if e.filename is None or not Path(e.filename).absolute().is_relative_to(cache_dir.absolute()):
            raise  # not the cache's (a corpus file, say): the usual one-line disk error
        name = errno.errorcode.get(e.errno or 0, "OSError")
        raise ArtifactError(f"cannot write the token cache in {cache_dir}: {e.strerror or e} on {e.filename} ({name})",
                            "pass a writable --cache-dir (it is created if missing)") from e


def find_token_cache(cache_dir: str | os.PathLike, key: str) -> TokenCache | None:
    """The intact cache entry for ``key`` (see :func:`cache_key`) under ``cache_dir``, or None;
    never tokenizes. Readers of a finished run (``engram eval``) find its exact training stream
    this way without needing the corpus files."""
    cache_dir = Path(cache_dir)
    return _open_entry(cache_dir / f"tokens-{key[:20]}", key) if cache_dir.is_dir() else None


def _open_entry(entry: Path, key: str) -> TokenCache | None:
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
    if verify_hashes_default() and sha256_file(entry / STREAM_FILE) != meta.get("stream_sha256"):
        return None  # edited in place: rebuilt
    return TokenCache(path=entry, key=key, stream=stream, documents=int(meta["documents"]),
                      eos_id=int(meta["eos_id"]), hit=True, stats=meta.get("corpus_stats", {}))


def _build_entry(spec, tokenizer, entry: Path, key: str, eos_id: int, progress: ProgressFn) -> TokenCache:
    tmp = make_temp_dir(entry)
    try:
        stats = CorpusStats()
        # Two passes over a growing list of arrays would hold the corpus twice; instead append to
        # a raw file and wrap it in a .npy header at the end.
        raw = tmp / "stream.raw"
        n_tokens = n_docs = 0
        eos = np.array([eos_id], dtype=np.int32)
        with open(raw, "wb") as f:
            for docs in iter_tokenized(spec, tokenizer.tokenizer, stats=stats, progress=progress):
                for ids in docs:
                    if len(ids) == 0:
                        continue
                    f.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
                    f.write(eos.tobytes())
                    n_tokens += len(ids) + 1
                    n_docs += 1
        _raw_to_npy(raw, tmp / STREAM_FILE, n_tokens)
        raw.unlink()
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "tokens": n_tokens,
                "stream_sha256": sha256_file(tmp / STREAM_FILE),
                "documents": n_docs, "eos_id": eos_id, "tokenizer": tokenizer.fingerprint,
                "corpus_stats": stats.to_dict()}
        atomic_write_json(tmp / CACHE_META, meta)
        fsync_tree(tmp)
        if _open_entry(entry, key) is None:  # else another process finished the same entry first
            try:
                swap_in(tmp, entry)  # (replacing a damaged entry in the way)
            except OSError:  # another process's entry landed between our renames
                shutil.rmtree(entry.with_name(f".{entry.name}.new-{os.getpid()}"), ignore_errors=True)
                if _open_entry(entry, key) is None:
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cached = _open_entry(entry, key)
    if cached is None:  # pragma: no cover - only if the file system lost what we just wrote
        raise ArtifactError(f"token cache entry {entry} could not be read back", "check the --cache-dir disk")
    cached.hit = False
    return cached


def _raw_to_npy(raw: Path, out: Path, n: int) -> None:
    """Write ``raw`` (n little-endian int32) as a .npy file without loading it whole."""
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.int32, shape=(n,))
    src = np.memmap(raw, dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, np.int32)
    step = 1 << 24
    for i in range(0, n, step):
        arr[i:i + step] = src[i:i + step]
    arr.flush()
    del arr, src


