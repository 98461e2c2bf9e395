"""Checkpoints: sharded, atomic, asynchronous saves of a state pytree on local disk or GCS; reshard on load.

Each process writes only the replica-0 shards it holds, one safetensors file per piece, next to JSON metadata;
a `COMMITTED` marker written last makes a checkpoint visible. Restores reshard onto any mesh piece by piece.

Layout of one checkpoint directory (`{model_dir}/step_{N}/`, or the path given to `save_params`):

    checkpoint.json            format, step, extra, and per leaf: tree path, shape, dtype, partition spec,
                               and the boxes ([start, stop) per dimension) of the pieces it was saved in
    {leaf:05d}.{piece:05d}.safetensors
                               one piece: a single tensor "data"; its metadata holds the leaf path, the box
                               and the CRC-32 of the data bytes
    COMMITTED                  written last, after every process finished; anything without it is ignored
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mesh_transformer.errors import InfrastructureError, UserError
from mesh_transformer.storage import StorageError, Store

FORMAT = "mesh_transformer.checkpoint/1"
METADATA_FILE = "checkpoint.json"
COMMIT_MARKER = "COMMITTED"
# Tree path prefix of the parameters inside a train state (`TrainState.params`); slim checkpoints keep it,
# so full and slim checkpoints name every parameter identically.
PARAMS_PREFIX = ".params"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Writer threads per process: enough to overlap checksums, local writes and GCS round trips.
_WRITE_THREADS = 4
# Slices of the blocking device-to-host copy handed to each copy thread.
_COPY_CHUNK = 16 * 1024 * 1024
# Pieces a restore reads ahead of the one it is placing (each on its own thread).
_READ_AHEAD = 2
# How long a process waits for its peers to finish writing; past it the save fails and stays uncommitted.
_BARRIER_TIMEOUT_MS = 30 * 60 * 1000

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_NUMPY_DTYPES = {code: name for name, code in _SAFETENSORS_DTYPES.items()}


class CheckpointError(UserError):
    """A checkpoint cannot be written or read as asked (a bad path, a damaged or mismatched checkpoint); the
    message names the file and the problem."""


class CheckpointSaveError(InfrastructureError):
    """A save failed because storage or a process failed; it stays uncommitted, and the last committed
    checkpoint is where a restarted run resumes."""


def _open_store(url: str) -> Store:
    """The directory of a checkpoint or model_dir, local or gs:// (see storage.Store)."""
    try:
        return Store.open(url)
    except StorageError as e:
        raise CheckpointError(f"checkpoint path {e}") from None


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# XLA's CPU client adopts host buffers aligned to this many bytes without copying them.
_ALIGN = 64


def _aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an `_ALIGN`-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# One piece = one safetensors file holding a single tensor named "data".
# --------------------------------------------------------------------------------------------------------

Box = tuple[tuple[int, int], ...]  # [start, stop) per dimension


def _piece_name(leaf_index: int, piece_index: int) -> str:
    return f"{leaf_index:05d}.{piece_index:05d}.safetensors"


def _join(directory: str, name: str) -> str:
    """`name` inside `directory`, where "" is the store's own root (a slim checkpoint's layout)."""
    return f"{directory}/{name}" if directory else name


