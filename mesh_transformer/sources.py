"""Raw corpora: which files an input names (files, directories, globs, `datasets` save_to_disk folders;
local or gs://) and the documents each holds (text, lm_dataformat JSON lines, zstd/gzip, Parquet, Arrow),
streamed, with bad records counted as skips and unusable files reported in one line. A document is a text,
or a fine-tuning example (prompt, completion) whose prompt the loss will not count. Tokenizing and packing
them is prepare.py's job.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from typing import Any

import zstandard

from mesh_transformer.errors import UserError
from mesh_transformer.storage import is_gcs, join, list_objects, open_file, split_gcs

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)  # Arrow IPC, stream or file format (what `datasets` save_to_disk writes)
SKIP_REASONS = ("bad_json", "missing_text", "invalid_utf8", "empty")
DATASETS_STATE = "state.json"  # marks a `datasets` save_to_disk folder (one split)
DATASETS_DICT = "dataset_dict.json"  # marks a folder of several such splits
FINE_TUNING_FIELDS = ("prompt", "completion")
ROWS_PER_BATCH = 1024  # Parquet rows turned into Python strings at a time

# A text, or a fine-tuning example whose prompt is context only: (prompt, completion).
Document = str | tuple[str, str]


class DataError(UserError):
    """A problem the user caused (missing path, corrupt file, unusable tokenizer); the message is one line."""


def expand_inputs(inputs: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every file named by `inputs` (files, directories, globs), in a deterministic order."""
    if not inputs:
        raise DataError("no inputs given; expected text or JSON-lines files, directories or globs")
    files: list[tuple[str, int]] = []
    for spec in inputs:
        found = _expand_gcs(spec) if is_gcs(spec) else _expand_local(spec)
        if not found:
            raise DataError(f"input not found: {spec} (expected an existing file, directory or glob)")
        files.extend(_datasets_folder(spec, found))
    return files


def _datasets_folder(spec: str, found: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A `datasets` save_to_disk folder stands for its Arrow files, in the order its state.json lists them;
    anything else is returned as found."""
    sizes = dict(found)
    folder = spec.rstrip("/")
    if join(folder, DATASETS_DICT) in sizes:
        splits = sorted({p[len(folder) + 1 :].split("/")[0] for p in sizes if p.startswith(folder + "/")})
        splits = [s for s in splits if s != DATASETS_DICT]
        raise DataError(
            f"{spec} holds several `datasets` splits ({', '.join(splits)}); pass one split's folder, "
            f"e.g. {join(folder, splits[0] if splits else 'train')}"
        )
    state_path = join(folder, DATASETS_STATE)
    if state_path not in sizes:
        return found
    try:
        with open_file(state_path) as f:
            names = [entry["filename"] for entry in json.loads(f.read())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_path}: not a `datasets` state.json ({e!r})") from None
    files = []
    for name in names:
        path = join(folder, name)
        if path not in sizes:
            raise DataError(f"{spec} is an incomplete `datasets` folder: {name} is missing")
        files.append((path, sizes[path]))
    return files


def _expand_local(spec: str) -> list[tuple[str, int]]:
    if os.path.isfile(spec):
        return [(spec, os.path.getsize(spec))]
    if os.path.isdir(spec):
        found = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        return [(f, os.path.getsize(f)) for f in found if os.path.isfile(f)]
    if glob.has_magic(spec):
        return [(f, os.path.getsize(f)) for f in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(f)]
    return []


def _expand_gcs(spec: str) -> list[tuple[str, int]]:
    import fnmatch

    bucket, name = split_gcs(spec)
    magic = glob.has_magic(name)
    prefix = name[: min((name.find(c) for c in "*?[" if c in name), default=len(name))] if magic else name
    blobs = [(url[len(f"gs://{bucket}/") :], size) for url, size in list_objects(f"gs://{bucket}/{prefix}")]
    if magic:
        chosen = [b for b in blobs if fnmatch.fnmatchcase(b[0], name)]
    else:
        exact = [b for b in blobs if b[0] == name]
        directory = name.rstrip("/") + "/"
        chosen = exact or [b for b in blobs if b[0].startswith(directory)]
    return [(f"gs://{bucket}/{key}", size) for key, size in chosen]


# ----------------------------------------------------------------------------------------------------------
# Reading documents from raw files.


class SkipCounter:
    """Counts lines/documents skipped for a recoverable reason; with `strict` the first one is fatal."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {_REASON_TEXT[reason]} (--strict makes this fatal)")
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)


