"""Dataset preparation: raw corpora (read by sources.py; local or gs://) to packed token shards.

The input files are grouped, in order, into parts of about PART_BYTES (whole files). Each part is prepared on
its own: its documents tokenized, each followed by EOS, sent to the train or validation split by a seeded
hash of (part, document number), and packed into raw uint16/uint32 token shards, with uint8 loss-mask shards
beside them where the part holds fine-tuning examples (prompt tokens are not targets). A part gives the same
bytes wherever it runs - here, one after another, or as a Ray task on any node (prepare_cluster.py) - and
`index.json`, which lists every part's shards in order, is written last, once all of them succeeded: the
output appears only when complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from mesh_transformer.sources import DataError, Document, SkipCounter, Source, expand_inputs
from mesh_transformer.storage import (
    delete,
    is_gcs,
    join,
    list_objects,
    open_file,
    path_exists,
    upload_file,
)

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "mesh-transformer-tokens"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
SPLITS = ("train", "validation")
# Text per tokenizer call: enough to keep the tokenizer's threads busy, little enough to stream.
CHUNK_CHARS = 1 << 20
# Input bytes per part: the unit of work a Ray task prepares (a file is never split). Small enough for a
# corpus of a few large files to spread over a pod's hosts, large enough that parts' partial last shards and
# per-task overheads stay negligible.
PART_BYTES = 1_000_000_000


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


def train_tokenizer(documents: Iterator[Document], vocab_size: int) -> Any:
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
    texts = ("".join(d) if isinstance(d, tuple) else d for d in documents)  # an example: prompt + completion
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Tokenizing chunks of documents.


class Encoded(NamedTuple):
    tokens: np.ndarray  # uint32: every document's tokens followed by EOS
    lengths: np.ndarray  # int64: tokens per document, its EOS included
    loss_mask: np.ndarray | None  # uint8 per token, 0 for a fine-tuning example's prompt; None: all count
    examples: int  # fine-tuning examples among the documents


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every part is prepared with (plain values: Ray tasks receive it)."""

    tokenizer_json: str
    eos_id: int
    dtype: str  # of the token shards: uint16, or uint32 for vocabularies above 65,536
    seq: int  # the window a training run reads is seq + 1 tokens
    val_fraction: float
    seed: int
    strict: bool
    shard_tokens: int
    text_column: str


_worker_tokenizer: Any = None
_worker_eos = 0


def _init_worker(tokenizer_json: str, eos_id: int) -> None:
    from tokenizers import Tokenizer

    global _worker_tokenizer, _worker_eos
    _worker_tokenizer, _worker_eos = Tokenizer.from_str(tokenizer_json), eos_id


def _encode_chunk(documents: list[Document]) -> Encoded:
    """A fine-tuning example is its prompt's tokens then its completion's (each tokenized alone, so the mask
    falls exactly between them), then EOS; only the completion and EOS count in the loss."""
    texts = [t for d in documents for t in (d if isinstance(d, tuple) else (d,))]
    encodings = iter(_worker_tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    eos = (_worker_eos,)
    pieces: list[Any] = []
    lengths, prompt_lengths = [], []
    for document in documents:
        prompt = next(encodings).ids if isinstance(document, tuple) else []
        body = next(encodings).ids
        pieces += (prompt, body, eos)
        lengths.append(len(prompt) + len(body) + 1)
        prompt_lengths.append(len(prompt))
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.uint32)
    lengths_array = np.array(lengths, dtype=np.int64)
    examples = sum(isinstance(d, tuple) for d in documents)
    loss_mask = None
    if examples:
        loss_mask = np.ones(len(tokens), np.uint8)
        for start, n in zip((np.cumsum(lengths_array) - lengths_array).tolist(), prompt_lengths, strict=True):
            loss_mask[start : start + n] = 0
    return Encoded(tokens, lengths_array, loss_mask, examples)


