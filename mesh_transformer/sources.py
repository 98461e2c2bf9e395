"""Raw corpora: which files an input names (files, directories, globs; local or gs://) and the documents
each holds (text, lm_dataformat JSON lines, zstd/gzip), with bad lines counted as skips and unusable files
reported in one line. Tokenizing and packing them is prepare.py's job.
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
from mesh_transformer.storage import gcs_client, is_gcs, open_file

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
SKIP_REASONS = ("bad_json", "missing_text", "invalid_utf8", "empty")


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
        files.extend(found)
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

    bucket, _, name = spec[len("gs://") :].partition("/")
    magic = glob.has_magic(name)
    prefix = name[: min((name.find(c) for c in "*?[" if c in name), default=len(name))] if magic else name
    blobs = sorted(gcs_client().list_blobs(bucket, prefix=prefix), key=lambda b: b.name)
    if magic:
        chosen = [b for b in blobs if fnmatch.fnmatchcase(b.name, name)]
    else:
        exact = [b for b in blobs if b.name == name]
        directory = name.rstrip("/") + "/"
        chosen = exact or [b for b in blobs if b.name.startswith(directory) and not b.name.endswith("/")]
    return [(f"gs://{bucket}/{b.name}", b.size or 0) for b in chosen]


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
    "missing_text": 'no string "text" field',
    "invalid_utf8": "invalid UTF-8",
    "empty": "empty document",
}


class Source:
    """One input file being read; `position` is the number of raw (compressed) bytes consumed so far."""

    def __init__(self, path: str):
        self.path = path
        self.raw: Any = None

    @property
    def position(self) -> int:
        try:
            return self.raw.tell() if self.raw is not None else 0
        except (OSError, ValueError):
            return 0

    def documents(self, skips: SkipCounter) -> Iterator[str]:
        lower = self.path.lower()
        try:
            with open_file(self.path) as raw:
                self.raw = raw
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

    def _json_lines(self, stream: io.BufferedIOBase, skips: SkipCounter) -> Iterator[str]:
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
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.skip("missing_text", where)
                continue
            # A JSON "\ud800" escape decodes to a lone surrogate, which no tokenizer can take.
            if ("\\ud" in decoded or "\\uD" in decoded) and not _encodable(text):
                skips.skip("invalid_utf8", where)
                continue
            if not text.strip():
                skips.skip("empty", where)
                continue
            yield text


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
