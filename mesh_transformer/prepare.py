"""Dataset preparation: raw corpora (text, lm_dataformat JSON lines, zstd/gzip; local or gs://) to shards.

Documents are tokenized in worker processes, each followed by EOS, packed into one token stream per split
and written as raw uint16/uint32 shards plus `index.json`; the output appears only once it is complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import zstandard

from mesh_transformer.errors import UserError
from mesh_transformer.storage import (
    is_gcs,
    join,
    list_objects,
    open_file,
    path_exists,
    split_gcs,
    upload_file,
)

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "mesh-transformer-tokens"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
SKIP_REASONS = ("bad_json", "missing_text", "invalid_utf8", "empty")
# Text per tokenizer call: enough to keep the tokenizer's threads busy, little enough to stream.
CHUNK_CHARS = 1 << 20


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
    "missing_text": 'no string "text" field',
    "invalid_utf8": "invalid UTF-8",
    "empty": "empty document",
}


class _Source:
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


# ----------------------------------------------------------------------------------------------------------
# Tokenizers.


def read_tokenizer_file(path: str) -> tuple[Any, str]:
    """(Tokenizer, its JSON text) from a local or gs:// tokenizer.json, or DataError."""
    from tokenizers import Tokenizer

    if not path_exists(path):
        raise DataError(f"tokenizer not found: {path} (expected a Hugging Face tokenizer.json)")
    try:
        with open_file(path) as f:
            text = f.read().decode("utf-8")
        return Tokenizer.from_str(text), text
    except Exception as e:
        raise DataError(f"{path}: not a usable tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def eos_id_of(tokenizer: Any, name: str) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"{name}: tokenizer has no end-of-text token (expected one of {', '.join(EOS_CANDIDATES)})"
    )