def _encode_piece(array: np.ndarray, leaf_path: str, box: Box) -> list[bytes | memoryview]:
    """Safetensors bytes for one piece, as chunks that reference `array` instead of copying it."""
    # safetensors is little-endian, like every host JAX runs on; refuse silently wrong bytes elsewhere.
    assert sys.byteorder == "little"
    array = array if array.flags.c_contiguous else array.copy(order="C")  # ascontiguousarray makes 0-d 1-d
    data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    header = {
        "data": {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [0, data.nbytes],
        },
        "__metadata__": {
            "leaf": leaf_path,
            "box": json.dumps([list(b) for b in box]),
            "crc32": f"{zlib.crc32(data):08x}",
        },
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The format allows padding the header with spaces; starting the data on a 64-byte boundary lets a
    # restore hand the bytes it read straight to the CPU client without another copy.
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    return [struct.pack("<Q", len(encoded)), encoded, data]


def _decode_piece(raw: np.ndarray, where: str, leaf_path: str, box: Box, dtype: str) -> np.ndarray:
    """The piece's array after checking it is whole, is the expected piece and matches its checksum."""
    expected_shape = [stop - start for start, stop in box]
    if len(raw) < 8:
        raise CheckpointError(f"{where}: truncated ({len(raw)} bytes); the piece file is damaged")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if 8 + header_len > len(raw):
        raise CheckpointError(f"{where}: truncated header ({len(raw)} bytes); the piece file is damaged")
    try:
        header = json.loads(raw[8 : 8 + header_len].tobytes())
        info, meta = header["data"], header["__metadata__"]
        begin, end = info["data_offsets"]
        saved = (info["dtype"], info["shape"], meta["leaf"], json.loads(meta["box"]), meta["crc32"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{where}: unreadable safetensors header ({e}); the piece file is damaged"
        ) from None
    saved_dtype, saved_shape, saved_leaf, saved_box, crc = saved
    wanted = (_SAFETENSORS_DTYPES[dtype], expected_shape, leaf_path, [list(b) for b in box])
    if (saved_dtype, saved_shape, saved_leaf, saved_box) != wanted:
        raise CheckpointError(
            f"{where}: holds {saved_leaf} box {saved_box} {saved_dtype}{saved_shape}, but {METADATA_FILE} "
            f"expects {leaf_path} box {wanted[3]} {wanted[0]}{expected_shape}; the checkpoint is inconsistent"
        )
    data = raw[8 + header_len :]
    nbytes = int(np.prod(expected_shape, dtype=np.int64)) * _np_dtype(dtype).itemsize
    if (begin, end) != (0, nbytes) or len(data) != nbytes:
        raise CheckpointError(
            f"{where}: holds {len(data)} data bytes, expected {nbytes}; the piece file is truncated"
        )
    if f"{zlib.crc32(data):08x}" != crc:
        raise CheckpointError(
            f"{where}: checksum mismatch (CRC-32 {crc} recorded); the piece file is damaged"
        )
    return data.view(_np_dtype(dtype)).reshape(expected_shape)


# --------------------------------------------------------------------------------------------------------
# Tree metadata and host copies.
# --------------------------------------------------------------------------------------------------------


def _box(index: tuple[slice, ...], shape: Sequence[int]) -> Box:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True))


def _spec_json(sharding: Any) -> list | None:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    return [list(p) if isinstance(p, tuple) else p for p in spec]


def _describe_leaves(leaves_with_paths: list[tuple[Any, Any]]) -> list[dict]:
    """Per leaf: path, shape, dtype, partition spec and the sorted unique boxes it is split into."""
    records = []
    for path, leaf in leaves_with_paths:
        if isinstance(leaf, jax.Array):
            shape, dtype = tuple(leaf.shape), leaf.dtype
            boxes = sorted({_box(i, shape) for i in leaf.sharding.devices_indices_map(shape).values()})
            spec = _spec_json(leaf.sharding)
        else:  # numpy scalars and arrays: one replicated piece
            value = np.asarray(leaf)
            shape, dtype = value.shape, value.dtype
            boxes, spec = [tuple((0, n) for n in shape)], None
        if dtype.name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"leaf {jax.tree_util.keystr(path)} has dtype {dtype}, which cannot be saved"
            )
        records.append(
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(shape),
                "dtype": dtype.name,
                "spec": spec,
                "boxes": [[list(b) for b in box] for box in boxes],
            }
        )
    return records


@dataclass
class _Piece:
    leaf: int
    piece: int
    array: np.ndarray


def _replica0_shards(leaves: list[Any], records: list[dict]) -> list[tuple[int, int, Any]]:
    """(leaf index, piece index, data) of every replica-0 shard this process holds."""
    found: list[tuple[int, int, Any]] = []
    for i, (leaf, record) in enumerate(zip(leaves, records, strict=True)):
        box_index = {tuple(tuple(b) for b in box): j for j, box in enumerate(record["boxes"])}
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    found.append((i, box_index[_box(shard.index, leaf.shape)], shard.data))
        elif jax.process_index() == 0:
            found.append((i, 0, np.asarray(leaf)))
    return found


