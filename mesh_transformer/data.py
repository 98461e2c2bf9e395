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
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from mesh_transformer.prepare import (
    FORMAT,
    INDEX_NAME,
    TOKENIZER_NAME,
    prepare_dataset,
    read_tokenizer_file,
    source_key,
)
from mesh_transformer.sources import DataError, default_corpus_files, expand_inputs
from mesh_transformer.storage import is_gcs, join, open_file, path_exists, read_range

__all__ = [
    "Batch",
    "DataError",
    "Loader",
    "MixtureLoader",
    "default_corpus_files",
    "find_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
    "read_index",
    "resolve_mixture",
    "resolve_training_data",
    "segment_ids",
    "validation_batches",
    "validation_examples",
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


class _ShardArray:
    """One kind of file of a split (its token shards, or their loss masks) seen as one array; windows may
    straddle shard boundaries. A shard without a file (no loss mask) reads as `fill`."""

    def __init__(
        self, dataset_dir: str, paths: list[str | None], sizes: list[int], dtype: np.dtype, fill: int
    ):
        self.dtype, self.fill = dtype, fill
        self.starts = np.cumsum([0] + sizes)
        self.remote = is_gcs(dataset_dir)
        full = [None if p is None else join(dataset_dir, *p.split("/")) for p in paths]
        if self.remote:
            self.shards: list[Any] = full
            self._pool = ThreadPoolExecutor(16)
        else:
            missing = [p for p in full if p is not None and not os.path.exists(p)]
            if missing:
                raise DataError(f"{dataset_dir} is incomplete: shard {missing[0]} is missing")
            self.shards = [
                np.memmap(p, self.dtype, "r").view(np.ndarray) if p is not None and n else None
                for p, n in zip(full, sizes, strict=True)
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
        if self.shards[shard] is None:
            return np.full(hi - lo, self.fill, self.dtype)
        if not self.remote:
            return self.shards[shard][lo:hi]
        size = self.dtype.itemsize
        return np.frombuffer(read_range(self.shards[shard], lo * size, hi * size), self.dtype)

    def windows(self, offsets: np.ndarray, length: int, out_dtype: Any) -> np.ndarray:
        """(len(offsets), length): elements [o, o + length) for each offset o."""
        out = np.empty((len(offsets), length), out_dtype)
        rows = np.arange(len(offsets))
        if not self.remote:
            # Fast path: windows inside one memory-mapped shard are gathered with one fancy index per shard.
            shard = np.searchsorted(self.starts, offsets, "right") - 1
            inside = offsets + length <= self.starts[shard + 1]
            for s in np.unique(shard[inside]):
                chosen = rows[inside & (shard == s)]
                if self.shards[s] is None:
                    out[chosen] = self.fill
                    continue
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


class _TokenStream:
    """One split's token shards (and loss masks, where it has fine-tuning examples) as one stream."""

    def __init__(self, dataset_dir: str, index: dict, split: str):
        if split not in index["splits"]:
            raise DataError(
                f"{dataset_dir} has no split {split!r}; expected one of {sorted(index['splits'])}"
            )
        shards = index["splits"][split]["shards"]
        sizes = [s["tokens"] for s in shards]
        self.tokens = int(index["splits"][split]["tokens"])
        self._tokens = _ShardArray(
            dataset_dir, [s["path"] for s in shards], sizes, np.dtype(index["dtype"]), 0
        )
        self._mask = None
        if any("loss_mask" in s for s in shards):
            masks = [s.get("loss_mask") for s in shards]
            self._mask = _ShardArray(dataset_dir, masks, sizes, np.dtype(np.uint8), 1)

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """int32 array (len(offsets), length): tokens [o, o + length) for each offset o."""
        return self._tokens.windows(offsets, length, np.int32)

    def loss_mask_windows(self, offsets: np.ndarray, length: int) -> np.ndarray | None:
        """uint8 (len(offsets), length), 1 where a token counts as a target; None when every token does."""
        return None if self._mask is None else self._mask.windows(offsets, length, np.uint8)


class Batch(NamedTuple):
    """Rows of training or validation windows (seq + 1 tokens each), with what the loss and attention need
    to know of them where the data has it. Arrays share one shape: (A, B, T + 1) from a loader, (B, T + 1)
    for validation."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray | None = None  # uint8: 1 where the token counts as a target; None: every token
    segment_ids: np.ndarray | None = None  # int32: the document of the row each token belongs to


def _batch(stream: _TokenStream, offsets: np.ndarray, length: int, eos_id: int, segments: bool) -> Batch:
    tokens = stream.windows(offsets, length)
    return Batch(
        tokens, stream.loss_mask_windows(offsets, length), segment_ids(tokens, eos_id) if segments else None
    )


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """int32, same shape: how many EOS tokens precede each token in its row (a document owns its EOS)."""
    eos = tokens == eos_id
    return (np.cumsum(eos, axis=-1) - eos).astype(np.int32)


def _stack(batches: list[Batch]) -> Batch:
    """One Batch of the micro-batches stacked along a new leading (accumulation) axis."""
    return Batch(*(None if parts[0] is None else np.stack(parts) for parts in zip(*batches, strict=True)))


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
    With `segments`, batches carry segment ids (documents split at EOS) for a document attention mask.
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
        segments: bool = False,
    ):
        index = read_index(dataset_dir)
        self.stream = _TokenStream(dataset_dir, index, split)
        self.process_index, self.local_batch = _process_slice(global_batch, process_index, process_count)
        _check_lengths(seq, gradient_accumulation_steps)
        self.seq, self.global_batch, self.accumulation = seq, global_batch, gradient_accumulation_steps
        self.segments = segments
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.tokens_per_epoch: int = self.stream.tokens
        self.rows = _windows_of(self.stream, seq, global_batch, dataset_dir, split, index)
        self.batches_per_epoch = self.rows // global_batch  # micro-batches
        self.seed, self.epoch, self.position = seed, 0, 0

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        """This process's rows of the next step: arrays (gradient_accumulation_steps, global_batch //
        process_count, seq + 1)."""
        micro = []
        for _ in range(self.accumulation):
            if self.position + self.global_batch > self.rows:
                self.epoch, self.position = self.epoch + 1, 0
            first = self.position + self.process_index * self.local_batch
            rows = _permute(np.arange(first, first + self.local_batch), self.rows, self.seed, self.epoch)
            micro.append(_batch(self.stream, rows * self.seq, self.seq + 1, self.eos_id, self.segments))
            self.position += self.global_batch
        return _stack(micro)

    def tokens_seen(self) -> dict[str, int]:
        """Tokens seen per dataset of a mixture; one dataset's are the run's own count."""
        return {}

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: seed, epoch, and windows of the epoch's order already consumed (global)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(state, dict) and "mixture" in state:
            raise DataError(
                "the checkpoint was trained on a mixture of datasets (train_set); resume it with the same "
                "train_set, not one dataset"
            )
        try:
            seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"loader state {state!r} is not valid; expected integers seed, epoch, position"
            ) from None
        if epoch < 0 or not 0 <= position <= self.rows:
            raise DataError(f"loader state {state!r} does not fit this dataset of {self.rows} windows")
        self.seed, self.epoch, self.position = seed, epoch, position


def _check_lengths(seq: int, gradient_accumulation_steps: int) -> None:
    if seq < 1 or gradient_accumulation_steps < 1:
        raise DataError(
            f"seq {seq} and gradient_accumulation_steps {gradient_accumulation_steps} must be >= 1"
        )


def _windows_of(
    stream: _TokenStream, seq: int, needed: int, dataset_dir: str, split: str, index: dict
) -> int:
    """Windows of seq + 1 tokens (strided by seq) the split holds, or DataError if fewer than `needed`."""
    rows = max(0, (stream.tokens - 1) // seq)
    if rows < needed:
        other = {"train": "validation", "validation": "train"}.get(split)
        elsewhere = index["splits"].get(other, {}).get("tokens", 0)
        note = f" (the {other} split holds {elsewhere} more tokens)" if elsewhere else ""
        raise DataError(
            f"{dataset_dir} {split} split is too small: {stream.tokens} tokens{note} make {rows} windows of "
            f"{seq + 1} tokens, but {'one global batch needs' if needed > 1 else 'training needs'} {needed}; "
            "use more data or a smaller batch"
        )
    return rows


def dataset_names(paths: list[str]) -> list[str]:
    """Short names of datasets for metrics: each path's last component, or the whole path if two share it."""
    last = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
    return [name if last.count(name) == 1 else path for name, path in zip(last, paths, strict=True)]


class MixtureLoader:
    """Training batches whose rows come from several prepared datasets in proportion to their weights.

    Rows are dealt by the Sainte-Lague divisor sequence: the k-th row of dataset c is due at (k + 1/2) / w_c
    and a batch takes the rows due first, so after any number of rows each dataset has had its share to
    within a row or so. Each dataset reads its rows in its own seeded order, epoch after epoch, as
    `Loader` does; this process reads only its contiguous share of each global micro-batch. The position is
    two integers per dataset: rows drawn from it in all (which fixes its epoch and place in it), and rows
    drawn since these weights began (which fixes the deal).
    """

    def __init__(
        self,
        datasets: dict[str, float],
        split: str = "train",
        *,
        seq: int,
        global_batch: int,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        segments: bool = False,
    ):
        if not datasets or any(not w > 0 for w in datasets.values()):
            raise DataError(f"a mixture needs datasets with positive weights, got {datasets!r}")
        self.paths = list(datasets)
        total = sum(datasets.values())
        self.weights = np.array([datasets[p] / total for p in self.paths])
        self.names = dataset_names(self.paths)
        self.process_index, self.local_batch = _process_slice(global_batch, process_index, process_count)
        _check_lengths(seq, gradient_accumulation_steps)
        self.seq, self.global_batch, self.accumulation = seq, global_batch, gradient_accumulation_steps
        self.segments, self.seed = segments, seed
        indexes = [read_index(p) for p in self.paths]
        self.streams = [_TokenStream(p, i, split) for p, i in zip(self.paths, indexes, strict=True)]
        self.rows = [
            _windows_of(st, seq, 1, p, split, i)
            for st, p, i in zip(self.streams, self.paths, indexes, strict=True)
        ]
        eos = {i["eos_id"] for i in indexes}
        if len(eos) > 1:
            raise DataError(
                f"the datasets of the mixture use different EOS ids {sorted(eos)}; prepare them alike"
            )
        self.eos_id: int = indexes[0]["eos_id"]
        self.vocab_size: int = max(i["vocab_size"] for i in indexes)
        self.masked = any(stream.has_loss_mask for stream in self.streams)
        self.drawn = np.zeros(len(self.paths), np.int64)  # rows drawn from each dataset in all
        self.since = np.zeros(len(self.paths), np.int64)  # ... since these weights began
        self.mixture_changed = False  # set by load_state_dict when the checkpoint's mixture differed

    def __iter__(self) -> MixtureLoader:
        return self

    def _deal(self, n: int) -> np.ndarray:
        """The dataset of each of the next n rows of the global order (and the deal's state advanced)."""
        k = self.since[:, None] + np.arange(n)[None, :]
        due = ((k + 0.5) / self.weights[:, None]).ravel()  # dataset-major, so ties go to the lower index
        first = np.argsort(due, kind="stable")[:n]
        chosen = first // n
        self.since += np.bincount(chosen, minlength=len(self.paths))
        return chosen

    def __next__(self) -> Batch:
        """This process's rows of the next step: arrays (gradient_accumulation_steps, global_batch //
        process_count, seq + 1)."""
        micro = []
        for _ in range(self.accumulation):
            chosen = self._deal(self.global_batch)
            mine = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
            micro.append(self._read(chosen, mine))
            self.drawn += np.bincount(chosen, minlength=len(self.paths))
        return _stack(micro)

    def _read(self, chosen: np.ndarray, mine: slice) -> Batch:
        """This process's rows of a micro-batch whose global rows come from datasets `chosen`."""
        length = self.seq + 1
        tokens = np.empty((self.local_batch, length), np.int32)
        # a loss mask in every batch if any dataset has one, so the step's inputs keep one structure
        mask = np.ones((self.local_batch, length), np.uint8) if self.masked else None
        for c in np.unique(chosen[mine]):
            # the j-th row of this micro-batch from dataset c is its (drawn + j)-th row in all
            drawn = (np.cumsum(chosen == c) - 1 + self.drawn[c])[mine]
            rows = np.flatnonzero(chosen[mine] == c)
            epoch, position = drawn[rows] // self.rows[c], drawn[rows] % self.rows[c]
            windows = np.empty(len(rows), np.int64)
            for e in np.unique(epoch):
                windows[epoch == e] = _permute(position[epoch == e], self.rows[c], self.seed, int(e))
            tokens[rows] = self.streams[c].windows(windows * self.seq, length)
            part_mask = self.streams[c].loss_mask_windows(windows * self.seq, length)
            if part_mask is not None:
                mask[rows] = part_mask
        return Batch(tokens, mask, segment_ids(tokens, self.eos_id) if self.segments else None)

    def tokens_seen(self) -> dict[str, int]:
        """Target tokens read from each dataset in all, by its name."""
        return {name: int(d) * self.seq for name, d in zip(self.names, self.drawn, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        mixture = [
            {"path": p, "weight": float(w), "drawn": int(d), "since": int(k)}
            for p, w, d, k in zip(self.paths, self.weights, self.drawn, self.since, strict=True)
        ]
        return {"seed": self.seed, "mixture": mixture}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. A checkpoint of another mixture (datasets or weights changed) keeps each
        dataset's place in its order and deals the new weights from here."""
        if isinstance(state, dict) and "mixture" not in state and "position" in state:
            raise DataError(
                "the checkpoint was trained on one dataset; its position cannot say where each dataset of "
                "the train_set mixture is (start the mixture in a new model_dir, or resume with that dataset)"
            )
        try:
            seed = int(state["seed"])
            saved = {
                e["path"]: (float(e["weight"]), int(e["drawn"]), int(e["since"])) for e in state["mixture"]
            }
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state {state!r} is not a mixture's position") from None
        if any(d < 0 or k < 0 for _, d, k in saved.values()):
            raise DataError(f"loader state {state!r} has negative row counts")
        same = list(saved) == self.paths and all(
            saved[p][0] == float(w) for p, w in zip(self.paths, self.weights, strict=True)
        )
        self.seed = seed
        self.drawn = np.array([saved.get(p, (0, 0, 0))[1] for p in self.paths], np.int64)
        self.since = np.array([saved[p][2] for p in self.paths] if same else [0] * len(self.paths), np.int64)
        self.mixture_changed = not same


def validation_examples(
    dataset_dir: str,
    *,
    seq: int,
    global_batch: int,
    n_batches: int,
    process_index: int | None = None,
    process_count: int | None = None,
    segments: bool = False,
) -> list[Batch]:
    """Fixed batches (same every call) from the validation split, each array (global_batch // P, seq + 1).

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
        offsets = (np.arange(first, first + local) % rows) * seq
        batches.append(_batch(stream, offsets, seq + 1, index["eos_id"], segments))
    return batches


def validation_batches(dataset_dir: str, **kwargs: Any) -> list[np.ndarray]:
    """The tokens of `validation_examples` (same arguments), for callers that need nothing else."""
    return [batch.tokens for batch in validation_examples(dataset_dir, **kwargs)]


def resolve_mixture(train_set: dict[str, float], *, n_vocab: int) -> dict[str, float]:
    """A config's train_set mixture checked: prepared datasets of one tokenizer that fits the model, with
    positive weights; returns them with the weights normalised to sum to 1."""
    if not train_set or not all(isinstance(w, (int, float)) and w > 0 for w in train_set.values()):
        raise DataError(f"train_set {train_set!r}: expected dataset paths with positive weights")
    reference = None
    for path in train_set:
        index = read_index(path)
        _check_vocab(index, path, n_vocab)
        if reference is None:
            reference = (path, index.get("tokenizer_sha256"))
        elif index.get("tokenizer_sha256") != reference[1]:
            raise DataError(
                f"train_set: {path} was tokenized with another tokenizer than {reference[0]}; "
                "prepare every dataset of a mixture with the same tokenizer.json"
            )
    total = float(sum(train_set.values()))
    return {path: weight / total for path, weight in train_set.items()}


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
    index = prepare_dataset(
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
    for warning in index["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
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
