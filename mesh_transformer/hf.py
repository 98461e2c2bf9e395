"""Hugging Face interop for every architecture of the family: a streaming export of our checkpoints to a
`from_pretrained` folder (GPTJ-, GPTNeoX- or GPTNeoForCausalLM), and imports of Hugging Face folders (and,
through `original`, Mesh-Transformer-JAX checkpoints) as our params. The name maps and config mappings
themselves are the architectures' (`Model.hf_names`, `Model.hf_config`, `Model.config_from_hf`).

Torch linears are [out, in]; our `w` are [in, out], so every kernel is transposed. Embeddings are [rows, d]
in both. Our per-layer params are stacked on a leading layers axis; HF names each layer by its index.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from mesh_transformer import storage
from mesh_transformer.config import Config
from mesh_transformer.data import find_tokenizer
from mesh_transformer.errors import InteropError
from mesh_transformer.models import Model, model_for
from mesh_transformer.models.layers import STACK

# lm_head bias of vocabulary rows added by padding: never sampled, yet finite even in float16.
PADDED_VOCAB_BIAS = -1e4
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what `save_pretrained` uses: "5GB"
GPT2_EOS_ID = 50256  # bos/eos of a run without a tokenizer of its own (the family's GPT-2 BPE)
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_ST_DTYPES = {
    code: (ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)) for name, code in _ST_CODES.items()
}


def stacked(model: Model, module: str) -> str:
    """Our stacked module of a layer's module name: "ln_1" -> "gptj/layers/block/ln_1"."""
    return f"{model.root}/{STACK}{module}"


def hf_tensors(params, model: Model) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in torch layout) for every tensor, one at a time (host arrays; no copies kept)."""
    global_names, layer_names = model.hf_names()
    for (module, name), (hf_name, transpose) in global_names.items():
        value = np.asarray(params[module][name])
        yield hf_name, value.T if transpose else value
    for (module, name), (hf_name, transpose) in layer_names.items():
        layers = params[stacked(model, module)][name]
        for i in range(model.layers):
            value = np.asarray(layers[i])
            yield hf_name.format(i=i), value.T if transpose else value


def _leaves_from_hf(get: Callable[[str], np.ndarray], model: Model) -> Iterator[tuple[str, str, np.ndarray]]:
    """(our module, param, float32 array) one leaf at a time from `get(HF name)` in torch layout."""
    global_names, layer_names = model.hf_names()
    for (module, name), (hf_name, transpose) in global_names.items():
        value = np.asarray(get(hf_name), np.float32)
        yield module, name, np.ascontiguousarray(value.T) if transpose else value
    for (module, name), (hf_name, transpose) in layer_names.items():
        layers = None
        for i in range(model.layers):
            value = np.asarray(get(hf_name.format(i=i)), np.float32)
            value = value.T if transpose else value
            if layers is None:
                layers = np.empty((model.layers, *value.shape), np.float32)
            layers[i] = value
        yield stacked(model, module), name, layers


def params_from_hf(tensors: Mapping[str, np.ndarray], model: Model) -> dict[str, dict[str, np.ndarray]]:
    """Our params (float32 numpy) from HF tensors in torch layout; a missing tensor raises KeyError."""
    params: dict[str, dict[str, np.ndarray]] = {}
    for module, name, value in _leaves_from_hf(tensors.__getitem__, model):
        params.setdefault(module, {})[name] = value
    return params


def param_key(module: str, name: str) -> str:
    """The tree path of a param as checkpoints name it, e.g. "['gptj/ln_f']['scale']"."""
    return f"['{module}']['{name}']"


def expected_shapes(config: Config) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shape of every param of `config`'s model (by tracing; nothing is allocated)."""
    from mesh_transformer.memory import abstract_params

    return {
        module: {name: tuple(p.shape) for name, p in leaves.items()}
        for module, leaves in abstract_params(config).items()
    }


def hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Shape in torch layout of every HF tensor of `config`'s model, in the order HF lists them."""
    model, ours = model_for(config), expected_shapes(config)
    global_names, layer_names = model.hf_names()
    shapes = {}
    for (module, name), (hf_name, transpose) in global_names.items():
        shape = ours[module][name]
        shapes[hf_name] = shape[::-1] if transpose else shape
    for i in range(config.layers):
        for (module, name), (hf_name, transpose) in layer_names.items():
            shape = ours[stacked(model, module)][name][1:]
            shapes[hf_name.format(i=i)] = shape[::-1] if transpose else shape
    return shapes


