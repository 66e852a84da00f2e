"""The row store: one Engram layer's concatenated table (``rows`` x ``dim`` float32) outside torch,
in RAM or in a memory-mapped file, initialized lazily, with its optimizer's row state beside it.

Today a layer's tables are one ``nn.Embedding(sum(head_sizes), D)`` (heads concatenated at
``plan.head_offsets(layer)``), which must fit in RAM three times over with SparseAdam's two
moments. A :class:`RowStore` holds the same concatenated table behind a small interface —
:meth:`~RowStore.gather` rows, :meth:`~RowStore.scatter` rows, the same for the optimizer's state
(:meth:`~RowStore.gather_state`, :meth:`~RowStore.scatter_state`), :meth:`~RowStore.flush` — so
that where the rows live changes nothing else (FBGEMM's ``EmbeddingLocation`` idea). Two backends:

* ``memory``: NumPy arrays in RAM (``np.zeros``: calloc'd, so untouched rows cost no memory either);
* ``mmap``: files in a directory, memory-mapped (never read whole), created as **sparse files**
  (``truncate`` to size), so untouched rows cost no disk.

**Initialization** (:func:`initial_rows`, the one definition): rows are grouped in blocks of
``block_rows`` (1,024) rows. Block ``b`` of layer ``L`` under seed ``s`` is
``standard_normal((block_rows, dim), float32) * float32(std)`` drawn from NumPy's counter-based
``Philox`` generator with key ``(s mod 2**64, L)`` and counter ``(0, 0, b, 0)`` (the block index
sits in the third 64-bit word, so a block's 2**128 draws never reach the next block's). Row ``r``
is row ``r mod block_rows`` of its block. A row's initial value is thus a function of
(seed, layer, row) alone: it never depends on the table's size, on when the row is first read, or
on which rows were read before. Both backends materialize a block on its first touch (a gather or
scatter of any of its rows or of their state) and record it in the block map; a read-only store computes untouched
blocks without writing them. (This replaces torch's ``normal_(0, init_std)`` from the run's seed.)

**Optimizer state**: named float32 arrays of ``(rows, width)`` beside the rows (e.g. Adam's ``m``
and ``v`` of width ``dim``, row-wise Adagrad's ``sum_sq`` of width 1; ``engram_cli.train.rowopt``),
with the same backend and sparsity. State starts at zero (a hole reads as zero).

**Dirty rows**: every scatter (rows or state) adds its rows to the set of rows changed since the
last :meth:`~RowStore.mark_clean` (what a delta checkpoint writes, ``engram_cli.train.deltas``),
and sets the block's ``DIRTY`` flag in the block map (persisted in the ``mmap`` backend, so a
killed run can tell which blocks may differ from its last checkpoint).

**On-disk layout** (``mmap``; format ``engram.rowstore`` version 1), one set of files per layer in
the store directory, ``P = layer_<L>``:

============================ =================================================================
``P.json``                   header: ``format``, ``format_version``, ``plan_fingerprint``,
                             ``layer_id``, ``rows``, ``dim``, ``dtype`` ("float32"),
                             ``block_rows``, ``seed``, ``init_std``, ``state`` ({name: width})
``P.rows.f32``               the rows, row-major, little-endian float32: ``rows * dim * 4`` bytes
                             (a sparse file: only materialized blocks use disk)
``P.blocks.u8``              one byte per block (``ceil(rows / block_rows)``): bit 0 ``INIT``
                             (materialized), bit 1 ``DIRTY`` (written since the last mark_clean)
``P.state.<name>.f32``       each state array, ``rows * width * 4`` bytes, sparse, zero at start
``P.lock``                   the writer's lock (``flock``; holds its pid)
============================ =================================================================

Opening checks the header against what the caller expects (plan fingerprint, layer, rows, dim,
block size, seed, init std, state) and every file's size (a truncated file is refused); a
mismatch is one :class:`~engram_cli.core.errors.ArtifactError`. One process writes a store: a
second writer is refused (``flock``, released by the kernel when the writer dies); readers
(``writable=False``) take no lock.

**Faults.** A write through a memory map into a hole of a sparse file needs a disk block; on a
full disk the kernel cannot give one and kills the process with SIGBUS instead of returning an
error. So the ``mmap`` backend *reserves* a block before it writes it: materializing a block
calls ``posix_fallocate`` on its byte range in the rows file and in every state file first (the block
map is reserved whole when the store is opened), and only then writes the initial rows and sets
``INIT``. A full disk (``ENOSPC``, or a quota: ``EDQUOT``) thus raises :class:`StoreFullError`
(one line) before anything of the block was written: the store stays as it was (a reserved range
that was not written reads as zeros, like a hole, and its block is still uninitialized), and the
run's last checkpoint is intact. (Copy-on-write filesystems — btrfs, ZFS — may still need new
blocks when a reserved page is rewritten; there the guarantee is the filesystem's.) A store is
created only on a filesystem with sparse files (:func:`check_sparse_files`: a 64 MiB probe file
must take almost no disk); elsewhere ``mmap`` is refused with one line, since every table would
take its full size on disk at once. Bytes changed in place inside a store file cannot be detected
without hashing the whole table; what readers verify is the checkpoint's delta chain (a sha256
per delta, ``engram_cli.train.deltas``), and ``rollback`` re-derives every block written after
the last checkpoint from it.

Threads: a lock serializes block materialization and scatters, so a background prefetch
(``engram_cli.train.prefetch``) may gather while the main thread writes back; gathered rows that
a concurrent scatter changes are re-read by the prefetcher (a :class:`WriteWatch` records them).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_cli.core.artifacts import atomic_write_json, lock_file, read_json
from engram_cli.core.errors import ArtifactError, ConfigError

STORE_FORMAT = "engram.rowstore"
STORE_VERSION = 1
BLOCK_ROWS = 1024            # rows per init block unless the spec says otherwise: one Philox counter, one block-map byte
PAGE_BYTES = 4096            # the unit a sparse file is materialized in


def page_rows(dim: int) -> int:
    """Rows of ``dim`` float32 values in one page (at least 1): the block size of a run's stores,
    so that touching a row materializes (initializes, gives disk to) about one page, not 1,024
    rows — a 1B-row table touched at 1.6M scattered rows takes ~6 GiB, not ~150 GiB."""
    return max(1, PAGE_BYTES // (4 * int(dim)))
INIT, DIRTY = 1, 2           # block-map flags
BACKENDS = ("memory", "mmap")
_DTYPE = np.dtype("<f4")
_MASK64 = (1 << 64) - 1
SPARSE_PROBE_BYTES = 64 << 20   # size of the probe file that tells whether a filesystem has sparse files
_FIX = "delete the store directory to start the tables afresh, or pass the run it belongs to"


class StoreFullError(ArtifactError):
    """The disk under a row store is full (ENOSPC) or over quota (EDQUOT): a block could not be
    reserved, so nothing of it was written (module docstring, "Faults")."""

    def __init__(self, message: str, hint: str, errno_: int):
        super().__init__(message, hint)
        self.errno = errno_


# ---------------------------------------------------------------------------------------------
# the initialization (one definition)


def initial_block(seed: int, layer_id: int, block: int, dim: int, std: float,
                  block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Initial values of rows ``[block * block_rows, (block + 1) * block_rows)``: (block_rows, dim) float32."""
    gen = np.random.Generator(np.random.Philox(key=[int(seed) & _MASK64, int(layer_id) & _MASK64],
                                               counter=[0, 0, int(block), 0]))
    return gen.standard_normal((block_rows, dim), dtype=np.float32) * np.float32(std)


