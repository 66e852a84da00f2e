"""Artifact directories: one per pipeline stage, each with a ``manifest.json``.

A stage writes its files into a temporary sibling directory (``.<name>.tmp-<pid>``) and renames
it into place only when every file is complete, so an interrupted run never leaves a directory
that a later stage would accept, and an existing artifact survives a failed ``--force`` rerun
until the new one is complete. The commit protocol — fsyncs, renames, the swap and the recovery
of a commit cut short by a kill — exists once, here (docs/artifacts.md, "The commit protocol"),
and every step of it calls :func:`crash_point`, where tests/test_crash.py kills writers.

The manifest states, in this order: ``format`` and ``format_version`` (first, as in HF
``tokenizer.json``), the engram version, the creation time, the resolved configuration, sha256
fingerprints of the inputs, the list of files (with sizes and sha256) and summary figures.
Loaders call :func:`read_manifest`, which checks the format, the version and that every listed
file is present, and names the command that produces the artifact when something is missing.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram_cli import __version__
from engram_cli.core.errors import ArtifactError

MANIFEST = "manifest.json"

#: artifact format name -> (current format version, the command that produces it)
FORMATS: dict[str, tuple[int, str]] = {
    "engram.vocab": (1, "engram normalize-vocab"),
    "engram.tables": (1, "engram build-tables"),
    "engram.ngram_shard": (2, "engram build-tables --shard I/N"),
    "engram.plan": (1, "engram build-tables --plan-only"),
    "engram.run": (1, "engram train"),
    "engram.gates": (1, "engram inspect-gates --out DIR"),
    "engram.eval": (1, "engram eval --out DIR"),
    "engram.tables_inspection": (1, "engram inspect-tables --out DIR"),
    "engram.sweep": (1, "engram sweep"),
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
    """Write ``data`` to ``path``: a temp file in the same directory, fsync, rename onto ``path``,
    fsync of the directory. A reader sees the old bytes or the new ones, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        fsync_file(tmp)
        rename_into_place(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# The commit protocol (docs/artifacts.md, "The commit protocol"): every fsync, rename and swap
# engram makes goes through the functions below, and each step calls crash_point() with its
# name, so that tests/test_crash.py can kill a writer at every step and check what a reader finds.

CRASH_ENV = "ENGRAM_CRASH_AT"           # POINT[@TARGET][:N]: SIGKILL this process at the N-th such step
CRASH_TRACE_ENV = "ENGRAM_CRASH_TRACE"  # FILE: append every step reached, one POINT@TARGET a line
_crash_seen: dict[str, int] = {}


def crash_label(name: str) -> str:
    """A file or directory name with its process id and random parts replaced (``N``) or dropped,
    so that a step is named alike in every run: ``.run.tmp-4242-k2j_x9aq`` -> ``.run.tmp-N``."""
    name = re.sub(r"\.[A-Za-z0-9_]{8}\.tmp$", ".tmp", name)   # tempfile.mkstemp's random part
    name = re.sub(r"-[A-Za-z0-9_]{8}$", "", name)              # tempfile.mkdtemp's
    return re.sub(r"\d+", "N", name)


def crash_point(point: str, target: str | os.PathLike = "") -> None:
    """One step of a commit, named ``point`` (e.g. ``swap.set-aside``), acting on ``target``.

    A no-op unless a test asks: with ``ENGRAM_CRASH_AT=POINT[@TARGET][:N]`` the process kills
    itself with SIGKILL (no cleanup, no ``finally``: what a power cut or the OOM killer does) the
    N-th time (default 1) it reaches that step (on that target: :func:`crash_label` of its name);
    with ``ENGRAM_CRASH_TRACE=FILE`` it appends ``POINT@TARGET`` to FILE.
    """
    spec, trace = os.environ.get(CRASH_ENV), os.environ.get(CRASH_TRACE_ENV)
    if not spec and not trace:
        return
    label = f"{point}@{crash_label(Path(target).name) if target else ''}"
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(label + "\n")
    if not spec:
        return
    want, _, nth = spec.rpartition(":")
    if not want or not nth.isdigit():
        want, nth = spec, "1"
    if want not in (point, label):
        return
    _crash_seen[want] = _crash_seen.get(want, 0) + 1
    if _crash_seen[want] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: str | os.PathLike) -> None:
    """Make a file's bytes durable (before it is renamed into place)."""
    crash_point("fsync.file", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable (best effort: not every file system allows it)."""
    crash_point("fsync.dir", directory)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under ``directory``, then its directories: a complete artifact, before its rename."""
    directory = Path(directory)
    dirs = [directory]
    for p in sorted(directory.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fsync_file(p)
    for d in reversed(dirs):
        fsync_dir(d)


def rename_into_place(src: Path, dest: Path) -> None:
    """Rename the complete file or directory ``src`` onto ``dest`` and make it durable (a file
    at ``dest`` is replaced; a directory must not be there: :func:`swap_in` replaces one)."""
    os.replace(src, dest)
    crash_point("rename.done", dest)
    fsync_dir(dest.parent)


def remove_tree(path: Path) -> None:
    """Delete what a commit set aside or left (a file or a directory)."""
    crash_point("remove.start", path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_temp_dir(out: Path) -> Path:
    """A new temp directory beside ``out`` (``.<name>.tmp-<pid>-XXXXXXXX``) with the usual
    permissions; a writer fills it, then :func:`swap_in` commits it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; an artifact gets the usual permissions
    return tmp


def _siblings(out: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-*`` beside ``out`` (kind: new, old, tmp, trash), oldest first."""
    found = out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")
    return sorted(found, key=lambda p: (p.lstat().st_mtime, p.name))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def artifact_format(directory: str | os.PathLike) -> str | None:
    """The ``format`` named by ``directory/manifest.json``, or None when it has no readable one."""
    try:
        doc = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    return fmt if isinstance(fmt, str) else None


def _describe_contents(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(names[:3]) + (f", … ({len(names)} entries)" if len(names) > 3 else "")
    return shown


def check_output_path(out: str | os.PathLike) -> Path:
    """An output path engram can create: it has a name of its own, is no symbolic link, and no
    existing ancestor of it is a file."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise ArtifactError(f"output path {str(out)!r} names no directory of its own",
                            "pass a new directory, e.g. --out out/name")
    if out.is_symlink():
        raise ArtifactError(f"output path {out} is a symbolic link; engram does not write through it",
                            f"pass the real path ({out.resolve()}) or another --out")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ArtifactError(f"output path {out} cannot be created: {parent} is a file, not a directory",
                            "choose another --out path")
    return out


def holds_output_lock(out_of: Callable[[Any], str | os.PathLike | None]):
    """Decorator of a library function ``f(config, ...)`` that writes ``out_of(config)``: the
    function holds :func:`output_lock` on it for its whole run (None: it writes no output)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(config, *args, **kwargs):
            out = out_of(config)
            if out is None:
                return fn(config, *args, **kwargs)
            with output_lock(out):
                return fn(config, *args, **kwargs)
        return wrapper
    return decorate


def check_output_dir(out: str | os.PathLike, force: bool, fmt: str | None = None) -> Path:
    """Refuse an output path that may not be written.

    An existing non-empty directory needs ``force``, and ``force`` replaces only an engram
    artifact of the same kind (``fmt``; any engram artifact when ``fmt`` is None): a directory
    of other files, a symbolic link or a regular file is never replaced.
    """
    out = check_output_path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory", "choose another --out path")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not force:
        raise ArtifactError(f"output directory {out} already exists",
                            "pass --force to replace it, or choose another --out")
    found = artifact_format(out)
    wanted = fmt if fmt is not None else "an engram artifact"
    if found is None or found not in FORMATS or (fmt is not None and found != fmt):
        what = f"a {found!r} artifact" if found else f"files that are not an engram artifact ({_describe_contents(out)})"
        raise ArtifactError(f"{out} holds {what}; --force replaces only {wanted!r}",
                            "choose another --out (engram never deletes what it did not write)")
    return out


def check_output_file(dest: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output file that may not be written: an existing file without ``force``, a
    directory, and — even with ``force`` — one of the command's ``inputs`` or a path inside an
    input directory (an export must never destroy what it was computed from)."""
    dest = Path(dest)
    if dest.is_dir():
        raise ArtifactError(f"output file {dest} is a directory", "pass a file name")
    target = dest.resolve()
    for src in inputs:
        src_path = Path(src)
        if not src_path.exists():
            continue
        if (dest.exists() and os.path.samefile(dest, src_path)) or target == src_path.resolve():
            raise ArtifactError(f"{dest} is an input of this command; writing it would destroy it",
                                "choose another output file")
        if src_path.is_dir() and target.is_relative_to(src_path.resolve()):
            raise ArtifactError(f"{dest} lies inside the input {src_path}; engram does not write into its inputs",
                                "choose an output file outside it")
    if dest.exists() and not force:
        raise ArtifactError(f"output file {dest} already exists", "pass --force to replace it, or choose another name")
    return dest


@contextmanager
def atomic_output(dest: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``dest`` to write to; renamed onto ``dest`` only when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(0o666))
        fsync_file(tmp)
        rename_into_place(Path(tmp), dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``out`` for the lifetime of a writer.

    The lock is ``flock`` on ``.<name>.lock`` beside ``out`` (released by the kernel when the
    process dies, so a killed writer never leaves a stale lock); the holder's pid is written into
    it. A second writer gets an :class:`ArtifactError` naming that pid. Re-entrant within a
    process (a command that locks and then calls a library function that locks again).
    """
    out = check_output_path(out)
    key = str(out.absolute())
    if key in _HELD:
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    fd = _acquire(lock, out)
    try:
        _HELD.add(key)
        try:
            recover_output(out)
            yield out
        finally:
            _HELD.discard(key)
            lock.unlink(missing_ok=True)  # before the release: a waiter then finds a new file
    finally:
        os.close(fd)


def lock_file(lock: Path, busy: str, hint: str) -> int:
    """flock ``lock`` (created if missing) without waiting and write this pid into it; a lock
    another process holds is one ArtifactError ``busy`` (with the holder's pid) + ``hint``. The
    kernel releases it when the process dies. Returns the open descriptor (close it to unlock)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ArtifactError(f"{busy} (pid {holder})", hint) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _acquire(lock: Path, out: Path) -> int:
    """:func:`lock_file` for an output; retry when the file was replaced while we locked it."""
    while True:
        fd = lock_file(lock, f"{out} is being written by another engram process",
                       "wait for it to finish, or choose another --out")
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we locked it: lock the new file


_HELD: set[str] = set()


def recover_output(out: Path) -> None:
    """Finish what a killed writer of ``out`` left (call only while holding :func:`output_lock`).

    Forward when a complete new version waits in ``.<name>.new-<pid>`` (the writer was killed
    during its swap): it goes into place. Back when ``out`` is missing and the previous version
    sits in ``.<name>.old-<pid>``: it is put back. Then the leftovers — temp directories of
    unfinished writes (``.tmp-``), set-aside copies (``.old-``, ``.trash-``) — are removed.
    """
    news = _siblings(out, "new")
    if news:
        if out.exists():
            os.replace(out, out.with_name(f".{out.name}.old-{os.getpid()}"))
        os.replace(news[-1], out)
        fsync_dir(out.parent)
    elif not out.exists() and (olds := _siblings(out, "old")):
        os.replace(olds[-1], out)
        fsync_dir(out.parent)
    for kind in ("new", "old", "tmp", "trash"):
        for p in _siblings(out, kind):
            remove_tree(p)


def interrupted_commit(out: Path) -> bool:
    """Whether a killed writer left a version of ``out`` beside it for :func:`recover_output`."""
    return bool(_siblings(out, "new") or (not out.exists() and _siblings(out, "old")))


def recover_for_reader(out: str | os.PathLike, lock: str | os.PathLike | None = None) -> None:
    """A reader's half of recovery: when a writer was killed in the middle of swapping ``out``
    (``out`` missing, or a new version waiting beside it), finish that commit
    (:func:`recover_output`) under the writer's lock (``lock``: the output it guards, default
    ``out``), so that the reader finds the complete old or new version where it looks. A live
    writer's lock is an ArtifactError naming its pid."""
    out = Path(out)
    if not interrupted_commit(out):
        return
    try:
        with output_lock(lock if lock is not None else out):
            recover_output(out)
    except OSError as e:
        kept = (_siblings(out, "new") or _siblings(out, "old"))[-1]
        raise ArtifactError(f"{out} was being replaced when its writer stopped; its last complete version "
                            f"is {kept.name} beside it, and it cannot be moved back ({e.strerror})",
                            f"rename {kept} to {out}") from None


def swap_in(work: Path, out: Path) -> None:
    """Put the complete artifact in ``work`` in the place of the one at ``out`` (which may be absent).

    ``work`` (its files fsynced by the writer) is renamed to ``.<name>.new-<pid>``, the previous
    ``out`` to ``.<name>.old-<pid>``, the new one onto ``out``; then the old one is removed. A kill
    at any step is finished by the next writer or reader (:func:`recover_output`): forward while
    the new version waits, back while only the old one does.
    """
    pid = os.getpid()
    new, old = out.with_name(f".{out.name}.new-{pid}"), out.with_name(f".{out.name}.old-{pid}")
    os.replace(work, new)
    crash_point("swap.staged", out)
    had = out.exists()
    if had:
        os.replace(out, old)
        crash_point("swap.set-aside", out)
    os.replace(new, out)
    crash_point("swap.renamed", out)
    fsync_dir(out.parent)
    if had:
        remove_tree(old)


def discard(path: Path) -> None:
    """Remove a committed file or directory in one step for readers: renamed to
    ``.<name>.trash-<pid>`` (no reader looks there), then deleted."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    crash_point("discard.renamed", path)
    remove_tree(trash)


def _umask_mode(mode: int = 0o777) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


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
        crash_point("commit.manifest-written", self.out)
        fsync_tree(self.tmp)
        swap_in(self.tmp, self.out)  # the previous artifact is replaced only now that this one is complete
        return manifest


@contextmanager
def artifact_dir(out: str | os.PathLike, fmt: str, *, force: bool = False) -> Iterator[ArtifactWriter]:
    """Context manager for writing one artifact directory atomically.

    >>> with artifact_dir("out/vocab", "engram.vocab", force=True) as w:   # doctest: +SKIP
    ...     np.save(w.path("vocab_map.npy"), table)
    ...     w.summary["canonical_vocab_size"] = 98765

    On an exception the temp directory is removed and ``out`` is left as it was. The writer holds
    :func:`output_lock` on ``out`` throughout, and ``force`` replaces only an artifact of the same
    format (:func:`check_output_dir`), and only once the new one is complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown artifact format {fmt!r}")
    out = Path(out)
    with output_lock(out):
        out = check_output_dir(out, force, fmt)
        tmp = make_temp_dir(out)
        writer = ArtifactWriter(out=out, tmp=tmp, format=fmt)
        try:
            yield writer
            writer.commit()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def verify_hashes_default() -> bool:
    """Whether loaders recompute sha256 of what they read: yes unless ``ENGRAM_VERIFY=size``
    (sizes are always checked; hashing a multi-GB artifact on every load may be skipped)."""
    return os.environ.get("ENGRAM_VERIFY", "hash").strip().lower() != "size"


def inside(directory: Path, name: Any) -> Path:
    """``directory / name`` for a relative path that stays inside ``directory``; else ArtifactError."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"{directory}/{MANIFEST} names a file outside the artifact: {name!r}",
                            "recreate the artifact; engram reads only files inside it")
    return directory / name


def check_schema(doc: Any, where: str, fields: dict[str, type | tuple[type, ...]], fix: str) -> dict:
    """``doc`` must be a JSON object whose ``fields`` have the given types (one ArtifactError)."""
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where} is not a JSON object", fix)
    for key, typ in fields.items():
        if key not in doc:
            raise ArtifactError(f"{where} has no {key!r}", fix)
        if not isinstance(doc[key], typ) or (typ is int and isinstance(doc[key], bool)):
            raise ArtifactError(f"{where}: {key!r} is a {type(doc[key]).__name__}, not what engram wrote", fix)
    return doc


_MANIFEST_FIELDS = {"format": str, "format_version": int, "config": dict, "inputs": dict, "files": dict,
                    "summary": dict}


def read_manifest(directory: str | os.PathLike, fmt: str, *, verify_hashes: bool | None = None) -> dict[str, Any]:
    """Load and validate ``directory/manifest.json`` for an artifact of format ``fmt``.

    Checks that the directory and manifest exist, the manifest's schema, that the format and
    version match, that every listed file lies inside the directory and is present with its
    recorded size and (``verify_hashes``, default :func:`verify_hashes_default`) sha256. Errors
    name the command that produces the artifact. Entries a later commit of their own may change
    are marked: ``append_only`` (a log), ``pointer`` (e.g. ``ckpt/latest.json``; its reader
    checks it) are not compared; a ``prunable`` file (a checkpoint's) may be gone, and is
    compared when present. A writer killed while swapping ``directory`` is finished first
    (:func:`recover_for_reader`), so a reader never reports missing what sits recoverable beside it.
    """
    version, producer = FORMATS[fmt]
    directory = Path(directory)
    what = fmt.split(".", 1)[1]
    fix = f"recreate it with `{producer} --force`"
    recover_for_reader(directory)
    if not directory.is_dir():
        hint = f"create it with `{producer}`"
        if directory.exists():
            raise ArtifactError(f"{what} path {directory} is a file, not an artifact directory", hint)
        raise ArtifactError(f"{what} directory {directory} does not exist", hint)
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
    check_schema(manifest, f"{directory}/{MANIFEST}", _MANIFEST_FIELDS, fix)
    verify = verify_hashes_default() if verify_hashes is None else verify_hashes
    for name, meta in manifest["files"].items():
        p = inside(directory, name)
        check_schema(meta, f"{directory}/{MANIFEST} entry {name!r}", {"bytes": int, "sha256": str}, fix)
        if meta.get("append_only") is True or meta.get("pointer") is True:
            continue  # a log that grows (metrics.jsonl) or a pointer rewritten by its own commit: its reader checks it
        if not p.is_file():
            if meta.get("prunable") is True:
                continue  # a checkpoint file: pruned (or deleted) after this manifest was written
            raise ArtifactError(f"{directory} is incomplete: {name} is missing", fix)
        if p.stat().st_size != meta["bytes"] or (verify and sha256_file(p) != meta["sha256"]):
            raise ArtifactError(f"{p} is corrupt: modified after it was written (size or sha256 mismatch)", fix)
    return manifest
