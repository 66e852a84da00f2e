"""Shards of one counting run: ``engram build-tables --shard I/N`` writes them, ``--from-shards``
merges them. Before merging, every shard manifest is read schema-checked (:func:`read_shard`)
and the set is refused unless it is exactly the N disjoint parts of one run over the same
inputs with the same options (:func:`check_shards`), naming the odd shard and what differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_cli.core.artifacts import MANIFEST, read_manifest
from engram_cli.core.errors import ArtifactError, InputError

#: what every shard of one corpus must agree on: (where in the shard manifest, what it is called)
_SHARD_AGREEMENT = (
    (("config", "max_ngram_size"), "largest n-gram order"),
    (("config", "corpus", "text_column"), "--text-column"),
    (("config", "corpus", "doc_mode"), "--doc-mode"),
    (("config", "corpus", "hf_split"), "--hf-split"),
    (("config", "corpus", "skip_bad_files"), "--skip-bad-files"),
    (("config", "corpus", "max_tokens"), "--max-tokens"),
    (("config", "tokenizer"), "--tokenizer"),
    (("inputs", "corpus", "corpus_sha256"), "corpus (file contents)"),
    (("inputs", "vocab", "sha256"), "vocab map"),
    (("config", "boundary"), "--boundary"),
    (("config", "eos_token"), "--eos-token"),
)


def _dig(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return KeyError
        doc = doc[key]
    return doc


def read_shard(directory: Path) -> tuple[dict, tuple[int, int]]:
    """The manifest of an ``engram.ngram_shard`` artifact and its (I, N), schema-checked."""
    m = read_manifest(directory, "engram.ngram_shard")
    shard = _dig(m, ("config", "corpus", "shard"))
    ok = (isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in shard) and 0 <= shard[0] < shard[1])
    missing = [".".join(p) for p, _ in _SHARD_AGREEMENT if _dig(m, p) is KeyError]
    if not ok or missing:
        what = f"a malformed shard {shard!r}" if not ok else f"no {', '.join(missing)}"
        raise ArtifactError(f"shard manifest {directory / MANIFEST} has {what}",
                            "recount it with `engram build-tables ... --shard I/N --force`")
    return m, (shard[0], shard[1])


def check_shards(manifests: list[tuple[Path, dict, tuple[int, int]]]) -> int:
    """Refuse shards that are not the N disjoint parts of one counting run; return N.

    Every shard must have the same N, n-gram order, reading options, max-tokens, tokenizer,
    vocab and corpus contents as the first one, and each I in 0..N-1 must come exactly once.
    The error names the odd shard and what differs.
    """
    first_dir, first, (_, total) = manifests[0]
    seen: dict[int, Path] = {}
    for d, m, (i, n) in manifests:
        if n != total:
            raise InputError(f"shard {d} is shard {i}/{n}, but {first_dir} is one of {total}",
                             f"merge the {total} shards of one counting run (--shard I/{total})")
        for path, what in _SHARD_AGREEMENT:
            if _dig(m, path) != _dig(first, path):
                raise InputError(f"shard {d} differs from {first_dir} in its {what} "
                                 f"({_dig(m, path)!r} vs {_dig(first, path)!r})",
                                 "count every shard over the same inputs with the same options")
        if i in seen:
            raise InputError(f"shards {seen[i]} and {d} are both shard {i}/{n}", "pass each shard once")
        seen[i] = d
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise InputError(f"shards {', '.join(f'{i}/{total}' for i in missing)} are missing",
                         "count them with `engram build-tables ... --shard I/N` and pass all N")
    return total