def initial_rows(seed: int, layer_id: int, rows: Any, dim: int, std: float,
                 block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """The initial value of each row in ``rows`` (any order, repeats allowed): (len(rows), dim) float32.

    The one definition of an Engram table's initialization (module docstring): a function of
    (seed, layer, row) alone. ``inspect-tables`` measures how far rows moved from it.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.size, dim), dtype=np.float32)
    if rows.size == 0:
        return out
    order = np.argsort(rows, kind="stable")
    blocks = rows[order] // block_rows
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], blocks.size]):
        b = int(blocks[s])
        idx = order[s:e]
        out[idx] = initial_block(seed, layer_id, b, dim, std, block_rows)[rows[idx] - b * block_rows]
    return out


# ---------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class StoreSpec:
    """What a layer's store must be: checked against an existing store's header on open."""

    layer_id: int
    rows: int                       # rows of the layer's concatenated table (plan.total_slots(layer))
    dim: int                        # floats per row (the plan's embed_dim_per_head)
    seed: int                       # the run's seed: keys the initialization
    init_std: float                 # standard deviation of the initialization (model.init_std)
    state: tuple[tuple[str, int], ...] = ()   # the optimizer's row state: (name, width) pairs
    plan_fingerprint: str = ""      # sha256 of the table plan (engram_cli.train.runs.plan_fingerprint)
    block_rows: int = BLOCK_ROWS

    def header(self) -> dict[str, Any]:
        return {"format": STORE_FORMAT, "format_version": STORE_VERSION,
                "plan_fingerprint": self.plan_fingerprint, "layer_id": self.layer_id, "rows": self.rows,
                "dim": self.dim, "dtype": "float32", "block_rows": self.block_rows, "seed": self.seed,
                "init_std": self.init_std, "state": dict(self.state)}

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)


class WriteWatch:
    """The rows scattered into a store while the watch is registered (:meth:`RowStore.watch`)."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, rows: np.ndarray) -> None:
        self._parts.append(rows.copy())

    def rows(self) -> np.ndarray:
        """Sorted unique rows written so far."""
        return np.unique(np.concatenate(self._parts)) if self._parts else np.empty(0, np.int64)


class RowStore:
    """One Engram layer's table and its optimizer row state (module docstring). Make one with
    :func:`memory_store` or :func:`open_store`; rows passed in are sorted, unique int64."""

    def __init__(self, spec: StoreSpec, backend: str, rows: np.ndarray, blockmap: np.ndarray,
                 state: dict[str, np.ndarray], *, writable: bool = True, path: Path | None = None,
                 lock_fd: int | None = None, reserve_fds: dict[str, int] | None = None):
        self.spec, self.backend, self.writable, self.path = spec, backend, writable, path
        self._rows, self._blockmap, self._state = rows, blockmap, state
        self._lock_fd = lock_fd
        self._reserve_fds = reserve_fds or {}   # mmap writer: "rows" / "state.<name>" -> fd, for fallocate
        self._mutex = threading.Lock()
        self._dirty: list[np.ndarray] = []
        self._dirty_size = 0
        self._watches: list[WriteWatch] = []

    # -- properties
    @property
    def rows(self) -> int:
        return self.spec.rows

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def state_names(self) -> list[str]:
        return [name for name, _ in self.spec.state]

    def materialized_blocks(self) -> int:
        """Blocks initialized so far (the rest are holes)."""
        return int(np.count_nonzero(self._blockmap & INIT))

    # -- rows
    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The current values of ``rows``: (k, dim) float32, a copy. Materializes untouched blocks
        (a read-only store computes them instead)."""
        rows = self._check_rows(rows)
        if not self.writable:
            out = self._rows[rows]
            fresh = (self._blockmap[rows // self.spec.block_rows] & INIT) == 0
            if fresh.any():
                s = self.spec
                out[fresh] = initial_rows(s.seed, s.layer_id, rows[fresh], s.dim, s.init_std, s.block_rows)
            return out
        self._materialize(rows)
        return self._rows[rows]

    def scatter(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (k, dim) into ``rows``; they become dirty."""
        rows = self._check_rows(rows)
        self._need_writable()
        with self._mutex:
            self._materialize_locked(rows)
            self._rows[rows] = np.asarray(values, dtype=np.float32).reshape(rows.size, self.dim)
            self._written(rows)

    # -- optimizer state
    def gather_state(self, name: str, rows: np.ndarray) -> np.ndarray:
        """State ``name`` of ``rows``: (k, width) float32 (zero where never written)."""
        return self._state_array(name)[self._check_rows(rows)]

    def scatter_state(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        rows = self._check_rows(rows)
        self._need_writable()
        arr = self._state_array(name)
        with self._mutex:
            self._materialize_locked(rows)  # reserves the block's disk (state too) before the write
            arr[rows] = np.asarray(values, dtype=np.float32).reshape(rows.size, arr.shape[1])
            self._written(rows)

    # -- dirty rows and write watches
    def dirty_rows(self) -> np.ndarray:
        """Sorted unique rows scattered (rows or state) since the last :meth:`mark_clean`."""
        with self._mutex:
            self._compact_dirty()
            return self._dirty[0].copy() if self._dirty else np.empty(0, np.int64)

    def dirty_blocks(self) -> np.ndarray:
        """Blocks flagged DIRTY in the block map (persisted by ``mmap``: survives a killed process)."""
        return np.flatnonzero(self._blockmap & DIRTY).astype(np.int64)

    def mark_clean(self) -> None:
        """Forget the dirty rows (call once the checkpoint holding them is committed)."""
        with self._mutex:
            self._dirty, self._dirty_size = [], 0
            if self.writable:
                self._blockmap &= np.uint8(~DIRTY & 0xFF)

    def watch(self) -> WriteWatch:
        """Start recording the rows scattered from now on (until :meth:`unwatch`)."""
        w = WriteWatch()
        with self._mutex:
            self._watches.append(w)
        return w

    def unwatch(self, w: WriteWatch) -> None:
        with self._mutex:
            self._watches.remove(w)

    # -- lifetime
    def flush(self) -> None:
        """Write the mapped files' dirty pages to disk (``msync``); no-op in memory."""
        if self.backend == "mmap" and self.writable:
            with self._mutex:
                for arr in (self._rows, *self._state.values(), self._blockmap):
                    arr.flush()

    def close(self) -> None:
        """Flush, unmap and release the writer lock."""
        self.flush()
        self._rows = self._blockmap = None  # type: ignore[assignment]
        self._state = {}
        for fd in self._reserve_fds.values():
            os.close(fd)
        self._reserve_fds = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals
    def _check_rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.dtype != np.int64:
            rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows outside [0, {self.rows}) of layer {self.spec.layer_id}'s table")
        return rows

    def _need_writable(self) -> None:
        if not self.writable:
            raise ArtifactError(f"the row store of layer {self.spec.layer_id} is open read-only",
                                "open it with writable=True to change it")

    def _state_array(self, name: str) -> np.ndarray:
        try:
            return self._state[name]
        except KeyError:
            raise ConfigError(f"the row store holds no optimizer state {name!r} "
                              f"(it holds {', '.join(self._state) or 'none'})") from None

    def _materialize(self, rows: np.ndarray) -> None:
        blocks = rows // self.spec.block_rows
        if rows.size and np.all(self._blockmap[blocks] & INIT):
            return
        with self._mutex:
            self._materialize_locked(rows)

    def _materialize_locked(self, rows: np.ndarray) -> None:
        s = self.spec
        blocks = np.unique(rows // s.block_rows)
        fresh = blocks[(self._blockmap[blocks] & INIT) == 0].tolist()
        if fresh and self._reserve_fds:
            self._reserve(fresh)  # every block's disk first: a full disk raises before any write
        for b in fresh:
            lo, hi = b * s.block_rows, min((b + 1) * s.block_rows, s.rows)
            self._rows[lo:hi] = initial_block(s.seed, s.layer_id, b, s.dim, s.init_std, s.block_rows)[: hi - lo]
            self._blockmap[b] |= INIT

    def _reserve(self, blocks: list[int]) -> None:
        """Allocate the disk of ``blocks`` in the rows file and every state file (posix_fallocate),
        contiguous blocks in one call; ENOSPC/EDQUOT become one :class:`StoreFullError`."""
        s = self.spec
        widths = {"rows": s.dim, **{f"state.{name}": width for name, width in s.state}}
        runs, start = [], blocks[0]
        for prev, b in zip(blocks, blocks[1:] + [None]):
            if b != prev + 1:
                runs.append((start, prev + 1))
                start = b
        for key, fd in self._reserve_fds.items():
            row_bytes = widths[key] * 4
            for b0, b1 in runs:
                lo, hi = b0 * s.block_rows, min(b1 * s.block_rows, s.rows)
                try:
                    os.posix_fallocate(fd, lo * row_bytes, (hi - lo) * row_bytes)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise _full_error(e.errno, self.path, s.layer_id,
                                      (hi - lo) * sum(w * 4 for w in widths.values())) from e

    def _written(self, rows: np.ndarray) -> None:
        """Record a scatter (caller holds the mutex)."""
        self._blockmap[np.unique(rows // self.spec.block_rows)] |= DIRTY
        self._dirty.append(rows.copy())
        self._dirty_size += rows.size
        if len(self._dirty) > 64:
            self._compact_dirty()
        for w in self._watches:
            w.add(rows)

    def _compact_dirty(self) -> None:
        if len(self._dirty) > 1:
            self._dirty = [np.unique(np.concatenate(self._dirty))]
            self._dirty_size = self._dirty[0].size


# ---------------------------------------------------------------------------------------------
# the two backends


def memory_store(spec: StoreSpec) -> RowStore:
    """A store in RAM (zeroed arrays: pages untouched stay unallocated)."""
    rows = np.zeros((spec.rows, spec.dim), dtype=np.float32)
    state = {name: np.zeros((spec.rows, width), dtype=np.float32) for name, width in spec.state}
    return RowStore(spec, "memory", rows, np.zeros(spec.blocks, dtype=np.uint8), state)


def layer_prefix(directory: Path, layer_id: int) -> Path:
    return Path(directory) / f"layer_{layer_id}"


def store_files(directory: Path, spec: StoreSpec) -> dict[str, tuple[Path, int]]:
    """Every data file of a layer's store with its exact size in bytes (module docstring)."""
    p = layer_prefix(directory, spec.layer_id)
    files = {"rows": (p.with_name(p.name + ".rows.f32"), spec.rows * spec.dim * 4),
             "blocks": (p.with_name(p.name + ".blocks.u8"), spec.blocks)}
    for name, width in spec.state:
        files[f"state.{name}"] = (p.with_name(f"{p.name}.state.{name}.f32"), spec.rows * width * 4)
    return files


def open_store(directory: str | os.PathLike, spec: StoreSpec, *, writable: bool = True,
               create: bool = True) -> RowStore:
    """Open (or, with ``create``, create) layer ``spec.layer_id``'s ``mmap`` store in ``directory``.

    An existing store must match ``spec`` field by field and every file must have its size;
    anything else is one ArtifactError naming the difference. A writer holds ``P.lock``.
    """
    directory = Path(directory)
    header_path = layer_prefix(directory, spec.layer_id).with_suffix(".json")
    files = store_files(directory, spec)
    lock_fd = None
    reserve_fds: dict[str, int] = {}
    if writable:
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(header_path.with_suffix(".lock"), directory, spec.layer_id)
    try:
        if header_path.exists():
            _check_header(read_json(header_path, what="row store header", producer="engram train"),
                          spec, header_path)
        elif create and writable:
            check_sparse_files(directory)
            for path, size in files.values():  # a sparse file of the final size: holes cost no disk
                with open(path, "wb") as f:
                    f.truncate(size)
            atomic_write_json(header_path, spec.header())  # last: a store without header is not one
        else:
            raise ArtifactError(f"{directory} holds no row store of layer {spec.layer_id} ({header_path.name} "
                                "is missing)", "train the run first, or point at its table store")
        for path, size in files.values():
            have = path.stat().st_size if path.exists() else None
            if have != size:
                what = "missing" if have is None else f"{have:,} bytes, expected {size:,}"
                raise ArtifactError(f"row store file {path} is {what} (truncated or from another table)", _FIX)
        mode = "r+" if writable else "r"
        rows = np.memmap(files["rows"][0], dtype=_DTYPE, mode=mode, shape=(spec.rows, spec.dim))
        blockmap = np.memmap(files["blocks"][0], dtype=np.uint8, mode=mode, shape=(spec.blocks,))
        state = {name: np.memmap(files[f"state.{name}"][0], dtype=_DTYPE, mode=mode, shape=(spec.rows, width))
                 for name, width in spec.state}
        if writable:  # the block map whole, now (it is small); the rows' and state's blocks as they are touched
            for key in ("blocks", "rows", *(f"state.{name}" for name, _ in spec.state)):
                reserve_fds[key] = os.open(files[key][0], os.O_RDWR)
            try:
                os.posix_fallocate(reserve_fds["blocks"], 0, max(spec.blocks, 1))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise _full_error(e.errno, directory, spec.layer_id, spec.blocks) from e
            os.close(reserve_fds.pop("blocks"))
    except BaseException:
        for fd in reserve_fds.values():
            os.close(fd)
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return RowStore(spec, "mmap", rows, blockmap, state, writable=writable, path=directory, lock_fd=lock_fd,
                    reserve_fds=reserve_fds)


def make_store(backend: str, spec: StoreSpec, directory: str | os.PathLike | None = None, **kw) -> RowStore:
    """A store of ``backend`` (``memory`` or ``mmap``; the latter in ``directory``)."""
    if backend == "memory":
        return memory_store(spec)
    if backend == "mmap":
        if directory is None:
            raise ConfigError("the mmap row store needs a directory")
        return open_store(directory, spec, **kw)
    raise ConfigError(f"unknown table store {backend!r}", f"use one of: {', '.join(BACKENDS)}")


def _check_header(doc: Any, spec: StoreSpec, path: Path) -> None:
    want = spec.header()
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise ArtifactError(f"{path} is not an engram row store header", _FIX)
    if doc.get("format_version") != STORE_VERSION:
        raise ArtifactError(f"{path} has row store layout version {doc.get('format_version')}, "
                            f"this engram reads {STORE_VERSION}", _FIX)
    for key, value in want.items():
        if doc.get(key) != value:
            raise ArtifactError(f"the row store {path} was made for another table: its {key} is "
                                f"{json.dumps(doc.get(key))}, this run's is {json.dumps(value)}", _FIX)


def _lock(lock: Path, directory: Path, layer_id: int) -> int:
    return lock_file(lock, f"the row store of layer {layer_id} in {directory} is being written by another process",
                     "wait for it to finish, or use another run directory")


def check_sparse_files(directory: str | os.PathLike) -> None:
    """Refuse (ConfigError) a ``directory`` whose filesystem has no sparse files: a probe file
    truncated to :data:`SPARSE_PROBE_BYTES` must use under a quarter of that on disk."""
    used = probe_sparse_bytes(Path(directory))
    if used is not None and used >= SPARSE_PROBE_BYTES // 4:
        raise ConfigError(f"the filesystem of {directory} has no sparse files (a {SPARSE_PROBE_BYTES >> 20} MiB "
                          f"empty file took {used >> 20} MiB of disk): --table-store mmap would take every table's "
                          "full size on disk at once",
                          "put the run on a local filesystem with sparse files (ext4, xfs, btrfs, tmpfs), "
                          "or use --table-store memory")


def probe_sparse_bytes(directory: Path) -> int | None:
    """Bytes of disk an empty file truncated to :data:`SPARSE_PROBE_BYTES` in ``directory`` takes
    (``st_blocks``); None where the filesystem does not say (st_blocks absent)."""
    probe = directory / f".sparse-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(probe, "wb") as f:
            f.truncate(SPARSE_PROBE_BYTES)
            blocks = getattr(os.fstat(f.fileno()), "st_blocks", None)
    finally:
        probe.unlink(missing_ok=True)
    return None if blocks is None else blocks * 512


def _full_error(code: int, directory: Path | None, layer_id: int, need: int) -> StoreFullError:
    what = "full" if code == errno.ENOSPC else "over its quota"
    return StoreFullError(
        f"the disk under the row store {directory} is {what} ({errno.errorcode[code]}): layer {layer_id}'s "
        f"table could not grow by {need:,} bytes; nothing of the new rows was written",
        "free disk space (or move the run to a larger disk), then continue from the last checkpoint "
        "with `engram train --out RUN --resume`", code)
