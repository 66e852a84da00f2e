"""What a corpus is: the reading options (:class:`CorpusSpec`), the sources they resolve to
(:class:`Source`: files, ``save_to_disk`` directories, hub datasets) and the figures kept while
reading (:class:`CorpusStats`). :mod:`engram_cli.corpus.readers` reads each kind of source;
:mod:`engram_cli.corpus.stream` streams documents and tokens from them (``docs/corpus.md``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engram_cli.core.errors import ConfigError, InputError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
HUB_PREFIX = "hf:"

# Tokenizer batches are closed at this many documents or this many UTF-8 bytes, whichever comes
# first: the byte cap keeps a batch of whole-file documents from holding gigabytes of text.


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