# ----- vocabulary padding (shared by every import) -----


def vocab_fitter(n_vocab: int, source: str) -> Callable[[str, str, np.ndarray], np.ndarray]:
    """`fit(module, name, value)`: a leaf with a vocab axis (by its partition rule) padded up to `n_vocab`
    rows (zero weights, `PADDED_VOCAB_BIAS` for an LM head bias), said once per import; a source with more
    rows than `n_vocab` is an error, never silently cut."""
    from mesh_transformer.sharding import param_logical_axes

    said = False

    def fit(module: str, name: str, value: np.ndarray) -> np.ndarray:
        nonlocal said
        axes = param_logical_axes(f"{module}/{name}", value.ndim)
        if "vocab" not in axes or value.shape[axes.index("vocab")] == n_vocab:
            return value
        axis = axes.index("vocab")
        have = value.shape[axis]
        if have > n_vocab:
            raise InteropError(
                f"{source} has a vocabulary of {have} rows but the config's n_vocab is {n_vocab}; "
                f"set n_vocab to at least {have} (rounded up to a multiple of cores_per_replica)"
            )
        bias = name == "b"
        if not said:
            print(
                f"{source}: padding the vocabulary from {have} to the config's n_vocab {n_vocab} rows "
                f"(zero weights, an LM head bias of {PADDED_VOCAB_BIAS:g} where the model has one: "
                "never sampled)"
            )
            said = True
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, n_vocab - have)
        return np.pad(value, widths, constant_values=PADDED_VOCAB_BIAS if bias else 0.0)

    return fit


def _place(value: np.ndarray, target: Any) -> Any:
    """A host leaf cast and placed like `target` (a ShapeDtypeStruct or array with a sharding), if given."""
    if target is None:
        return value
    import jax

    value = value.astype(target.dtype, copy=False)
    sharding = getattr(target, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)


def _target_leaf(target: Any, module: str, name: str) -> Any:
    return None if target is None else target[module][name]


# ----- safetensors files (written and read here without torch) -----


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Header bytes (length prefix included) for (name, dtype code, shape, nbytes) stored in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads so that the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


class _SafetensorsFile:
    """The tensors of one safetensors file, each read from disk only when asked for."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            (header_len,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
            header = json.loads(storage.read_range(path, 8, 8 + header_len))
            self.data_start = 8 + header_len
            self.tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            for name, info in self.tensors.items():
                if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                    raise ValueError(f"header entry {name} lacks dtype, shape or data_offsets")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise InteropError(f"{path}: not a readable safetensors file ({e})") from None

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info["dtype"] not in _ST_DTYPES:
            raise InteropError(
                f"{self.path}: tensor {name} has dtype {info['dtype']}; expected F32, F16 or BF16"
            )
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        if count != int(np.prod(info["shape"], dtype=np.int64)):
            raise InteropError(f"{self.path}: tensor {name} holds {count} values for shape {info['shape']}")
        raw = storage.read_range(self.path, self.data_start + begin, self.data_start + end)
        value = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        if value.size != count:
            raise InteropError(f"{self.path}: truncated inside tensor {name}")
        return value.reshape(info["shape"])


# ----- export -----


class ExportResult(NamedTuple):
    output_dir: str
    weight_files: list[str]
    weight_bytes: int
    tokenizer: str | None  # where the tokenizer files came from, None when the run had none


@dataclasses.dataclass
class _Slot:
    """Where one HF tensor's bytes go: an open output file and the offset of its first byte."""

    fd: int
    offset: int
    shape: tuple[int, ...]
    itemsize: int