_REASON_TEXT = {
    "bad_json": "not a JSON object (truncated or malformed line)",
    "missing_text": "no string text (the text column, or a prompt and a completion)",
    "invalid_utf8": "invalid UTF-8",
    "empty": "empty document",
}


class Source:
    """One input file being read; `position` is about the number of its raw bytes consumed so far.

    `text_column` names the text field of JSON lines and the text column of Parquet and Arrow files; a record
    without it but with string "prompt" and "completion" fields (or columns) is a fine-tuning example."""

    def __init__(self, path: str, size: int = 0, text_column: str = "text"):
        self.path, self.size, self.text_column = path, size, text_column
        self.raw: Any = None
        self.rows_done, self.rows_total = 0, 0  # columnar files report progress in rows

    @property
    def position(self) -> int:
        if self.rows_total:
            return self.size * self.rows_done // self.rows_total
        try:
            return self.raw.tell() if self.raw is not None else 0
        except (OSError, ValueError):
            return 0

    def documents(self, skips: SkipCounter) -> Iterator[Document]:
        lower = self.path.lower()
        try:
            with open_file(self.path) as raw:
                self.raw = raw
                if lower.endswith(PARQUET_SUFFIXES):
                    yield from self._parquet(raw, skips)
                    return
                if lower.endswith(ARROW_SUFFIXES):
                    yield from self._arrow(raw, skips)
                    return
                stream = _decompressed(raw, lower)
                _reject_binary(stream, self.path)
                if lower.endswith(JSONL_SUFFIXES):
                    yield from self._json_lines(stream, skips)
                else:
                    yield from self._whole_file(stream, skips)
        except FileNotFoundError:
            raise DataError(f"input not found: {self.path}") from None
        except (zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{self.path}: corrupt or truncated gzip data ({e})") from None
        except zstandard.ZstdError as e:
            raise DataError(f"{self.path}: corrupt or truncated zstd data ({e})") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e})") from None

    def _whole_file(self, stream: io.BufferedIOBase, skips: SkipCounter) -> Iterator[str]:
        data = stream.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skips.skip("invalid_utf8", self.path)
            return
        if not text.strip():
            skips.skip("empty", self.path)
            return
        yield text

    def _json_lines(self, stream: io.BufferedIOBase, skips: SkipCounter) -> Iterator[Document]:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                skips.skip("invalid_utf8", where)
                continue
            try:
                record = json.loads(decoded)
            except ValueError:
                skips.skip("bad_json", where)
                continue
            if not isinstance(record, dict):
                skips.skip("missing_text", where)
                continue
            text = record.get(self.text_column)
            if isinstance(text, str):
                document: Any = text
            else:
                document = tuple(record.get(k) for k in FINE_TUNING_FIELDS)
            # A JSON "\ud800" escape decodes to a lone surrogate, which no tokenizer can take.
            surrogates = "\\ud" in decoded or "\\uD" in decoded
            checked = _checked(document, where, skips, surrogates)
            if checked is not None:
                yield checked

    # ----- columnar files: a record batch at a time -----

    def _columns(self, schema: Any) -> list[str]:
        """The text column, else the prompt and completion columns; one clear line if neither is usable."""
        import pyarrow as pa

        names = schema.names
        wanted = [self.text_column] if self.text_column in names else list(FINE_TUNING_FIELDS)
        if not all(c in names for c in wanted):
            raise DataError(
                f"{self.path}: no column {self.text_column!r} (columns: {', '.join(names) or 'none'}); "
                "pass --text-column NAME, or give 'prompt' and 'completion' columns for fine-tuning examples"
            )
        for column in wanted:
            kind = schema.field(column).type
            if pa.types.is_dictionary(kind):
                kind = kind.value_type
            if not (
                pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            ):
                raise DataError(f"{self.path}: column {column!r} holds {kind}, expected strings")
        return wanted

    def _record_batches(
        self, batches: Iterator[Any], columns: list[str], skips: SkipCounter
    ) -> Iterator[Document]:
        row = 0
        for batch in batches:
            values = [_strings(batch.column(batch.schema.get_field_index(c))) for c in columns]
            for record in zip(*values, strict=True):
                row += 1
                # Arrow strings are valid UTF-8 once decoded: no lone surrogates to look for
                document = record[0] if len(record) == 1 else record
                checked = _checked(document, f"{self.path}: row {row}", skips, surrogates=False)
                if checked is not None:
                    yield checked
            self.rows_done += batch.num_rows

    def _parquet(self, raw: Any, skips: SkipCounter) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(raw)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: not a Parquet file ({_first_line(e)})") from None
        columns = self._columns(parquet.schema_arrow)
        self.rows_total = max(1, parquet.metadata.num_rows)
        # One row group at a time (Arrow decodes a row group's column chunk whole; iter_batches alone would
        # also join small row groups into batches of ROWS_PER_BATCH rows).
        batches = (
            batch
            for group in range(parquet.num_row_groups)
            for batch in parquet.iter_batches(ROWS_PER_BATCH, row_groups=[group], columns=columns)
        )
        try:
            yield from self._record_batches(batches, columns, skips)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: corrupt Parquet data ({_first_line(e)})") from None

    def _arrow(self, raw: Any, skips: SkipCounter) -> Iterator[Document]:
        import pyarrow as pa

        try:
            is_file_format = raw.read(6) == b"ARROW1"
            raw.seek(0)
            reader = pa.ipc.open_file(raw) if is_file_format else pa.ipc.open_stream(raw)
            if is_file_format:
                batches: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            columns = self._columns(reader.schema)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: not an Arrow IPC file ({_first_line(e)})") from None
        try:
            yield from self._record_batches(batches, columns, skips)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: corrupt Arrow data ({_first_line(e)})") from None


