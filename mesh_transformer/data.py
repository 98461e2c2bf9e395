"""Training data: prepared token shards to batches, and the choice of dataset a training run uses.

`Loader` yields this process's rows of each global batch in a seeded, shuffled order whose position is a
few integers (O(1) to restore); `validation_batches` gives fixed batches. Preparation lives in prepare.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mesh_transformer.prepare import (
    FORMAT,
    INDEX_NAME,
    TOKENIZER_NAME,
    DataError,
    default_corpus_files,
    expand_inputs,
    prepare_dataset,
    read_tokenizer_file,
    source_key,
)
from mesh_transformer.storage import is_gcs, join, open_file, path_exists, read_range

__all__ = [
    "DataError",
    "Loader",
    "default_corpus_files",
    "find_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
    "read_index",
    "resolve_training_data",
    "validation_batches",
]

DEMO_VAL_FRACTION = 0.02  # the demo corpus has a few hundred documents; 1% would leave validation tiny


def read_index(dataset_dir: str) -> dict:
    """The index.json of a prepared dataset, or DataError if `dataset_dir` is not one."""
    path = join(dataset_dir, INDEX_NAME)
    if not path_exists(path):
        raise DataError(
            f"{dataset_dir} is not a prepared dataset (no {INDEX_NAME}); run scripts/prepare_data.py"
        )
    try:
        with open_file(path) as f:
            index = json.loads(f.read())
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}")
        return index
    except ValueError as e:
        raise DataError(f"{path}: not a dataset index ({e})") from None


def load_tokenizer(dataset_dir: str) -> Any:
    """The dataset's tokenizer (a `tokenizers.Tokenizer`), e.g. to decode samples."""
    return read_tokenizer_file(join(dataset_dir, TOKENIZER_NAME))[0]


class _TokenStream:
    """One split's shards seen as a single token array; windows may straddle shard boundaries."""

    def __init__(self, dataset_dir: str, index: dict, split: str):
        if split not in index["splits"]:
            raise DataError(
                f"{dataset_dir} has no split {split!r}; expected one of {sorted(index['splits'])}"
            )
        shards = index["splits"][split]["shards"]
        self.dtype = np.dtype(index["dtype"])
        self.tokens = int(index["splits"][split]["tokens"])
        self.starts = np.cumsum([0] + [s["tokens"] for s in shards])
        paths = [join(dataset_dir, *s["path"].split("/")) for s in shards]
        self.remote = is_gcs(dataset_dir)
        if self.remote:
            self.shards: list[Any] = paths
            self._pool = ThreadPoolExecutor(16)
        else:
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise DataError(f"{dataset_dir} is incomplete: shard {missing[0]} is missing")
            self.shards = [
                np.memmap(p, self.dtype, "r").view(np.ndarray) if n else None
                for p, n in zip(paths, self.starts[1:], strict=False)
            ]

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, local start, local stop) covering global tokens [start, stop)."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, "right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[shard + 1]))
            pieces.append((shard, start - int(self.starts[shard]), end - int(self.starts[shard])))
            start, shard = end, shard + 1
        return pieces

    def _read_piece(self, shard: int, lo: int, hi: int) -> np.ndarray:
        if not self.remote:
            return self.shards[shard][lo:hi]
        size = self.dtype.itemsize
        return np.frombuffer(read_range(self.shards[shard], lo * size, hi * size), self.dtype)

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """int32 array (len(offsets), length): tokens [o, o + length) for each offset o."""
        out = np.empty((len(offsets), length), np.int32)
        rows = np.arange(len(offsets))
        if not self.remote:
            # Fast path: windows inside one memory-mapped shard are gathered with one fancy index per shard.
            shard = np.searchsorted(self.starts, offsets, "right") - 1
            inside = offsets + length <= self.starts[shard + 1]
            for s in np.unique(shard[inside]):
                chosen = rows[inside & (shard == s)]
                local = offsets[chosen] - self.starts[s]
                out[chosen] = self.shards[s][local[:, None] + np.arange(length)]
            rows = rows[~inside]
        jobs = [
            (row, p)
            for row in rows.tolist()
            for p in self._pieces(int(offsets[row]), int(offsets[row]) + length)
        ]
        if self.remote:
            pieces = list(self._pool.map(lambda job: self._read_piece(*job[1]), jobs))
        else:
            pieces = [self._read_piece(*p) for _, p in jobs]
        filled = np.zeros(len(offsets), np.int64)
        for (row, _), piece in zip(jobs, pieces, strict=True):
            out[row, filled[row] : filled[row] + len(piece)] = piece
            filled[row] += len(piece)
        return out