def _write_region(slot: _Slot, box: tuple[tuple[int, int], ...], values: np.ndarray) -> None:
    """Write `values` into the [start, stop) `box` of the tensor at `slot` (1-d or 2-d, torch layout)."""
    values = np.ascontiguousarray(values)
    row_items = int(np.prod(slot.shape[1:], dtype=np.int64))
    if all(box[d] == (0, slot.shape[d]) for d in range(1, len(slot.shape))):
        # Whole rows: one contiguous run.
        os.pwrite(
            slot.fd,
            memoryview(values.reshape(-1).view(np.uint8)),
            slot.offset + box[0][0] * row_items * slot.itemsize,
        )
        return
    assert len(slot.shape) == 2, slot.shape
    (r0, r1), (c0, _) = box
    for r in range(r0, r1):
        row = memoryview(values[r - r0].view(np.uint8))
        os.pwrite(slot.fd, row, slot.offset + (r * slot.shape[1] + c0) * slot.itemsize)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise InteropError(f"size {text!r}: expected a positive number of bytes such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def _tokenizer_files(path: str, seq: int) -> tuple[dict[str, str], int | None]:
    """tokenizer.json and tokenizer_config.json contents for a `transformers` fast tokenizer; the eos id."""
    from mesh_transformer.prepare import read_tokenizer_file

    tokenizer, text = read_tokenizer_file(path)
    eos = next((t for t in EOS_TOKENS if tokenizer.token_to_id(t) is not None), None)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    if eos is not None:
        tokenizer_config.update(bos_token=eos, eos_token=eos, unk_token=eos)
    files = {"tokenizer.json": text, "tokenizer_config.json": json.dumps(tokenizer_config, indent=2)}
    return files, (tokenizer.token_to_id(eos) if eos is not None else None)


def _check_output_dir(output_dir: str) -> None:
    taken = storage.is_dir(output_dir) if storage.is_gcs(output_dir) else os.path.exists(output_dir)
    if taken and (storage.is_gcs(output_dir) or not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise InteropError(
            f"--output-path {output_dir}: already exists and is not empty; choose a new directory"
        )


def export_checkpoint(
    ckpt: str,
    config: Config,
    output_dir: str,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | None = None,
) -> ExportResult:
    """Write checkpoint `ckpt` (full or slim, any mesh, local or gs://) as a Hugging Face folder of the
    config's architecture (`GPTJForCausalLM`, `GPTNeoXForCausalLM` or `GPTNeoForCausalLM`).

    Streams on the host one saved piece at a time, writing each into its place in preallocated safetensors
    files, so memory stays near one checkpoint piece whatever the model size. The folder is built under a
    temporary name and renamed when complete; an existing non-empty `output_dir` is refused.
    """
    from mesh_transformer.checkpoint import CheckpointError, ParamPieces

    if dtype not in EXPORT_DTYPES:
        raise InteropError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    _check_output_dir(output_dir)
    try:
        pieces = ParamPieces(ckpt)
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    _check_checkpoint_shapes(pieces.shapes, config, ckpt)
    tokenizer_path = find_tokenizer(ckpt, config, tokenizer)
    tokenizer_files, eos_id = _tokenizer_files(tokenizer_path, config.seq) if tokenizer_path else ({}, None)
    if eos_id is None and tokenizer_path is None and config.n_vocab > GPT2_EOS_ID:
        eos_id = GPT2_EOS_ID

    out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shapes = hf_shapes(config)
    files = _plan_shards(shapes, out_dtype.itemsize, max_shard_bytes)

    if storage.is_gcs(output_dir):  # built on local disk, then uploaded
        tmp = tempfile.mkdtemp(prefix="hf-export-")
    else:
        parent = os.path.dirname(os.path.abspath(output_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    fds: list[int] = []
    try:
        slots: dict[str, _Slot] = {}
        for file_name, names in files.items():
            entries = [
                (n, _ST_CODES[dtype], shapes[n], int(np.prod(shapes[n])) * out_dtype.itemsize) for n in names
            ]
            header = _safetensors_header(entries)
            fd = os.open(os.path.join(tmp, file_name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.pwrite(fd, header, 0)
            offset = len(header)
            for name, _, shape, nbytes in entries:
                slots[name] = _Slot(fd, offset, shape, out_dtype.itemsize)
                offset += nbytes
            os.ftruncate(fd, offset)
        try:
            _stream_pieces(pieces, model_for(config), slots, out_dtype)
        except CheckpointError as e:
            raise InteropError(str(e)) from None
        for fd in fds:
            os.fsync(fd)

        weight_bytes = sum(os.fstat(fd).st_size for fd in fds)
        if len(files) > 1:
            index = {
                "metadata": {
                    "total_size": sum(int(np.prod(s)) * out_dtype.itemsize for s in shapes.values())
                },
                "weight_map": {n: f for f, names in files.items() for n in names},
            }
            _write_text(tmp, "model.safetensors.index.json", json.dumps(index, indent=2))
        hf_config = model_for(config).hf_config(config.seq, bos_token_id=eos_id, eos_token_id=eos_id)
        hf_config["torch_dtype"] = dtype
        _write_text(tmp, "config.json", json.dumps(hf_config, indent=2))
        generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "max_length": config.seq}
        _write_text(tmp, "generation_config.json", json.dumps(generation, indent=2))
        for name, text in tokenizer_files.items():
            _write_text(tmp, name, text)
        _publish(tmp, output_dir)
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(output_dir, list(files), weight_bytes, tokenizer_path)


def _publish(tmp: str, output_dir: str) -> None:
    """Move the finished export to `output_dir`: one rename locally; on gs://, the weights first and
    config.json last, so that a folder with a config.json is complete."""
    if not storage.is_gcs(output_dir):
        try:
            os.rename(tmp, output_dir)  # onto nothing, or onto an empty directory
        except OSError as e:
            raise InteropError(
                f"--output-path {output_dir}: cannot move the finished export there ({e})"
            ) from None
        return
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        storage.upload_file(os.path.join(tmp, name), storage.join(output_dir, name))


def _write_text(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> dict[str, list[str]]:
    """Output file name -> the tensors it holds, in order, each file at most `max_bytes` (unless one tensor
    alone is bigger); a single file is named model.safetensors as `from_pretrained` expects."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": g for k, g in enumerate(groups)}


def _check_checkpoint_shapes(
    saved: dict[str, tuple[tuple[int, ...], str]], config: Config, ckpt: str
) -> None:
    wanted = {param_key(m, n): s for m, leaves in expected_shapes(config).items() for n, s in leaves.items()}
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise InteropError(
            f"{ckpt}: has no param {missing[0]} ({len(missing)} missing); not a checkpoint of the config's "
            f"architecture ({config.architecture})?"
        )
    for key, shape in wanted.items():
        if saved[key][0] != shape:
            raise InteropError(
                f"{ckpt}: param {key} has shape {saved[key][0]} but the config (layers={config.layers}, "
                f"d_model={config.d_model}, n_vocab={config.n_vocab}) expects {shape}; "
                "pass the config the checkpoint was trained with"
            )


def _stream_pieces(pieces: Any, model: Model, slots: dict[str, _Slot], out_dtype: np.dtype) -> None:
    def write(hf_name: str, box, values: np.ndarray, transpose: bool) -> None:
        if transpose:
            values, box = values.T, box[::-1]
        _write_region(slots[hf_name], tuple(tuple(b) for b in box), values.astype(out_dtype))

    global_names, layer_names = model.hf_names()
    for (module, name), (hf_name, transpose) in global_names.items():
        for box, values in pieces.pieces(param_key(module, name)):
            write(hf_name, box, values, transpose)
    for (module, name), (hf_name, transpose) in layer_names.items():
        for box, values in pieces.pieces(param_key(stacked(model, module), name)):
            (lo, hi), rest = box[0], box[1:]
            for i in range(lo, hi):
                write(hf_name.format(i=i), rest, values[i - lo], transpose)
            del values


# ----- import -----


def is_hf_folder(path: str) -> bool:
    files = set(storage.list_dir(path)[0])
    return "config.json" in files and any(f in files for f in _WEIGHT_FILES)


_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _config_json(folder: str, expected: str) -> tuple[Any, str]:
    """(the parsed config.json of a Hugging Face folder, its path); a missing folder or file or bad JSON is
    one error ending in `expected`."""
    path = storage.join(folder, "config.json")
    if not storage.is_dir(folder):
        raise InteropError(f"{folder}: not found; {expected}")
    try:
        return json.loads(storage.read_text(path)), path
    except FileNotFoundError:
        raise InteropError(f"{folder}: no config.json; {expected}") from None
    except ValueError as e:
        raise InteropError(f"{path}: not valid JSON ({e})") from None


def read_hf_config(folder: str, config: Config) -> dict:
    """config.json of a Hugging Face folder of the config's architecture, checked against our config: a
    disagreeing field is one error naming both."""
    model = model_for(config)
    hf, path = _config_json(folder, f"expected a Hugging Face {model.hf_class} folder")
    if not isinstance(hf, dict) or hf.get("model_type") != model.hf_model_type:
        got = hf.get("model_type") if isinstance(hf, dict) else None
        raise InteropError(
            f"{path}: model_type is {got!r}, expected {model.hf_model_type!r} "
            f"(the config's architecture is {config.architecture})"
        )
    for ours, (value, hf_key) in type(model).config_from_hf(hf, path).items():
        if value != getattr(config, ours):
            raise InteropError(
                f"{path}: {hf_key} is {value!r} but the config's {ours} is {getattr(config, ours)!r}"
            )
    if not isinstance(hf.get("vocab_size"), int) or hf["vocab_size"] <= 0:
        raise InteropError(f"{path}: vocab_size is {hf.get('vocab_size')!r}, expected a positive integer")
    return hf


# Optimizer settings of a config written for fine-tuning (the model's own keys come from its config.json).
FINE_TUNE_DEFAULTS: dict[str, Any] = {
    "per_replica_batch": 1,
    "warmup_steps": 100,
    "anneal_steps": 900,
    "total_steps": 1000,
    "lr": 1e-5,
    "end_lr": 1e-6,
    "weight_decay": 0.0,
    "ckpt_every": 500,
    "val_every": 500,
    "keep_every": 10000,
}
FINE_TUNE_SEQUENCES_PER_STEP = 32  # gradient accumulation fills a step with about this many sequences


def training_config_from_hf(
    folder: str, *, tpu_size: int = 8, cores_per_replica: int = 8, seq: int | None = None
) -> dict[str, Any]:
    """A training config (as JSON values) for fine-tuning the family checkpoint in `folder`: the
    architecture and every model key from its config.json, the vocabulary padded to a multiple of
    `cores_per_replica`, `seq` (default: the model's context) and the fine-tuning optimizer defaults above.
    Another model type, or shapes the mesh cannot split, is one error naming the value."""
    from mesh_transformer.config import from_dict
    from mesh_transformer.models import for_hf_model_type

    hf, path = _config_json(folder, "expected a Hugging Face model folder")
    if not isinstance(hf, dict):
        raise InteropError(f"{path}: holds a {type(hf).__name__}, expected a JSON object")
    cls = for_hf_model_type(hf.get("model_type"), path)
    vocab = hf.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise InteropError(f"{path}: vocab_size is {vocab!r}, expected a positive integer")
    dp = max(tpu_size // cores_per_replica, 1)
    raw = {
        "architecture": cls.architecture,
        **{key: value for key, (value, _) in cls.config_from_hf(hf, path).items()},
        "n_vocab": -(-vocab // cores_per_replica) * cores_per_replica,
        "seq": seq if seq is not None else cls.hf_context(hf),
        "tpu_size": tpu_size,
        "cores_per_replica": cores_per_replica,
        **FINE_TUNE_DEFAULTS,
        "gradient_accumulation_steps": max(1, FINE_TUNE_SEQUENCES_PER_STEP // dp),
        "name": os.path.basename(os.path.normpath(folder)) or cls.architecture,
        "comment": f"fine-tune {folder} (written by scripts/hf_config.py)",
    }
    from_dict(raw)  # every key valid for this mesh, or one line naming it
    return raw


def _hf_weight_getter(folder: str) -> Callable[[str], np.ndarray]:
    """name -> array (torch layout, as stored) over a folder's safetensors or pytorch_model.bin files."""

    def index_files(index_name: str) -> dict[str, str]:
        path = storage.join(folder, index_name)
        try:
            weight_map = json.loads(storage.read_text(path))["weight_map"]
            return {name: storage.join(folder, file) for name, file in weight_map.items()}
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise InteropError(f"{path}: not a readable weight index ({e})") from None

    files = set(storage.list_dir(folder)[0])
    present = [f for f in _WEIGHT_FILES if f in files]
    if not present:
        raise InteropError(f"{folder}: holds no weights; expected one of {', '.join(_WEIGHT_FILES)}")
    kind = present[0]
    if kind.startswith("model.safetensors"):
        where = index_files(kind) if kind.endswith(".json") else None
        opened: dict[str, _SafetensorsFile] = {}

        def file_for(name: str) -> _SafetensorsFile:
            path = where.get(name) if where is not None else storage.join(folder, kind)
            if path is None:
                raise InteropError(f"{folder}/{kind}: has no tensor {name}")
            if path not in opened:
                opened[path] = _SafetensorsFile(path)
            return opened[path]

        def get(name: str) -> np.ndarray:
            file = file_for(name)
            if name not in file.tensors:
                raise InteropError(
                    f"{file.path}: has no tensor {name}; not a checkpoint of this architecture?"
                )
            return file.get(name)

        return get

    where = index_files(kind) if kind.endswith(".json") else None
    loaded: dict[str, dict] = {}

    def get_torch(name: str) -> np.ndarray:
        path = where.get(name) if where is not None else storage.join(folder, kind)
        if path is None:
            raise InteropError(f"{folder}/{kind}: has no tensor {name}")
        if path not in loaded:
            loaded[path] = _torch_load(path)
        if name not in loaded[path]:
            raise InteropError(f"{path}: has no tensor {name}; not a checkpoint of this architecture?")
        return loaded[path][name].float().numpy()

    return get_torch


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise InteropError(
            f"{path}: reading pytorch_model.bin needs torch installed (or convert to safetensors)"
        ) from None
    try:
        if storage.is_gcs(path):  # read whole: an object cannot be memory-mapped
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        else:
            try:  # memory-mapped: tensors are read as they are used
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (storage.StorageError, storage.StorageUnavailable):
        raise
    except Exception as e:  # torch raises many types for damaged or unsafe pickles
        raise InteropError(f"{path}: cannot be loaded as PyTorch weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise InteropError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def load_hf_params(folder: str, config: Config, target: Any = None) -> dict:
    """Our params from a Hugging Face folder of the config's architecture (safetensors, sharded or not, or
    pytorch_model.bin; tensors the model does not use, such as old checkpoints' attention.bias and
    attention.masked_bias buffers or a tied LM head's copy, are never read).

    Leaves are built one at a time: as float32 numpy, or, with `target` (a params tree of ShapeDtypeStructs
    with shardings, e.g. `Trainer.abstract_state.params`), cast and placed on the mesh at once. A vocabulary
    smaller than the config's n_vocab is padded (and said so); a larger one is an error.
    """
    hf = read_hf_config(folder, config)
    get = _hf_weight_getter(folder)
    wanted = hf_shapes(dataclasses.replace(config, n_vocab=hf["vocab_size"]))

    def checked(name: str) -> np.ndarray:
        value = get(name)
        if tuple(value.shape) != wanted[name]:
            raise InteropError(
                f"{folder}: tensor {name} has shape {tuple(value.shape)}, "
                f"but config.json implies {wanted[name]}"
            )
        return value

    params: dict[str, dict[str, Any]] = {}
    fit = vocab_fitter(config.n_vocab, f"{folder}/config.json")
    for module, name, value in _leaves_from_hf(checked, model_for(config)):
        value = fit(module, name, value)
        params.setdefault(module, {})[name] = _place(value, _target_leaf(target, module, name))
    return params


def load_pretrained_params(path: str, config: Config, target: Any = None) -> dict:
    """Params to start from, whatever `path` holds: a Hugging Face folder (config.json + weights), an
    original Mesh-Transformer-JAX checkpoint (meta.json + step_*/shard_*, or a step_N/ dir), one of ours, or
    a LoRA fine-tune (one of our LoRA checkpoints or a PEFT folder: its base with the adapters merged).

    Without `target` the result is float32 host numpy; with it, leaves are cast and placed like `target`.
    """
    from mesh_transformer import lora, original

    if lora.is_fine_tune(path):
        import jax

        merged = lora.load_merged(path, config)
        return merged if target is None else jax.tree_util.tree_map(_place, merged, target)
    if is_hf_folder(path):
        return load_hf_params(path, config, target)
    if original.is_original_checkpoint(path):
        return original.load_original_params(path, config, target)
    from mesh_transformer.checkpoint import CheckpointError, load_params

    host = target is None
    if host:
        import jax

        target = jax.tree_util.tree_map(
            lambda shape: jax.ShapeDtypeStruct(shape, np.float32),
            expected_shapes(config),
            is_leaf=lambda x: isinstance(x, tuple),
        )
    try:
        params = load_params(path, target)
    except CheckpointError as e:
        raise InteropError(
            f"{e} (params are read from one of our checkpoints, a LoRA fine-tune, a Hugging Face folder or "
            "an original Mesh-Transformer-JAX checkpoint)"
        ) from None
    if host:
        import jax

        params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    return params