class Encoder:
    """Encodes chunks in input order, with a few chunks in flight so reading overlaps tokenizing.

    One worker: threads of this process (the tokenizer releases the GIL and spreads each batch over every
    core; two batches in flight keep the cores busy while one batch's longest document finishes).
    Several: spawned processes, each with its own tokenizer, kept for every part.
    """

    def __init__(self, settings: Settings, workers: int):
        self.workers = workers
        if workers <= 1:
            _init_worker(settings.tokenizer_json, settings.eos_id)
            self.executor: Any = concurrent.futures.ThreadPoolExecutor(2)
        else:
            # spawn, not fork: the parent may hold JAX or tokenizer threads that a fork would copy mid-flight.
            context = multiprocessing.get_context("spawn")
            initargs = (settings.tokenizer_json, settings.eos_id)
            self.executor = context.Pool(workers, initializer=_init_worker, initargs=initargs)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.workers <= 1:
            self.executor.shutdown()
        else:
            self.executor.terminate()

    def encode(self, chunks: Iterator[list[Document]]) -> Iterator[Encoded]:
        if self.workers <= 1:
            submit, result = self.executor.submit, lambda r: r.result()
        else:
            submit, result = lambda f, chunk: self.executor.apply_async(f, (chunk,)), lambda r: r.get()
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(submit(_encode_chunk, chunk))
            if len(pending) > max(2, self.workers):
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())


class _Reading:
    """Reads a part's sources in order, in chunks of documents; `position` counts raw bytes read so far."""

    def __init__(self, files: tuple[tuple[str, int], ...], text_column: str):
        self.files, self.text_column = files, text_column
        self.finished_bytes = 0
        self.current: Source | None = None

    @property
    def position(self) -> int:
        return self.finished_bytes + (self.current.position if self.current else 0)

    def chunks(self, skips: SkipCounter) -> Iterator[list[Document]]:
        chunk: list[Document] = []
        chars = 0
        for path, size in self.files:
            source = self.current = Source(path, size, self.text_column)
            for document in source.documents(skips):
                chunk.append(document)
                chars += sum(map(len, document)) if isinstance(document, tuple) else len(document)
                if chars >= CHUNK_CHARS:
                    yield chunk
                    chunk, chars = [], 0
            self.finished_bytes += size
            self.current = None
        if chunk:
            yield chunk


# ----------------------------------------------------------------------------------------------------------
# Writing one part's splits.