@functools.lru_cache(maxsize=8)
def _round_keys(seed: int, epoch: int) -> tuple[np.uint64, ...]:
    return tuple(np.random.SeedSequence([seed, epoch]).generate_state(4, np.uint64))


_GOLDEN, _MIX = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
_SHIFT_29, _SHIFT_32 = np.uint64(29), np.uint64(32)


def _permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at `positions`: a 4-round Feistel network with cycle-walking.

    Each index costs O(1), so any point of an epoch's order is reachable without generating the order.
    """
    half = np.uint64(max(1, (max(n - 1, 1).bit_length() + 1) // 2))
    mask = (np.uint64(1) << half) - np.uint64(1)
    x = positions.astype(np.uint64)
    todo = np.arange(len(x))
    while len(todo):
        left, right = x[todo] >> half, x[todo] & mask
        for key in _round_keys(seed, epoch):
            z = (right + key) * _GOLDEN
            z = (z ^ (z >> _SHIFT_29)) * _MIX
            left, right = right, left ^ ((z ^ (z >> _SHIFT_32)) & mask)
        x[todo] = (left << half) | right
        todo = todo[x[todo] >= n]  # outside [0, n): apply the permutation again until inside
    return x.astype(np.int64)


def _process_slice(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """(process index, rows this process reads per global micro-batch)."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch < 1 or global_batch % process_count:
        raise DataError(
            f"global batch {global_batch} must be a positive multiple of the {process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process index {process_index} is outside [0, {process_count})")
    return process_index, global_batch // process_count


