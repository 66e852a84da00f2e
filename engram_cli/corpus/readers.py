"""The readers of every corpus format (``engram_cli.corpus.stream`` streams documents through them):
plain text (a document per file or per line), JSON lines / JSON arrays, Parquet (a record batch
at a time), ``datasets`` directories made by ``save_to_disk`` and hub datasets (``hf:``).

A file that cannot be read or is not valid UTF-8 raises ``BadFile``; ``engram_cli.corpus.stream``
skips and counts it, or refuses it with ``--no-skip-bad-files``. A malformed JSON record is
counted in ``CorpusStats.bad_records`` (with a few examples), never silently dropped.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

from engram_cli.core.errors import InputError, first_line
from engram_cli.corpus.spec import HUB_PREFIX, CorpusSpec, CorpusStats, Source

READ_CHUNK = 4 << 20               # bytes per read in the UTF-8 check
PARQUET_BATCH_ROWS = 1024          # rows per Parquet record batch
HF_BATCH_ROWS = 1000               # rows per batch read from a save_to_disk dataset
MAX_BAD_RECORDS_KEPT = 20          # bad-record examples kept in CorpusStats


class BadFile(Exception):
    """Raised inside a reader for a file to skip (or refuse); carries the reason."""


class Reader:
    """Reads sources into raw texts (None / blank = no document) and applies the bad-input policy."""

    def __init__(self, spec: CorpusSpec, stats: CorpusStats):
        self.spec = spec
        self.stats = stats

    def bad_record(self, where: str, reason: str) -> None:
        if not self.spec.skip_bad_files:
            raise InputError(f"{where}: {reason}",
                             "fix or remove the record; without --no-skip-bad-files bad records are skipped")
        self.stats.bad_records += 1
        if len(self.stats.bad_record_examples) < MAX_BAD_RECORDS_KEPT:
            self.stats.bad_record_examples.append((where, reason))

    def texts(self, source: Source) -> Iterator[str | None]:
        reader = {"text": self._text, "json": self._json, "parquet": self._parquet,
                  "hf_disk": self._hf_disk, "hf_hub": self._hf_hub}[source.kind]
        it = reader(source)
        try:
            next(it)  # the reader's "opened" marker: opening errors surface before any document
        except BadFile as e:
            self._skip(source.location, str(e))
            return
        self.stats.files += 1
        yield from it

    def _skip(self, path: str, reason: str) -> None:
        if not self.spec.skip_bad_files:
            raise InputError(f"cannot read {path}: {reason}",
                             "fix, convert (e.g. `iconv -f latin1 -t utf-8`) or remove the file; "
                             "without --no-skip-bad-files it is skipped")
        self.stats.skipped_files.append((path, reason))

    # Each reader first yields one marker ("") once the file is open and valid, which ``texts``
    # drops, so that opening and validation errors are raised before any document leaves.

    def _text(self, source: Source) -> Iterator[str | None]:
        path = source.location
        if self.spec.doc_mode == "file":
            data = _read_bytes(path)
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise BadFile(f"not valid UTF-8 (byte {e.start})") from None
            yield ""
            yield text
            return
        _check_utf8(path)
        yield ""
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for line in f:
                yield line.rstrip("\n")

    def _json(self, source: Source) -> Iterator[str | None]:
        path = source.location
        _check_utf8(path)
        col = self.spec.text_column
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(1 << 12).lstrip()
        if head.startswith("["):  # one JSON array: parsed whole
            try:
                with open(path, encoding="utf-8-sig") as f:
                    records = json.load(f)
            except json.JSONDecodeError as e:
                raise BadFile(f"not valid JSON (line {e.lineno})") from None
            yield ""
            for i, rec in enumerate(records):
                yield self._field(rec, col, path, f"{path}[{i}]", first=i == 0)
            return
        yield ""
        first = True
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    self.bad_record(f"{path}:{lineno}", f"not valid JSON ({e.msg})")
                    continue
                yield self._field(rec, col, path, f"{path}:{lineno}", first=first)
                first = False

    def _field(self, rec: Any, col: str, path: str, where: str, *, first: bool) -> str | None:
        if not isinstance(rec, dict):
            self.bad_record(where, f"a JSON {type(rec).__name__}, not an object")
            return None
        if col not in rec:
            if first:
                raise missing_column_error(path, col, list(rec), [k for k, v in rec.items() if isinstance(v, str)])
            return None
        value = rec[col]
        if value is None or isinstance(value, str):
            return value
        self.bad_record(where, f"field {col!r} is a {type(value).__name__}, not a string")
        return None

    def _parquet(self, source: Source) -> Iterator[str | None]:
        import pyarrow as pa  # lazy: pyarrow is loaded only for Parquet inputs
        import pyarrow.parquet as pq  # lazy: pyarrow is loaded only for Parquet inputs

        path, col = source.location, self.spec.text_column
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise BadFile(f"not a readable Parquet file ({first_line(e)})") from None
        schema = pf.schema_arrow
        if col not in schema.names:
            texty = [f.name for f in schema if _is_text_type(f.type)]
            raise missing_column_error(path, col, schema.names, texty)
        if not _is_text_type(schema.field(col).type):
            raise InputError(f"{path}: column {col!r} holds {schema.field(col).type}, not text",
                             "pass --text-column with a string column")
        yield ""
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[col]):
                yield from batch.column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:  # corruption after the first batches
            raise InputError(f"{path} is damaged: {first_line(e)}", "recreate or remove the file") from None

    def _hf_disk(self, source: Source) -> Iterator[str | None]:
        datasets = import_datasets(source.location)
        path, col = source.location, self.spec.text_column
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for damaged directories
            raise BadFile(f"not a loadable save_to_disk dataset ({first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.spec.hf_split not in ds:
                raise InputError(f"dataset {path} has no split {self.spec.hf_split!r} (splits: {', '.join(ds)})",
                                 f"pass --hf-split with one of: {', '.join(ds)}")
            ds = ds[self.spec.hf_split]
        if col not in ds.column_names:
            texty = [k for k, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
            raise missing_column_error(path, col, ds.column_names, texty)
        yield ""
        for batch in ds.select_columns([col]).iter(batch_size=HF_BATCH_ROWS):
            yield from batch[col]

    def _hf_hub(self, source: Source) -> Iterator[str | None]:
        name, col = source.location, self.spec.text_column
        label = HUB_PREFIX + name + (f":{source.config}" if source.config else "")
        datasets = import_datasets(label)
        try:
            ds = datasets.load_dataset(name, source.config, split=self.spec.hf_split, streaming=True)
            records = iter(ds)
            first = next(records, None)
        except Exception as e:  # network, auth, unknown name or split: all user-fixable
            raise InputError(f"cannot open hub dataset {label} ({first_line(e)})",
                             "check the name, split and network; offline, pass a directory made by save_to_disk") from e
        if first is None:
            yield ""
            return
        if col not in first:
            raise missing_column_error(label, col, list(first), [k for k, v in first.items() if isinstance(v, str)])
        yield ""
        yield first[col]
        for rec in records:
            yield rec.get(col)


def import_datasets(where: str):
    """The ``datasets`` package, or one clear error naming the extra that installs it."""
    try:
        import datasets  # lazy: the `hf` extra; only save_to_disk directories and hub datasets need it
    except ImportError:
        raise InputError(f"{where}: reading Hugging Face datasets needs the `hf` extra, which is not installed",
                         "run `pip install 'engram-cli[hf]'`, or pass text, JSONL or Parquet files") from None
    return datasets


def missing_column_error(where: str, col: str, columns: list[str], text_columns: list[str]) -> InputError:
    """The error for a text column that is not there, listing the columns that are."""
    suggest = text_columns or columns
    hint = (f"pass --text-column {suggest[0]}" + (f" (text columns: {', '.join(suggest)})" if len(suggest) > 1 else "")
            if suggest else "pass --text-column NAME")
    return InputError(f"{where} has no column {col!r} (columns: {', '.join(map(str, columns)) or 'none'})", hint)


def _is_text_type(t) -> bool:
    import pyarrow as pa  # lazy: pyarrow is loaded only for Parquet inputs

    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadFile(f"unreadable ({e.strerror or type(e).__name__})") from None


def _check_utf8(path: str) -> None:
    """Raise BadFile unless the whole file decodes as UTF-8 (streamed, constant memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_CHUNK):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise BadFile(f"not valid UTF-8 (byte {offset + e.start})") from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BadFile("not valid UTF-8 (truncated sequence at the end)") from None
    except OSError as e:
        raise BadFile(f"unreadable ({e.strerror or type(e).__name__})") from None