def _strings(column: Any) -> list[Any]:
    """A string column's values as Python strings (None for nulls and for invalid UTF-8)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        out = []
        for value in column:
            try:
                out.append(value.as_py())
            except UnicodeDecodeError:
                out.append(b"")  # not a string: counted as invalid UTF-8 by _checked
        return out


def _checked(document: Any, where: str, skips: SkipCounter, surrogates: bool = True) -> Document | None:
    """The document if it is usable, else None with the reason counted. A tuple is (prompt, completion)."""
    parts = document if isinstance(document, tuple) else (document,)
    if any(isinstance(p, bytes) for p in parts):
        skips.skip("invalid_utf8", where)
        return None
    if not all(isinstance(p, str) for p in parts):
        skips.skip("missing_text", where)
        return None
    if surrogates and not all(_encodable(p) for p in parts):
        skips.skip("invalid_utf8", where)
        return None
    if not "".join(parts).strip():
        skips.skip("empty", where)
        return None
    return document


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _ZstdStream(io.RawIOBase):
    """Decompresses concatenated zstd frames; unlike zstandard's stream_reader, a truncated last frame
    is an error rather than a silently shorter file."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self.pending):
            compressed = self.raw.read(1 << 20)
            if not compressed:
                if self.in_frame:
                    raise zstandard.ZstdError("truncated: the last frame is incomplete")
                return 0
            self.pending = memoryview(self._decompress(compressed))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _decompress(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            out.append(self.frame.decompress(compressed))
            self.in_frame = True
            if not self.frame.eof:
                break
            compressed = self.frame.unused_data
            self.frame = zstandard.ZstdDecompressor().decompressobj()
            self.in_frame = False
        return b"".join(out)


def _decompressed(raw: Any, lower: str) -> io.BufferedIOBase:
    if lower.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
    if lower.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), buffer_size=1 << 20)
    return io.BufferedReader(raw, buffer_size=1 << 20) if not isinstance(raw, io.BufferedReader) else raw


def _reject_binary(stream: io.BufferedReader, path: str) -> None:
    if b"\x00" in stream.peek(8192)[:8192]:
        raise DataError(
            f"{path}: binary data (NUL bytes); expected UTF-8 text or JSON lines "
            f"({', '.join(JSONL_SUFFIXES)}, or any other name for plain text)"
        )


def default_corpus_files() -> list[str]:
    """The embedded demo corpus: top-level Python standard library modules (sorted; about 4-5 MB)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))