class Loader:
    """Shuffled training batches of `seq + 1`-token windows, strided by `seq` so each token is a target once.

    The order of an epoch is a seeded permutation of all windows; micro-batch k of the epoch is windows
    [k * global_batch, (k + 1) * global_batch) of it, and this process reads only its contiguous share.
    A partial last micro-batch is dropped (the next epoch's order differs, so other windows are dropped).
    """

    def __init__(
        self,
        dataset_dir: str,
        split: str = "train",
        *,
        seq: int,
        global_batch: int,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        index = read_index(dataset_dir)
        self.stream = _TokenStream(dataset_dir, index, split)
        self.process_index, self.local_batch = _process_slice(global_batch, process_index, process_count)
        if seq < 1 or gradient_accumulation_steps < 1:
            raise DataError(
                f"seq {seq} and gradient_accumulation_steps {gradient_accumulation_steps} must be >= 1"
            )
        self.seq, self.global_batch, self.accumulation = seq, global_batch, gradient_accumulation_steps
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.tokens_per_epoch: int = self.stream.tokens
        self.rows = max(0, (self.stream.tokens - 1) // seq)
        if self.rows < global_batch:
            raise DataError(
                f"{dataset_dir} {split} split is too small: {self.stream.tokens} tokens make {self.rows} "
                f"windows of {seq + 1} tokens, but one global batch needs {global_batch}; "
                "use more data or a smaller batch"
            )
        self.batches_per_epoch = self.rows // global_batch  # micro-batches
        self.seed, self.epoch, self.position = seed, 0, 0

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> np.ndarray:
        """int32 (gradient_accumulation_steps, global_batch // process_count, seq + 1)."""
        micro = []
        for _ in range(self.accumulation):
            if self.position + self.global_batch > self.rows:
                self.epoch, self.position = self.epoch + 1, 0
            first = self.position + self.process_index * self.local_batch
            rows = _permute(np.arange(first, first + self.local_batch), self.rows, self.seed, self.epoch)
            micro.append(self.stream.windows(rows * self.seq, self.seq + 1))
            self.position += self.global_batch
        return np.stack(micro)

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: seed, epoch, and windows of the epoch's order already consumed (global)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"loader state {state!r} is not valid; expected integers seed, epoch, position"
            ) from None
        if epoch < 0 or not 0 <= position <= self.rows:
            raise DataError(f"loader state {state!r} does not fit this dataset of {self.rows} windows")
        self.seed, self.epoch, self.position = seed, epoch, position


def validation_batches(
    dataset_dir: str,
    *,
    seq: int,
    global_batch: int,
    n_batches: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[np.ndarray]:
    """Fixed batches (same every call) from the validation split, each (global_batch // P, seq + 1) int32.

    Windows are taken in order from the start of the split; a split smaller than n_batches global batches
    is reused from its start rather than refused, so tiny fine-tuning sets can still be evaluated.
    """
    index = read_index(dataset_dir)
    stream = _TokenStream(dataset_dir, index, "validation")
    process, local = _process_slice(global_batch, process_index, process_count)
    rows = max(0, (stream.tokens - 1) // seq)
    if rows == 0:
        raise DataError(
            f"{dataset_dir} has no validation data ({stream.tokens} tokens, fewer than one window of "
            f"{seq + 1}); prepare it with more documents or a larger validation fraction"
        )
    batches = []
    for b in range(n_batches):
        first = b * global_batch + process * local
        batches.append(stream.windows((np.arange(first, first + local) % rows) * seq, seq + 1))
    return batches


def resolve_training_data(
    data: list[str] | None, model_dir: str, *, n_vocab: int, seq: int, tokenizer: str | None, seed: int
) -> str:
    """Return the path of a prepared dataset directory to train on.

    - None: the demo corpus with a byte-level BPE of n_vocab trained on it, prepared once into
      {model_dir}/dataset and reused later.
    - [DIR] holding an index.json: that dataset (its vocabulary must fit n_vocab).
    - text/JSON-lines files, directories or globs: prepared into {model_dir}/dataset with `tokenizer`.
    """
    target = join(model_dir, "dataset")
    if data is not None and len(data) == 1 and path_exists(join(data[0], INDEX_NAME)):
        index = read_index(data[0])
        _check_vocab(index, data[0], n_vocab)
        return data[0]
    if data is None:
        files, val_fraction = default_corpus_files(), DEMO_VAL_FRACTION
        options: dict[str, Any] = {"train_tokenizer_vocab": n_vocab}
        tokenizer_id = f"trained:{n_vocab}"
    else:
        files, val_fraction = data, 0.01
        if not tokenizer:
            raise DataError("training on raw text needs a tokenizer: pass --tokenizer path/to/tokenizer.json")
        options = {"tokenizer_path": tokenizer}
        tokenizer_id = hashlib.sha256(read_tokenizer_file(tokenizer)[1].encode()).hexdigest()
    key = source_key(expand_inputs(files), tokenizer_id, val_fraction, seed)
    if path_exists(join(target, INDEX_NAME)):
        index = read_index(target)
        if index.get("source_key") != key:
            raise DataError(
                f"{target} was prepared from other inputs, tokenizer or seed; "
                "delete it or use another model_dir"
            )
        _check_vocab(index, target, n_vocab)
        return target
    prepare_dataset(
        files,
        target,
        seq=seq,
        val_fraction=val_fraction,
        workers=1,  # in-process: the tokenizer's own threads already use every core
        seed=seed,
        max_vocab=n_vocab,
        progress=True,
        **options,
    )
    return target


def _check_vocab(index: dict, where: str, n_vocab: int) -> None:
    if index["vocab_size"] > n_vocab:
        raise DataError(
            f"{where} was tokenized with {index['vocab_size']} tokens but the model's n_vocab is {n_vocab}"
        )


def find_tokenizer(model_path: str, config: Any, explicit: str | None = None) -> str | None:
    """A run's tokenizer.json: `explicit` (a file or a dataset dir), else the dataset under the model_dir that
    `model_path` (a model_dir or its step_N checkpoint) belongs to, else the config's `tokenizer` key."""
    if explicit:
        path = explicit if explicit.endswith(".json") else join(explicit, TOKENIZER_NAME)
        if not path_exists(path):
            raise DataError(f"tokenizer {explicit}: not found; expected a tokenizer.json or a dataset dir")
        return path
    model_path = model_path.rstrip("/")
    if re.search(r"(^|/)step_\d+$", model_path):
        model_path = model_path.rsplit("/", 1)[0]
    for candidate in (join(model_path, "dataset", TOKENIZER_NAME), config.tokenizer):
        if candidate and path_exists(candidate):
            return candidate
    return None
