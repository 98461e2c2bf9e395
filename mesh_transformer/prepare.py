"""Dataset preparation: raw corpora (text, lm_dataformat JSON lines, zstd/gzip; local or gs://) to shards.

Documents are tokenized in worker processes, each followed by EOS, packed into one token stream per split
and written as raw uint16/uint32 shards plus `index.json`; the output appears only once it is complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from mesh_transformer.sources import (
    DataError,
    SkipCounter,
    Source,
    expand_inputs,
)
from mesh_transformer.storage import gcs_blob, is_gcs, join, open_file, path_exists

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "mesh-transformer-tokens"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# Text per tokenizer call: enough to keep the tokenizer's threads busy, little enough to stream.
CHUNK_CHARS = 1 << 20


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
        self.current: Source | None = None

    @property
    def position(self) -> int:
        return self.finished_bytes + (self.current.position if self.current else 0)

    def chunks(self, skips: SkipCounter) -> Iterator[list[str]]:
        chunk: list[str] = []
        chars = 0
        for path, size in self.files:
            source = self.current = Source(path)
            for text in source.documents(skips):
                chunk.append(text)
                chars += len(text)
                if chars >= CHUNK_CHARS:
                    yield chunk
                    chunk, chars = [], 0
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
            itertools.chain.from_iterable(Source(p).documents(SkipCounter(False)) for p, _ in files),
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
        gcs_blob(join(output_dir, *name.split(os.sep))).upload_from_filename(os.path.join(work, name))
