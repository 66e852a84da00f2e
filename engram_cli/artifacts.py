"""Artifact directories: one per pipeline stage, each with a ``manifest.json``.

A stage writes its files into a temporary sibling directory (``.<name>.tmp-<pid>``) and renames
it into place only when every file is complete, so an interrupted run never leaves a directory
that a later stage would accept, and an existing artifact survives a failed ``--force`` rerun
until the new one is complete.

The manifest states, in this order: ``format`` and ``format_version`` (first, as in HF
``tokenizer.json``), the engram version, the creation time, the resolved configuration, sha256
fingerprints of the inputs, the list of files (with sizes and sha256) and summary figures.
Loaders call :func:`read_manifest`, which checks the format, the version and that every listed
file is present, and names the command that produces the artifact when something is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_cli import __version__
from engram_cli.errors import ArtifactError

MANIFEST = "manifest.json"

#: artifact format name -> (current format version, the command that produces it)
FORMATS: dict[str, tuple[int, str]] = {
    "engram.vocab": (1, "engram normalize-vocab"),
    "engram.tables": (1, "engram build-tables"),
    "engram.ngram_shard": (2, "engram build-tables --shard I/N"),
    "engram.run": (1, "engram train"),
    "engram.gates": (1, "engram inspect-gates --corpus"),
}


def manifest_header(fmt: str, version: int | None = None) -> dict[str, Any]:
    """The first four fields of every manifest and state file engram writes: ``format``,
    ``format_version`` (default: the current version of the artifact format ``fmt``),
    ``engram_version`` and ``created`` (local time, ISO 8601)."""
    if version is None:
        version, _ = FORMATS[fmt]
    return {"format": fmt, "format_version": version, "engram_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | os.PathLike, *, what: str, producer: str) -> Any:
    """Parse a JSON file written by engram; a missing or malformed file is an ArtifactError
    naming ``what`` it is and the ``producer`` command that recreates it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist", f"create it with `{producer}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is not valid JSON ({e.__class__.__name__})",
                            f"recreate it with `{producer} --force`") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory",
                            "choose another --out path")
    if out.exists() and any(out.iterdir()) and not force:
        raise ArtifactError(f"output directory {out} already exists",
                            "pass --force to replace it, or choose another --out")
    return out


@dataclass
class ArtifactWriter:
    """Collects files in a temp directory; :meth:`commit` writes the manifest and renames.

    Use through :func:`artifact_dir`. ``path(name)`` gives where to write a data file.
    """

    out: Path
    tmp: Path
    format: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return p

    def _manifest(self) -> dict[str, Any]:
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        return {
            **manifest_header(self.format),
            "config": self.config,
            "inputs": self.inputs,
            "files": files,
            "summary": self.summary,
        }

    def commit(self) -> dict[str, Any]:
        manifest = self._manifest()
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


@contextmanager
def artifact_dir(out: str | os.PathLike, fmt: str, *, force: bool = False) -> Iterator[ArtifactWriter]:
    """Context manager for writing one artifact directory atomically.

    >>> with artifact_dir("out/vocab", "engram.vocab", force=True) as w:   # doctest: +SKIP
    ...     np.save(w.path("vocab_map.npy"), table)
    ...     w.summary["canonical_vocab_size"] = 98765

    On an exception the temp directory is removed and ``out`` is left as it was.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown artifact format {fmt!r}")
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = ArtifactWriter(out=out, tmp=tmp, format=fmt)
    try:
        yield writer
        writer.commit()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(directory: str | os.PathLike, fmt: str, *, verify_hashes: bool = False) -> dict[str, Any]:
    """Load and validate ``directory/manifest.json`` for an artifact of format ``fmt``.

    Checks that the directory and manifest exist, that the format and version match and that
    every listed file is present (and, with ``verify_hashes``, unchanged). Errors name the
    command that produces the artifact.
    """
    version, producer = FORMATS[fmt]
    directory = Path(directory)
    what = fmt.split(".", 1)[1]
    if not directory.is_dir():
        raise ArtifactError(f"{what} directory {directory} does not exist",
                            f"create it with `{producer}`")
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: it is not a {what} artifact",
                            f"create it with `{producer}`")
    manifest = read_json(directory / MANIFEST, what="manifest", producer=producer)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{directory} holds a {got!r} artifact, expected {fmt!r}",
                            f"pass a directory made by `{producer}`")
    if manifest.get("format_version") != version:
        raise ArtifactError(
            f"{directory} has {fmt} format version {manifest.get('format_version')}, this engram reads {version}",
            f"recreate it with `{producer}`")
    for name, meta in manifest.get("files", {}).items():
        p = directory / name
        if not p.is_file():
            raise ArtifactError(f"{directory} is incomplete: {name} is missing",
                                f"recreate it with `{producer} --force`")
        if verify_hashes and sha256_file(p) != meta.get("sha256"):
            raise ArtifactError(f"{p} was modified after it was written (sha256 mismatch)",
                                f"recreate it with `{producer} --force`")
    return manifest