def train_tokenizer(documents: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) of at most `vocab_size` ids, <|endoftext|> being id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(
            f"tokenizer vocabulary {vocab_size} is too small; expected at least 258 (256 bytes + EOS)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


_worker_tokenizer: Any = None
_worker_eos = 0


def _init_worker(tokenizer_json: str, eos_id: int) -> None:
    from tokenizers import Tokenizer

    global _worker_tokenizer, _worker_eos
    _worker_tokenizer, _worker_eos = Tokenizer.from_str(tokenizer_json), eos_id


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with EOS after each document, tokens per document including its EOS)."""
    encodings = _worker_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    eos = (_worker_eos,)
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(e.ids, eos) for e in encodings), dtype=np.uint32
    )
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    return flat, lengths


# ----------------------------------------------------------------------------------------------------------
# Shard writing.


class _SplitWriter:
    """Appends tokens to `<split>/shard_NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, root: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        os.makedirs(os.path.join(root, split), exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._file: Any = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(piece.tobytes())
            self.shards[-1]["tokens"] += len(piece)
            self.tokens += len(piece)

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}/shard_{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.root, name), "wb")
        self.shards.append({"path": name, "tokens": 0})

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._file.close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _in_validation(doc_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """A seeded hash of each document's number decides its split, so the split is independent of workers."""
    z = doc_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
        (seed * 0xD1B54A32D192ED03) % 2**64
    )
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class _Reading:
    """Reads the sources in order, in chunks of documents; `position` counts raw bytes read so far."""

    def __init__(self, files: list[tuple[str, int]]):
        self.files = files
        self.finished_bytes = 0
        self.current: _Source | None = None

    @property
    def position(self) -> int:
        return self.finished_bytes + (self.current.position if self.current else 0)

    def chunks(self, skips: SkipCounter) -> Iterator[list[str]]:
        chunk: list[str] = []
        size = 0
        for path, size in self.files:
            source = self.current = _Source(path)
            for text in source.documents(skips):
                chunk.append(text)
                size += len(text)
                if size >= CHUNK_CHARS:
                    yield chunk
                    chunk, size = [], 0
            self.finished_bytes += size
            self.current = None
        if chunk:
            yield chunk


def _encoded(chunks: Iterator[list[str]], workers: int, tokenizer_json: str, eos: int) -> Iterator[Any]:
    """Encoded chunks in input order, with a few chunks in flight so reading overlaps tokenizing.

    One worker: threads of this process (the tokenizer releases the GIL and spreads each batch over every
    core; two batches in flight keep the cores busy while one batch's longest document finishes).
    Several: spawned processes, each with its own tokenizer.
    """
    if workers <= 1:
        _init_worker(tokenizer_json, eos)
        executor: Any = concurrent.futures.ThreadPoolExecutor(2)
        submit = executor.submit
    else:
        # spawn, not fork: the parent may hold JAX or tokenizer threads that a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        executor = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, eos))
        submit = lambda f, chunk: executor.apply_async(f, (chunk,))
    result = (lambda r: r.result()) if workers <= 1 else (lambda r: r.get())
    with executor:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(submit(_encode_chunk, chunk))
            if len(pending) > max(2, workers):
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())


# ----------------------------------------------------------------------------------------------------------
# The entry point.


def source_key(files: list[tuple[str, int]], tokenizer: str, val_fraction: float, seed: int) -> str:
    """Identifies what a dataset was prepared from, so a cached preparation is reused only when it matches."""
    blob = json.dumps([files, tokenizer, val_fraction, seed])
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_dataset(
    inputs: list[str],
    output_dir: str,
    *,
    tokenizer_path: str | None = None,
    train_tokenizer_vocab: int | None = None,
    seq: int = 2048,
    val_fraction: float = 0.01,
    workers: int = 1,
    seed: int = 0,
    strict: bool = False,
    max_vocab: int | None = None,
    shard_tokens: int = 1 << 28,
    progress: bool = False,
) -> dict:
    """Tokenize + pack + shard; returns the index dict (also written as output_dir/index.json).

    Copies tokenizer.json into output_dir. max_vocab: raise DataError if the tokenizer is larger.
    """
    if (tokenizer_path is None) == (train_tokenizer_vocab is None):
        raise DataError(
            "pass exactly one of a tokenizer.json (--tokenizer) or a vocabulary size to train one"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction} is out of range; expected 0 <= fraction < 1")
    if seq < 1 or workers < 1 or shard_tokens < 1:
        raise DataError(
            f"seq {seq}, workers {workers}, shard tokens {shard_tokens}: expected positive integers"
        )
    _check_output_free(output_dir)
    files = expand_inputs(inputs)

    if tokenizer_path is not None:
        tokenizer, tokenizer_json = read_tokenizer_file(tokenizer_path)
        key = source_key(files, hashlib.sha256(tokenizer_json.encode()).hexdigest(), val_fraction, seed)
    else:
        tokenizer = train_tokenizer(
            itertools.chain.from_iterable(_Source(p).documents(SkipCounter(False)) for p, _ in files),
            train_tokenizer_vocab,
        )
        tokenizer_json = tokenizer.to_str()
        key = source_key(files, f"trained:{train_tokenizer_vocab}", val_fraction, seed)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if max_vocab is not None and vocab_size > max_vocab:
        raise DataError(
            f"tokenizer {tokenizer_path or '(trained)'} has {vocab_size} tokens but the model's n_vocab is "
            f"{max_vocab}; use a smaller tokenizer or a larger n_vocab"
        )
    eos = eos_id_of(tokenizer, tokenizer_path or "trained tokenizer")
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)

    work_parent = os.path.dirname(os.path.abspath(output_dir)) if not is_gcs(output_dir) else None
    if work_parent:
        os.makedirs(work_parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir.rstrip('/'))}.partial-", dir=work_parent)
    try:
        index = _write_splits(
            files,
            work,
            tokenizer_json,
            eos,
            dtype,
            val_fraction,
            workers,
            seed,
            strict,
            shard_tokens,
            progress,
        )
        index.update(
            tokenizer=TOKENIZER_NAME,
            tokenizer_sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            vocab_size=vocab_size,
            eos_id=eos,
            dtype=dtype.name,
            seq=seq,
            seed=seed,
            val_fraction=val_fraction,
            inputs=list(inputs),
            files=len(files),
            source_key=key,
        )
        with open(os.path.join(work, TOKENIZER_NAME), "w") as f:
            f.write(tokenizer_json)
        with open(os.path.join(work, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
        _publish(work, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index


class _Packer:
    """Sends each document to the train or validation stream, in order, as a seeded hash of its number says.

    The latest train document is held back until the next one arrives, so that a corpus too small for the
    hash to pick any validation document can still give its last document to validation.
    """

    def __init__(self, work: str, dtype: np.dtype, shard_tokens: int, seed: int, val_fraction: float):
        self.train = _SplitWriter(work, "train", dtype, shard_tokens)
        self.validation = _SplitWriter(work, "validation", dtype, shard_tokens)
        self.seed, self.val_fraction, self.dtype = seed, val_fraction, dtype
        self.documents = 0
        self.held_back = np.zeros(0, dtype)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        to_val = _in_validation(
            np.arange(self.documents, self.documents + len(lengths)), self.seed, self.val_fraction
        )
        self.documents += len(lengths)
        token_to_val = np.repeat(to_val, lengths)
        if to_val.any():
            self.validation.write(tokens[token_to_val])
            self.validation.documents += int(to_val.sum())
        train_lengths = lengths[~to_val]
        if len(train_lengths):
            train_tokens = tokens[~token_to_val]
            cut = len(train_tokens) - int(train_lengths[-1])
            self.train.write(self.held_back)
            self.train.write(train_tokens[:cut])
            self.held_back = train_tokens[cut:].astype(self.dtype)
            self.train.documents += len(train_lengths)

    def close(self) -> dict[str, Any]:
        if self.validation.documents == 0 and self.train.documents >= 2 and self.val_fraction > 0:
            self.train.documents -= 1
            self.validation.documents += 1
            self.validation.write(self.held_back)
        else:
            self.train.write(self.held_back)
        return {"train": self.train.close(), "validation": self.validation.close()}


def _write_splits(
    files, work, tokenizer_json, eos, dtype, val_fraction, workers, seed, strict, shard_tokens, progress
) -> dict:
    from tqdm import tqdm

    skips = SkipCounter(strict)
    packer = _Packer(work, dtype, shard_tokens, seed, val_fraction)
    reading = _Reading(files)
    total = sum(s for _, s in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="preparing", disable=not progress) as bar:
        for tokens, lengths in _encoded(reading.chunks(skips), workers, tokenizer_json, eos):
            packer.add(tokens, lengths)
            bar.update(min(reading.position, total) - bar.n)
        bar.update(total - bar.n)
    index: dict[str, Any] = {"format": FORMAT, "version": 1, "splits": packer.close()}
    index["documents"] = sum(s["documents"] for s in index["splits"].values())
    index["tokens"] = sum(s["tokens"] for s in index["splits"].values())
    index["skipped"] = skips.counts
    index["skipped_examples"] = skips.examples
    index["input_bytes"] = total
    if index["documents"] == 0:
        skipped = ", ".join(f"{n} {r}" for r, n in skips.counts.items() if n) or "none skipped"
        raise DataError(f"no usable documents in the inputs ({len(files)} files; {skipped})")
    return index


def _check_output_free(output_dir: str) -> None:
    if is_gcs(output_dir):
        if path_exists(join(output_dir, INDEX_NAME)):
            raise DataError(f"output {output_dir} already holds a dataset; choose another path or delete it")
    elif os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise DataError(
            f"output {output_dir} already exists and is not empty; choose another path or delete it"
        )


def _publish(work: str, output_dir: str) -> None:
    """Make the finished dataset visible in one step (local rename) or index-last (gs:// upload)."""
    if not is_gcs(output_dir):
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked before preparing
        os.rename(work, output_dir)
        return
    names = sorted(os.path.relpath(os.path.join(r, n), work) for r, _, ns in os.walk(work) for n in ns)
    names.remove(INDEX_NAME)
    for name in [*names, INDEX_NAME]:  # the index last: a dataset without it is not finished
        upload_file(os.path.join(work, name), join(output_dir, *name.split(os.sep)))


def default_corpus_files() -> list[str]:
    """The embedded demo corpus: top-level Python standard library modules (sorted; about 4-5 MB)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))