def _host_pieces(
    leaves: list[Any], records: list[dict], buffers: dict[tuple[int, int], np.ndarray] | None = None
) -> list[_Piece]:
    """Host copies of the replica-0 shards this process holds: one copy of each piece in the whole job.

    `buffers` (leaf, piece) -> array is reused when shape and dtype still match and refilled otherwise:
    copying into memory that is already mapped is several times faster than into fresh pages.
    """
    buffers = {} if buffers is None else buffers
    found = _replica0_shards(leaves, records)
    for _, _, data in found:  # start every device-to-host transfer before waiting on any
        if isinstance(data, jax.Array):
            data.copy_to_host_async()
    pieces, copies = [], []
    for i, j, data in found:
        source = np.asarray(data)
        buffer = buffers.get((i, j))
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = buffers[(i, j)] = _aligned_empty(source.shape, source.dtype)
        # A real copy, never a view: the training loop may donate or overwrite the device buffers next step.
        copies.append((buffer, source))
        pieces.append(_Piece(i, j, buffer))
    _parallel_copy(copies)
    return pieces


def _parallel_copy(copies: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """np.copyto for every (destination, source), in `_COPY_CHUNK`-byte slices spread over the host's cores:
    this copy is the only part of an asynchronous save that the training loop waits for."""
    jobs = []
    for buffer, source in copies:
        if not (buffer.flags.c_contiguous and source.flags.c_contiguous) or buffer.nbytes <= _COPY_CHUNK:
            jobs.append((buffer, source))
            continue
        flat_buffer, flat_source = buffer.reshape(-1), source.reshape(-1)
        step = max(1, _COPY_CHUNK // buffer.itemsize)
        jobs += [(flat_buffer[k : k + step], flat_source[k : k + step]) for k in range(0, buffer.size, step)]
    list(_copy_pool().map(lambda job: np.copyto(*job), jobs))  # numpy releases the GIL while copying


@functools.cache
def _copy_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="checkpoint-copy")


def _coordination_client() -> Any:
    # The coordination service (barriers, a key-value store) is what jax's own array serialization uses from
    # its writer threads; sync_global_devices would launch a collective that could interleave with the
    # training step's.
    from jax._src import distributed

    return distributed.global_state.client


def _barrier(name: str) -> None:
    """Wait until every process reaches `name`; safe from a background thread (no device computation)."""
    if jax.process_count() == 1:
        return
    try:
        _coordination_client().wait_at_barrier(name, timeout_in_ms=_BARRIER_TIMEOUT_MS)
    except Exception as e:  # DEADLINE_EXCEEDED, or the coordination service is gone with a peer
        raise CheckpointSaveError(
            f"not every process reached checkpoint barrier {name} within {_BARRIER_TIMEOUT_MS // 60000} "
            f"minutes ({str(e).strip().splitlines()[0][:200]})"
        ) from e


def _gather_failures(name: str, failure: BaseException | None) -> list[tuple[int, str]]:
    """Post this process's outcome under `name`, wait for every process, and return (process, message) of
    each that failed. A process whose write failed still arrives, so that nobody waits for it in vain."""
    mine = "" if failure is None else f"{type(failure).__name__}: {str(failure).strip()[:500]}"
    if jax.process_count() == 1:
        return [(0, mine)] if failure is not None else []
    client = _coordination_client()
    prefix = f"mesh_transformer/checkpoint/{zlib.crc32(name.encode()):08x}/"
    client.key_value_set(prefix + str(jax.process_index()), "failed: " + mine if failure else "ok")
    _barrier(name)
    statuses = {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(prefix)}
    return sorted((p, v.removeprefix("failed: ")) for p, v in statuses.items() if v != "ok")


def _write_pieces(store: Store, directory: str, pieces: Iterable[_Piece], records: list[dict]) -> None:
    def write_piece(p: _Piece) -> None:
        chunks = _encode_piece(
            p.array, records[p.leaf]["path"], tuple(map(tuple, records[p.leaf]["boxes"][p.piece]))
        )
        store.write(_join(directory, _piece_name(p.leaf, p.piece)), chunks)

    with concurrent.futures.ThreadPoolExecutor(_WRITE_THREADS) as pool:
        # At most a few pieces in flight: `pieces` may be a generator reading from another checkpoint.
        pending: set[concurrent.futures.Future] = set()
        for piece in pieces:
            if len(pending) >= _WRITE_THREADS:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for f in done:
                    f.result()
            pending.add(pool.submit(write_piece, piece))
        for f in concurrent.futures.as_completed(pending):
            f.result()


def _write_checkpoint(
    store: Store,
    directory: str,
    pieces: Iterable[_Piece],
    records: list[dict],
    metadata: dict,
    barrier_name: str,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Write this process's pieces; then every process posts whether that worked, and process 0 writes the
    metadata and the marker only if every process did (after `before_commit`, e.g. flushing the log)."""
    failure: BaseException | None = None
    try:
        _write_pieces(store, directory, pieces, records)
    except Exception as e:  # reported to the peers below, then raised
        failure = e
    failed = _gather_failures(barrier_name + ":written", failure)
    try:
        if jax.process_index() == 0 and not failed:
            store.remove_partial(directory)  # every process has finished writing: leftovers are stale
            body = dict(metadata, format=FORMAT, leaves=records)
            store.write(_join(directory, METADATA_FILE), [json.dumps(body, indent=1).encode()])
            store.sync_dir(directory)
            if before_commit is not None:
                before_commit()
            store.write(_join(directory, COMMIT_MARKER), [b""])
            store.sync_dir(directory)
    finally:
        # Every process returns only once the marker is down (or its write failed): `wait` means committed.
        _barrier(barrier_name + ":committed")
    if failure is not None:
        raise failure
    if failed:
        process, message = failed[0]
        raise CheckpointSaveError(
            f"{store.describe(directory)}: process {process} failed to write its pieces ({message}); "
            "the checkpoint was not committed"
        )
    if jax.process_index() != 0 and not store.exists(_join(directory, COMMIT_MARKER)):
        raise CheckpointSaveError(f"{store.describe(directory)}: process 0 failed to commit the checkpoint")


# --------------------------------------------------------------------------------------------------------
# Reading and resharding.
# --------------------------------------------------------------------------------------------------------


def _read_metadata(store: Store, directory: str) -> dict:
    where = store.describe(_join(directory, METADATA_FILE))
    if not store.exists(_join(directory, COMMIT_MARKER)):
        raise CheckpointError(f"{store.describe(directory)}: not a committed checkpoint (no {COMMIT_MARKER})")
    try:
        meta = json.loads(store.read(_join(directory, METADATA_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing; the checkpoint is damaged") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("leaves"), list):
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{where}: format {fmt!r}, expected {FORMAT!r}")
    return meta


def _overlap(a: Box, b: Box) -> Box | None:
    box = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def _covering(boxes: list[Box], box: Box) -> list[int]:
    return [j for j, b in enumerate(boxes) if _overlap(b, box) is not None]


def _saved_boxes(record: dict) -> list[Box]:
    return [tuple(tuple(b) for b in box) for box in record["boxes"]]


def _read_piece(store: Store, directory: str, i: int, record: dict, j: int) -> np.ndarray:
    """Piece `j` of leaf `i` (described by `record`), read whole and verified."""
    box = _saved_boxes(record)[j]
    name = _join(directory, _piece_name(i, j))
    where = store.describe(name)
    try:
        raw = store.read_into(name, lambda size: _aligned_empty((size,), np.uint8))
    except FileNotFoundError:
        raise CheckpointError(
            f"{where}: missing (piece {box} of {record['path']}); checkpoint damaged"
        ) from None
    return _decode_piece(raw, where, record["path"], box, record["dtype"])


class _PieceLoader:
    """Reads and verifies saved pieces on worker threads, a couple ahead of their use, in a planned order.

    Reading and checksumming both release the GIL, so the next piece loads while this one is placed.
    """

    def __init__(
        self, store: Store, directory: str, records: list[dict], plan: list[tuple[int, int]]
    ) -> None:
        self.store, self.directory, self.records = store, directory, records
        self._plan = iter(plan)
        self._pool = concurrent.futures.ThreadPoolExecutor(_READ_AHEAD)
        self._pending: collections.deque = collections.deque()
        for _ in range(_READ_AHEAD):
            self._submit_next()

    def _submit_next(self) -> None:
        key = next(self._plan, None)
        if key is not None:
            self._pending.append((key, self._pool.submit(self._load, *key)))

    def _load(self, i: int, j: int) -> np.ndarray:
        return _read_piece(self.store, self.directory, i, self.records[i], j)

    def next(self, i: int, j: int) -> np.ndarray:
        key, future = self._pending.popleft()
        assert key == (i, j), (key, (i, j))  # assembly must follow the plan it was read ahead for
        self._submit_next()
        return future.result()

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


class _LeafAssembler:
    """Builds slices of one leaf from its saved pieces, holding only the most recent piece."""

    def __init__(self, leaf_index: int, record: dict) -> None:
        self.leaf_index = leaf_index
        self.boxes = _saved_boxes(record)

    def read_order(self, boxes: list[Box]) -> list[int]:
        """The pieces `read_box` will ask the loader for when called on `boxes` in this order."""
        order: list[int] = []
        for box in boxes:
            for j in _covering(self.boxes, box):
                if not order or order[-1] != j:
                    order.append(j)
        return order

    def read_box(self, loader: _PieceLoader, box: Box, dtype: np.dtype, cached: list) -> np.ndarray:
        """The values inside `box`, from the saved pieces that overlap it, cast to `dtype`.

        `cached` ([index, array] or []) carries the last piece between calls, as `read_order` assumes.
        """

        def piece(j: int) -> np.ndarray:
            if not cached or cached[0] != j:
                cached[:] = []  # drop the previous piece before taking the next
                cached[:] = [j, loader.next(self.leaf_index, j)]
            return cached[1]

        covering = _covering(self.boxes, box)
        if len(covering) == 1 and self.boxes[covering[0]] == box:
            return piece(covering[0]).astype(dtype, copy=False)
        out = _aligned_empty([hi - lo for lo, hi in box], dtype)
        for j in covering:
            inter = _overlap(self.boxes[j], box)
            src = tuple(
                slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, self.boxes[j], strict=True)
            )
            dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box, strict=True))
            out[dst] = piece(j)[src]
        return out


def _target_sharding(target: Any) -> Any:
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return sharding


def _placements(record: dict, target: Any) -> list[tuple[Box, list]]:
    """The distinct slices of a leaf this process must hold, each with the local devices that hold it;
    a host-value target (numpy scalar) is one whole slice held by no device."""
    shape = tuple(record["shape"])
    if not isinstance(target, jax.Array | jax.ShapeDtypeStruct):
        return [(tuple((0, n) for n in shape), [])]
    try:
        index_map = _target_sharding(target).addressable_devices_indices_map(shape)
    except ValueError as e:
        raise CheckpointError(
            f"leaf {record['path']} of shape {shape} cannot be placed on the target mesh: {e}"
        ) from None
    by_box: dict[Box, list] = {}
    for device, index in index_map.items():
        by_box.setdefault(_box(index, shape), []).append(device)
    return sorted(by_box.items())


def _assemble_leaf(
    loader: _PieceLoader, i: int, record: dict, target: Any, dtype: np.dtype, placements: list
) -> Any:
    """One leaf placed with the target's sharding; each distinct slice is built on the host once."""
    assembler, cached = _LeafAssembler(i, record), []
    if not isinstance(target, jax.Array | jax.ShapeDtypeStruct):  # a host value (numpy scalar) stays on host
        return assembler.read_box(loader, placements[0][0], dtype, cached)
    sharding, shape = _target_sharding(target), tuple(record["shape"])
    by_device = {}
    for box, devices in placements:
        host = assembler.read_box(loader, box, dtype, cached)
        # On CPU an aligned host array becomes the first device's buffer without a copy; replicas get their
        # own copies, so no two devices ever share (and a donating step never races on) one buffer.
        by_device.update((d, jax.device_put(host, d, may_alias=k == 0)) for k, d in enumerate(devices))
        del host
    arrays = [by_device[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _restore_tree(
    store: Store,
    directory: str,
    meta: dict,
    target: Any,
    *,
    prefix: str = "",
    cast: bool,
) -> Any:
    """Leaves of `meta` under `prefix`, matched to `target` by tree path, placed with the target shardings."""
    where = store.describe(directory)
    saved = {
        r["path"][len(prefix) :]: (i, r) for i, r in enumerate(meta["leaves"]) if r["path"].startswith(prefix)
    }
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    wanted = {jax.tree_util.keystr(p) for p, _ in flat}
    missing = [jax.tree_util.keystr(p) for p, _ in flat if jax.tree_util.keystr(p) not in saved]
    if missing:
        slim = all(r["path"].startswith(PARAMS_PREFIX) for r in meta["leaves"]) and not prefix
        hint = (
            " (a params-only slim checkpoint: load it with load_params / --tune-model-path)" if slim else ""
        )
        raise CheckpointError(
            f"{where}: has no {prefix}{missing[0]} ({len(missing)} leaves of the target missing){hint}"
        )
    unexpected = sorted(set(saved) - wanted)
    if unexpected:
        raise CheckpointError(
            f"{where}: holds {prefix}{unexpected[0]}, which the target lacks ({len(unexpected)} extra); "
            "it was saved from a different model or state structure"
        )
    jobs = []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        i, record = saved[name]
        shape = tuple(np.shape(leaf))
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if tuple(record["shape"]) != shape:
            raise CheckpointError(
                f"{where}: {record['path']} has shape {tuple(record['shape'])}, the target expects {shape} "
                "(a checkpoint of another model shape?)"
            )
        if not cast and record["dtype"] != dtype.name:
            raise CheckpointError(
                f"{where}: {record['path']} is {record['dtype']}, the target expects {dtype.name}"
            )
        placements = _placements(record, leaf)
        order = _LeafAssembler(i, record).read_order([box for box, _ in placements])
        jobs.append((i, record, leaf, dtype, placements, order))
    plan = [(i, j) for i, *_, order in jobs for j in order]
    loader = _PieceLoader(store, directory, meta["leaves"], plan)
    try:
        leaves = [_assemble_leaf(loader, *job[:5]) for job in jobs]
    finally:
        loader.close()
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves train states under `model_dir/step_{N}` in the background and restores the newest one.

    At most one save is in flight: `save` first waits for the previous one, so the extra host memory is
    bounded by one copy of the replica-0 shards this process holds (kept between saves, so later saves
    copy into memory that is already mapped). Retention keeps the newest `keep_n` committed steps plus
    every step divisible by `keep_every`.
    """

    def __init__(self, model_dir: str, *, keep_n: int = 3, keep_every: int | None = None) -> None:
        if keep_n < 1:
            raise CheckpointError(f"keep_n={keep_n}: expected at least 1 checkpoint to keep")
        if keep_every is not None and keep_every < 1:
            raise CheckpointError(f"keep_every={keep_every}: expected a positive step interval or None")
        self.model_dir = model_dir
        self.keep_n, self.keep_every = keep_n, keep_every
        self._store = _open_store(model_dir)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._saves = 0  # makes every barrier name unique within this process's lifetime
        self._host_buffers: dict[tuple[int, int], np.ndarray] = {}  # reused by every save; see _host_pieces
        self._preparing: threading.Thread | None = None
        self.last_blocked_s = 0.0  # how long the last `save` held up its caller

    def save(
        self,
        step: int,
        state: Any,
        extra: dict,
        *,
        before_commit: Callable[[], None] | None = None,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        """Start saving `state` as step `step`; returns once host copies are taken. `extra` must be JSON.

        In process 0, `before_commit()` runs once every process has written its pieces and just before the
        marker (an error there leaves the checkpoint uncommitted), and `on_commit(step, seconds)` runs in
        the writer thread once the checkpoint is committed (`seconds` since this call)."""
        started = time.perf_counter()
        self.wait()
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        try:
            extra_json = json.loads(json.dumps(extra))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint extra for step {step} is not JSON-serialisable: {e}") from None
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        records = _describe_leaves(flat)
        pieces = _host_pieces([leaf for _, leaf in flat], records, self._host_buffers)
        self._saves += 1
        barrier = f"checkpoint:{self.model_dir}:{step}:{self._saves}"
        metadata = {"step": int(step), "extra": extra_json, "process_count": jax.process_count()}

        def write() -> None:
            try:
                if self._store.exists(f"step_{step}/{COMMIT_MARKER}"):
                    return  # already durable; rewriting a committed checkpoint could only risk damaging it
                _write_checkpoint(
                    self._store, f"step_{step}", pieces, records, metadata, barrier, before_commit
                )
                if jax.process_index() == 0:
                    if on_commit is not None:
                        on_commit(step, time.perf_counter() - started)
                    self._apply_retention()
            except BaseException as e:  # re-raised in the caller's thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}")
        self._thread.start()
        self.last_blocked_s = time.perf_counter() - started

    def prepare(self, state: Any) -> None:
        """Map the host buffers that saves of `state`'s structure will copy into, in a background thread, so
        that the first save does not stall the training loop on fresh memory (shapes only; no data moves)."""
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        shards = _replica0_shards([leaf for _, leaf in flat], _describe_leaves(flat))
        shapes = {(i, j): (data.shape, data.dtype) for i, j, data in shards}

        def allocate() -> None:
            for key, (shape, dtype) in shapes.items():
                buffer = _aligned_empty(shape, dtype)
                buffer.reshape(-1).view(np.uint8).fill(0)  # touch every page now
                self._host_buffers[key] = buffer

        self._preparing = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self._preparing.start()

    def wait(self) -> None:
        """Block until the pending save is committed. A failed save raises CheckpointError when the path
        cannot be used (the user's to fix), CheckpointSaveError when storage or a process failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            message = f"saving a checkpoint to {self.model_dir} failed: {error}"
            if isinstance(error, UserError):
                raise CheckpointError(message) from error
            if isinstance(error, InfrastructureError):
                raise CheckpointSaveError(message) from error
            raise error

    def _step_dirs(self) -> dict[int, str]:
        return {int(m.group(1)): d for d in self._store.subdirs() if (m := _STEP_DIR.match(d))}

    def committed_steps(self) -> list[int]:
        """Every committed step in model_dir, oldest first."""
        dirs = self._step_dirs()
        return sorted(s for s, d in dirs.items() if self._store.exists(f"{d}/{COMMIT_MARKER}"))

    def latest_step(self) -> int | None:
        """The newest committed step, or None when model_dir holds none."""
        for step, d in sorted(self._step_dirs().items(), reverse=True):
            if self._store.exists(f"{d}/{COMMIT_MARKER}"):
                return step
        return None

    def _apply_retention(self) -> None:
        dirs = self._step_dirs()
        committed = [s for s in sorted(dirs) if self._store.exists(f"{dirs[s]}/{COMMIT_MARKER}")]
        keep = set(committed[-self.keep_n :])
        if self.keep_every:
            keep |= {s for s in committed if s % self.keep_every == 0}
        newest = committed[-1] if committed else -1
        for step, d in dirs.items():
            # Older uncommitted directories are leftovers of interrupted saves; newer ones may be in flight.
            if step not in keep and step < newest:
                self._store.delete(f"{d}/{COMMIT_MARKER}")  # uncommit first: never a half-deleted checkpoint
                self._store.delete_dir(d)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state saved at `step` (default: newest committed) placed like `target`, and its `extra`.

        `target` is the state's structure: a pytree of jax.ShapeDtypeStruct with NamedShardings (or arrays).
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.model_dir}: holds no committed checkpoint to restore")
        directory = f"step_{step}"
        meta = _read_metadata(self._store, directory)
        return _restore_tree(self._store, directory, meta, target, cast=False), meta["extra"]


def _resolve(path: str) -> tuple[Store, str]:
    """A checkpoint directory, or the newest committed step of a model_dir, as (store, subdirectory)."""
    store = _open_store(path)
    if store.exists(METADATA_FILE) or store.exists(COMMIT_MARKER):
        return store, ""
    step = CheckpointManager(path).latest_step()
    if step is None:
        raise CheckpointError(
            f"{path}: no checkpoint found; expected a checkpoint directory holding {METADATA_FILE} "
            "or a model_dir holding committed step_N/ checkpoints"
        )
    return store, f"step_{step}"


def save_params(path: str, params: Any, dtype: Any = None) -> None:
    """Write `params` alone (cast to `dtype` if given) as a committed checkpoint directory at `path`."""
    store = _open_store(path)
    if store.exists(COMMIT_MARKER):
        raise CheckpointError(
            f"{path}: already holds a checkpoint; choose a new path rather than overwrite it"
        )
    target_dtype = None if dtype is None else _np_dtype(np.dtype(dtype).name)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    records = _describe_leaves(flat)
    for r in records:
        r["path"] = PARAMS_PREFIX + r["path"]
        if target_dtype is not None:
            r["dtype"] = target_dtype.name
    pieces = _host_pieces([leaf for _, leaf in flat], records)
    if target_dtype is not None:
        pieces = [_Piece(p.leaf, p.piece, p.array.astype(target_dtype)) for p in pieces]
    meta = {"step": None, "extra": {}, "process_count": jax.process_count()}
    _write_checkpoint(store, "", pieces, records, meta, f"save_params:{path}")


def load_params(path: str, target: Any) -> Any:
    """Params out of a full or slim checkpoint (or a model_dir's newest), cast and placed like `target`."""
    store, directory = _resolve(path)
    meta = _read_metadata(store, directory)
    return _restore_tree(store, directory, meta, target, prefix=PARAMS_PREFIX, cast=True)


def read_extra(path: str) -> dict:
    """The `extra` a checkpoint (full or slim, or a model_dir's newest) was saved with."""
    store, directory = _resolve(path)
    return _read_metadata(store, directory).get("extra") or {}


class ParamPieces:
    """The params of a full or slim checkpoint (or a model_dir's newest) streamed piece by piece on the host.

    For converters that must not hold the model in memory (the Hugging Face export): `shapes` gives each
    param's tree path (as `load_params` targets name it, e.g. "['gptj/ln_f']['scale']") with its shape and
    saved dtype, and `pieces(path)` yields the saved pieces that cover it once, one in memory at a time.
    """

    def __init__(self, path: str) -> None:
        self._store, self._directory = _resolve(path)
        meta = _read_metadata(self._store, self._directory)
        self.where = self._store.describe(self._directory)
        self.step: int | None = meta.get("step")
        self._records = {
            r["path"][len(PARAMS_PREFIX) :]: (i, r)
            for i, r in enumerate(meta["leaves"])
            if r["path"].startswith(PARAMS_PREFIX)
        }
        if not self._records:
            raise CheckpointError(f"{self.where}: holds no {PARAMS_PREFIX} leaves")
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {
            p: (tuple(r["shape"]), r["dtype"]) for p, (_, r) in self._records.items()
        }

    def pieces(self, path: str) -> Iterable[tuple[Box, np.ndarray]]:
        """(box, values) of each saved piece of param `path`; a box is [start, stop) per dimension."""
        i, record = self._records[path]
        for j, box in enumerate(_saved_boxes(record)):
            yield box, _read_piece(self._store, self._directory, i, record, j)


def slim_checkpoint(src: str, dst: str, dtype: str = "bfloat16") -> int:
    """Copy the params of checkpoint `src` to `dst` cast to `dtype`, piece by piece; returns bytes written."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise CheckpointError(f"slim dtype {dtype!r}: expected bfloat16, float16 or float32")
    store, directory = _resolve(src)
    meta = _read_metadata(store, directory)
    out = _open_store(dst)
    if out.exists(COMMIT_MARKER):
        raise CheckpointError(
            f"{dst}: already holds a checkpoint; choose a new path rather than overwrite it"
        )
    params = [(i, r) for i, r in enumerate(meta["leaves"]) if r["path"].startswith(PARAMS_PREFIX)]
    if not params:
        raise CheckpointError(f"{store.describe(directory)}: holds no {PARAMS_PREFIX} leaves to slim")
    records = [
        dict(r, dtype=dtype if np.issubdtype(_np_dtype(r["dtype"]), np.floating) else r["dtype"])
        for _, r in params
    ]
    written = [0]

    def pieces() -> Iterable[_Piece]:
        for k, (i, record) in enumerate(params):
            for j in range(len(record["boxes"])):
                array = _read_piece(store, directory, i, record, j).astype(_np_dtype(records[k]["dtype"]))
                written[0] += array.nbytes
                yield _Piece(k, j, array)

    step_meta = {"step": meta.get("step"), "extra": meta.get("extra", {}), "process_count": 1}
    _write_checkpoint(out, "", pieces(), records, step_meta, f"slim:{dst}")
    return written[0]