class _SplitWriter:
    """Appends one part's tokens of one split to `<split>/shard_PPPPP_NNNNN.bin` files of at most
    `shard_tokens` tokens; once a fine-tuning example arrives, also its loss mask to `loss_mask_...` files
    beside them (the part's earlier shards need none: all their tokens count)."""

    def __init__(self, root: str, split: str, part: int, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.part, self.dtype, self.shard_tokens = (
            root,
            split,
            part,
            dtype,
            shard_tokens,
        )
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self.masked = False
        self._file: Any = None
        self._mask_file: Any = None

    def write(self, tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        if loss_mask is not None and not self.masked:
            self._start_masks()
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(piece.tobytes())
            if self.masked:
                mask = np.ones(len(piece), np.uint8) if loss_mask is None else loss_mask[:room]
                self._mask_file.write(mask.astype(np.uint8, copy=False).tobytes())
            loss_mask = None if loss_mask is None else loss_mask[room:]
            self.shards[-1]["tokens"] += len(piece)
            self.tokens += len(piece)

    def _name(self, kind: str, number: int) -> str:
        return f"{self.split}/{kind}_{self.part:05d}_{number:05d}.bin"

    def _open(self, name: str, mode: str) -> Any:
        os.makedirs(os.path.join(self.root, self.split), exist_ok=True)
        return open(os.path.join(self.root, *name.split("/")), mode)

    def _open_next(self) -> None:
        self._close_files()
        self.shards.append({"path": self._name("shard", len(self.shards)), "tokens": 0})
        self._file = self._open(self.shards[-1]["path"], "wb")
        if self.masked:
            self.shards[-1]["loss_mask"] = self._name("loss_mask", len(self.shards) - 1)
            self._mask_file = self._open(self.shards[-1]["loss_mask"], "wb")

    def _start_masks(self) -> None:
        self.masked = True
        if self._file is not None:  # the shard being written gets a mask from its first token
            shard = self.shards[-1]
            shard["loss_mask"] = self._name("loss_mask", len(self.shards) - 1)
            self._mask_file = self._open(shard["loss_mask"], "wb")
            self._mask_file.write(np.ones(shard["tokens"], np.uint8).tobytes())

    def _close_files(self) -> None:
        for f in (self._file, self._mask_file):
            if f is not None:
                f.close()
        self._file = self._mask_file = None

    def move_to(self, split: str) -> None:
        """Become the writer of another split (whose shards of this part must not exist yet)."""
        reopen = self._file is not None
        self._close_files()
        for shard in self.shards:
            for kind in ("path", "loss_mask"):
                if kind in shard:
                    new = split + shard[kind][len(self.split) :]
                    os.makedirs(os.path.join(self.root, split), exist_ok=True)
                    os.rename(
                        os.path.join(self.root, *shard[kind].split("/")),
                        os.path.join(self.root, *new.split("/")),
                    )
                    shard[kind] = new
        self.split = split
        if reopen:
            self._file = self._open(self.shards[-1]["path"], "ab")
            if self.masked:
                self._mask_file = self._open(self.shards[-1]["loss_mask"], "ab")

    def close(self) -> dict[str, Any]:
        self._close_files()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _in_validation(part: int, doc_numbers: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """A seeded hash of each document's (part, number) decides its split: the same wherever the part runs."""
    key = (np.uint64(part) << np.uint64(40)) | doc_numbers.astype(np.uint64)
    z = key * np.uint64(0x9E3779B97F4A7C15) + np.uint64((seed * 0xD1B54A32D192ED03) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class _Held(NamedTuple):
    """A split's latest document, written only once the next one arrives (or at the end of the part)."""

    tokens: np.ndarray
    loss_mask: np.ndarray | None


class _Packer:
    """Sends each document of a part to the train or validation split, in order, as the hash says.

    Each split's latest document is held back, so that at the end of the part neither split need be empty
    when the part can fill both with a window of seq + 1 tokens: a part whose documents all went to
    validation gives them to train instead; then, if validation is empty, it gets the last document, or
    (one document, e.g. a corpus that is one large text file) that document is cut in two and validation
    gets its end - val_fraction of the part's tokens, at least one window."""

    def __init__(self, root: str, part: int, settings: Settings):
        dtype = np.dtype(settings.dtype)
        self.writers = {s: _SplitWriter(root, s, part, dtype, settings.shard_tokens) for s in SPLITS}
        self.held: dict[str, _Held | None] = dict.fromkeys(SPLITS)
        self.part, self.settings = part, settings
        self.documents = 0
        self.examples = 0

    def add(self, encoded: Encoded) -> None:
        tokens, lengths, mask = encoded.tokens, encoded.lengths, encoded.loss_mask
        numbers = np.arange(self.documents, self.documents + len(lengths))
        to_val = _in_validation(self.part, numbers, self.settings.seed, self.settings.val_fraction)
        self.documents += len(lengths)
        self.examples += encoded.examples
        token_to_val = np.repeat(to_val, lengths)
        for split, chosen, token_chosen in (
            ("train", ~to_val, ~token_to_val),
            ("validation", to_val, token_to_val),
        ):
            if chosen.any():
                self._append(
                    split, tokens[token_chosen], None if mask is None else mask[token_chosen], lengths[chosen]
                )

    def _append(self, split: str, tokens: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray) -> None:
        writer, held = self.writers[split], self.held[split]
        if held is not None:
            writer.write(held.tokens, held.loss_mask)
        cut = len(tokens) - int(lengths[-1])
        writer.write(tokens[:cut], None if mask is None else mask[:cut])
        self.held[split] = _Held(tokens[cut:].copy(), None if mask is None else mask[cut:].copy())
        writer.documents += len(lengths)

    def close(self) -> dict[str, Any]:
        if self.settings.val_fraction > 0:
            self._fill_both_splits()
        for split in SPLITS:
            held = self.held[split]
            if held is not None:
                self.writers[split].write(held.tokens, held.loss_mask)
        return {split: self.writers[split].close() for split in SPLITS}

    def _fill_both_splits(self) -> None:
        train, validation = self.writers["train"], self.writers["validation"]
        if train.documents == 0 and validation.documents > 0:
            validation.move_to("train")
            self.writers = {"train": validation, "validation": train}
            train.move_to("validation")
            self.held = {"train": self.held["validation"], "validation": None}
            train, validation = self.writers["train"], self.writers["validation"]
        held = self.held["train"]
        if validation.documents > 0 or held is None:
            return
        window = self.settings.seq + 1
        total = train.tokens + len(held.tokens)
        if train.documents >= 2 and (total < 2 * window or total - len(held.tokens) >= window):
            self.held = {"train": None, "validation": held}  # today's rule: the last document whole
            train.documents -= 1
            validation.documents += 1
        elif total >= 2 * window:
            n = len(held.tokens)
            give = min(max(math.ceil(self.settings.val_fraction * total), window), n - 1, total - window)
            eos = np.array([self.settings.eos_id], held.tokens.dtype)
            head_mask = None if held.loss_mask is None else np.append(held.loss_mask[: n - give], 1)
            self.held = {
                "train": _Held(np.concatenate([held.tokens[: n - give], eos]), head_mask),
                "validation": _Held(
                    held.tokens[n - give :], None if held.loss_mask is None else held.loss_mask[n - give :]
                ),
            }
            validation.documents += 1  # the end of the cut document is one more document


# ----------------------------------------------------------------------------------------------------------
# Parts.


@dataclasses.dataclass(frozen=True)
class Part:
    number: int
    files: tuple[tuple[str, int], ...]  # (path, size), consecutive in the input order

    @property
    def input_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_parts(files: list[tuple[str, int]], part_bytes: int) -> list[Part]:
    """Consecutive files grouped into parts of at least `part_bytes` (the last may be smaller): from the file
    list alone, so the parts - and the dataset - do not depend on how many workers prepare them."""
    parts: list[Part] = []
    current: list[tuple[str, int]] = []
    for file in files:
        current.append(file)
        if sum(size for _, size in current) >= part_bytes:
            parts.append(Part(len(parts), tuple(current)))
            current = []
    if current:
        parts.append(Part(len(parts), tuple(current)))
    return parts


def prepare_part(
    part: Part, settings: Settings, root: str, encoder: Encoder, on_position: Any = None
) -> dict[str, Any]:
    """Write the part's shards under `root`; returns what the index needs of it. `on_position(bytes)` is
    told how far into the part's input bytes reading has come."""
    skips = SkipCounter(settings.strict)
    packer = _Packer(root, part.number, settings)
    reading = _Reading(part.files, settings.text_column)
    for encoded in encoder.encode(reading.chunks(skips)):
        packer.add(encoded)
        if on_position is not None:
            on_position(min(reading.position, part.input_bytes))
    return {
        "part": part.number,
        "splits": packer.close(),
        "examples": packer.examples,
        "skipped": skips.counts,
        "skipped_examples": skips.examples,
        "input_bytes": part.input_bytes,
    }


def part_files(result: dict[str, Any]) -> list[str]:
    """Paths (relative to the dataset) of the shards and loss masks a prepared part wrote."""
    return [
        shard[kind]
        for split in result["splits"].values()
        for shard in split["shards"]
        for kind in ("path", "loss_mask")
        if kind in shard
    ]


def upload_part(result: dict[str, Any], root: str, output_dir: str) -> None:
    """Copy a prepared part's files from `root` to a gs:// output, deleting each local copy once uploaded
    (so a node holds one part at a time)."""
    for name in part_files(result):
        local = os.path.join(root, *name.split("/"))
        upload_file(local, join(output_dir, *name.split("/")))
        os.remove(local)


def _prepare_here(
    parts: list[Part], settings: Settings, staging: Staging, workers: int, progress: bool
) -> list:
    """Every part in this process, one after another, with a progress bar over the input bytes."""
    from tqdm import tqdm

    total = sum(part.input_bytes for part in parts)
    results = []
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="preparing", disable=not progress) as bar,
        Encoder(settings, workers) as encoder,
    ):
        done = 0  # input bytes of the parts before this one
        for part in parts:

            def show(position: int, done: int = done) -> None:
                bar.update(done + position - bar.n)

            result = prepare_part(part, settings, staging.root, encoder, show)
            staging.finish_part(result)
            results.append(result)
            done += part.input_bytes
            bar.update(done - bar.n)
    return results


# ----------------------------------------------------------------------------------------------------------
# The output: staged, then published in one step.


class Staging:
    """Where the parts are written until the dataset is published: for a local output a hidden sibling
    directory, renamed into place at the end; for gs:// a local temporary directory from which each finished
    part is uploaded, the index last. If anything fails, what was staged or uploaded is removed."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.remote = is_gcs(output_dir)
        parent = None if self.remote else os.path.dirname(os.path.abspath(output_dir))
        if parent:
            os.makedirs(parent, exist_ok=True)
        prefix = f".{os.path.basename(output_dir.rstrip('/'))}.partial-"
        self.root = tempfile.mkdtemp(prefix=prefix, dir=parent)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        try:
            if kind is not None and self.remote:
                self._delete_uploaded_parts()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def finish_part(self, result: dict[str, Any]) -> None:
        if self.remote:
            upload_part(result, self.root, self.output_dir)

    def publish(self, index: dict, tokenizer_json: str) -> None:
        """Make the finished dataset visible in one step (local rename) or index-last (gs:// upload)."""
        with open(os.path.join(self.root, TOKENIZER_NAME), "w") as f:
            f.write(tokenizer_json)
        with open(os.path.join(self.root, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
        if not self.remote:
            if os.path.isdir(self.output_dir):
                os.rmdir(self.output_dir)  # empty, checked before preparing
            os.rename(self.root, self.output_dir)
            return
        for name in (TOKENIZER_NAME, INDEX_NAME):  # the index last: a dataset without it is not finished
            upload_file(os.path.join(self.root, name), join(self.output_dir, name))

    def _delete_uploaded_parts(self) -> None:
        prefix = join(self.output_dir, "")
        for url, _ in list_objects(prefix):
            if re.fullmatch(r"(train|validation)/(shard|loss_mask)_\d{5}_\d{5}\.bin", url[len(prefix) :]):
                delete(url)


def _check_output_free(output_dir: str) -> None:
    if is_gcs(output_dir):
        if path_exists(join(output_dir, INDEX_NAME)):
            raise DataError(f"output {output_dir} already holds a dataset; choose another path or delete it")
    elif os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise DataError(
            f"output {output_dir} already exists and is not empty; choose another path or delete it"
        )


def _index(results: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The parts' results joined, in part order, into the index's splits and counts."""
    results = sorted(results, key=lambda r: r["part"])
    splits = {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}
    skipped: dict[str, int] = collections.Counter()
    examples: dict[str, str] = {}
    for result in results:
        for name, split in result["splits"].items():
            for key in ("tokens", "documents"):
                splits[name][key] += split[key]
            splits[name]["shards"] += split["shards"]
        skipped.update(result["skipped"])
        for reason, where in result["skipped_examples"].items():
            examples.setdefault(reason, where)
    index: dict[str, Any] = {"format": FORMAT, "version": 1, "splits": splits}
    index["documents"] = sum(s["documents"] for s in splits.values())
    index["tokens"] = sum(s["tokens"] for s in splits.values())
    index["examples"] = sum(r["examples"] for r in results)
    index["skipped"] = {reason: skipped[reason] for reason in results[0]["skipped"]} if results else {}
    index["skipped_examples"] = examples
    index["input_bytes"] = sum(r["input_bytes"] for r in results)
    index["parts"] = len(results)
    index["warnings"] = _split_warnings(splits, settings)
    return index


def _split_warnings(splits: dict[str, Any], settings: Settings) -> list[str]:
    """What a user must hear about splits too small to give a training or validation window."""
    window, total = settings.seq + 1, sum(s["tokens"] for s in splits.values())
    warnings = []
    wanted = ("train", "validation") if settings.val_fraction > 0 else ("train",)
    for name in wanted:
        if splits[name]["tokens"] < window:
            warnings.append(
                f"the {name} split holds {splits[name]['tokens']} tokens, less than one window of seq + 1 = "
                f"{window} tokens (the inputs give {total} tokens in all); use more data or a smaller --seq"
                + (", or --val-fraction 0" if name == "validation" else "")
            )
    return warnings


# ----------------------------------------------------------------------------------------------------------
# The entry point.


def source_key(
    files: list[tuple[str, int]], tokenizer: str, val_fraction: float, seed: int, text_column: str = "text"
) -> str:
    """Identifies what a dataset was prepared from, so a cached preparation is reused only when it matches."""
    what: list[Any] = [files, tokenizer, val_fraction, seed]
    if text_column != "text":  # keys of datasets prepared before the option existed stay valid
        what.append(text_column)
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


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
    text_column: str = "text",
    ray_address: str | None = None,
    part_bytes: int = PART_BYTES,
) -> dict:
    """Tokenize + pack + shard; returns the index dict (also written as output_dir/index.json).

    Copies tokenizer.json into output_dir. max_vocab: raise DataError if the tokenizer is larger.
    ray_address: prepare the parts as tasks of that Ray cluster ("auto", HOST:PORT, or "local" for a private
    instance on this machine with `workers` CPUs) instead of in this process; the dataset is the same.
    """
    if (tokenizer_path is None) == (train_tokenizer_vocab is None):
        raise DataError(
            "pass exactly one of a tokenizer.json (--tokenizer) or a vocabulary size to train one"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction} is out of range; expected 0 <= fraction < 1")
    if seq < 1 or workers < 1 or shard_tokens < 1 or part_bytes < 1:
        raise DataError(
            f"seq {seq}, workers {workers}, shard tokens {shard_tokens}, part bytes {part_bytes}: "
            "expected positive integers"
        )
    if not text_column:
        raise DataError("the text column must be a non-empty name (--text-column)")
    _check_output_free(output_dir)
    files = expand_inputs(inputs)

    if tokenizer_path is not None:
        tokenizer, tokenizer_json = read_tokenizer_file(tokenizer_path)
        tokenizer_id = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    else:
        documents = (Source(p, s, text_column).documents(SkipCounter(False)) for p, s in files)
        tokenizer = train_tokenizer(itertools.chain.from_iterable(documents), train_tokenizer_vocab)
        tokenizer_json, tokenizer_id = tokenizer.to_str(), f"trained:{train_tokenizer_vocab}"
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if max_vocab is not None and vocab_size > max_vocab:
        raise DataError(
            f"tokenizer {tokenizer_path or '(trained)'} has {vocab_size} tokens but the model's n_vocab is "
            f"{max_vocab}; use a smaller tokenizer or a larger n_vocab"
        )
    settings = Settings(
        tokenizer_json=tokenizer_json,
        eos_id=eos_id_of(tokenizer, tokenizer_path or "trained tokenizer"),
        dtype="uint16" if vocab_size <= 1 << 16 else "uint32",
        seq=seq,
        val_fraction=val_fraction,
        seed=seed,
        strict=strict,
        shard_tokens=shard_tokens,
        text_column=text_column,
    )
    parts = plan_parts(files, part_bytes)
    with Staging(output_dir) as staging:
        if ray_address is None:
            results = _prepare_here(parts, settings, staging, workers, progress)
        else:
            from mesh_transformer import prepare_cluster

            results = prepare_cluster.prepare_parts(parts, settings, staging, ray_address, workers, progress)
        index = _index(results, settings)
        if index["documents"] == 0:
            skipped = ", ".join(f"{n} {r}" for r, n in index["skipped"].items() if n) or "none skipped"
            raise DataError(f"no usable documents in the inputs ({len(files)} files; {skipped})")
        index.update(
            tokenizer=TOKENIZER_NAME,
            tokenizer_sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            vocab_size=vocab_size,
            eos_id=settings.eos_id,
            dtype=settings.dtype,
            seq=seq,
            seed=seed,
            val_fraction=val_fraction,
            text_column=text_column,
            part_bytes=part_bytes,
            inputs=list(inputs),
            files=len(files),
            source_key=source_key(files, tokenizer_id, val_fraction, seed, text_column),
        )
        staging.publish(index, tokenizer_json)
    return index
