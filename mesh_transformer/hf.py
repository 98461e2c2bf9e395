"""Hugging Face GPT-J interop: the one name and layout mapping between our Haiku params and
`GPTJForCausalLM`, a streaming export of our checkpoints to a `from_pretrained` folder, and imports of
Hugging Face folders (and, through `original`, Mesh-Transformer-JAX checkpoints) as our params.

Torch linears are [out, in]; our `w` are [in, out], so every kernel is transposed. The embedding is
[vocab, d] in both. Our per-layer params are stacked on a leading layers axis; HF names each layer `h.{i}`.
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
from mesh_transformer.errors import UserError

LAYERS = "gptj/layers/block/"

# (our module, our param) -> (HF name with {i} for the layer, transpose?)
LAYER_MAP: dict[tuple[str, str], tuple[str, bool]] = {
    ("ln_1", "scale"): ("transformer.h.{i}.ln_1.weight", False),
    ("ln_1", "offset"): ("transformer.h.{i}.ln_1.bias", False),
    ("q_proj", "w"): ("transformer.h.{i}.attn.q_proj.weight", True),
    ("k_proj", "w"): ("transformer.h.{i}.attn.k_proj.weight", True),
    ("v_proj", "w"): ("transformer.h.{i}.attn.v_proj.weight", True),
    ("out_proj", "w"): ("transformer.h.{i}.attn.out_proj.weight", True),
    ("fc_in", "w"): ("transformer.h.{i}.mlp.fc_in.weight", True),
    ("fc_in", "b"): ("transformer.h.{i}.mlp.fc_in.bias", False),
    ("fc_out", "w"): ("transformer.h.{i}.mlp.fc_out.weight", True),
    ("fc_out", "b"): ("transformer.h.{i}.mlp.fc_out.bias", False),
}
GLOBAL_MAP: dict[tuple[str, str], tuple[str, bool]] = {
    ("gptj", "embeddings"): ("transformer.wte.weight", False),
    ("gptj/ln_f", "scale"): ("transformer.ln_f.weight", False),
    ("gptj/ln_f", "offset"): ("transformer.ln_f.bias", False),
    ("gptj/lm_head", "w"): ("lm_head.weight", True),
    ("gptj/lm_head", "b"): ("lm_head.bias", False),
}

# lm_head bias of vocabulary rows added by padding: never sampled, yet finite even in float16.
PADDED_VOCAB_BIAS = -1e4
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what `save_pretrained` uses: "5GB"
GPT2_EOS_ID = 50256  # GPT-J's bos/eos when the run has no tokenizer of its own (GPT-2 BPE)
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_ST_DTYPES = {
    code: (ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)) for name, code in _ST_CODES.items()
}


class InteropError(UserError):
    """A folder or checkpoint cannot be converted; the message names the file or field and the expectation."""


def hf_config_dict(
    config: Config, bos_token_id: int | None = 50256, eos_token_id: int | None = 50256
) -> dict:
    """`config.json` of the equivalent `GPTJForCausalLM`."""
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_layer": config.layers,
        "n_positions": config.seq,
        "n_inner": None,
        "rotary_dim": config.pe_rotary_dims,
        "vocab_size": config.n_vocab,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def hf_tensors(params, layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in torch layout) for every tensor, one at a time (host arrays; no copies kept)."""
    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        value = np.asarray(params[module][name])
        yield hf_name, value.T if transpose else value
    for (module, name), (hf_name, transpose) in LAYER_MAP.items():
        stacked = params[LAYERS + module][name]
        for i in range(layers):
            value = np.asarray(stacked[i])
            yield hf_name.format(i=i), value.T if transpose else value


def _leaves_from_hf(get: Callable[[str], np.ndarray], layers: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(our module, param, float32 array) one leaf at a time from `get(HF name)` in torch layout."""
    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        value = np.asarray(get(hf_name), np.float32)
        yield module, name, np.ascontiguousarray(value.T) if transpose else value
    for (module, name), (hf_name, transpose) in LAYER_MAP.items():
        stacked = None
        for i in range(layers):
            value = np.asarray(get(hf_name.format(i=i)), np.float32)
            value = value.T if transpose else value
            if stacked is None:
                stacked = np.empty((layers, *value.shape), np.float32)
            stacked[i] = value
        yield LAYERS + module, name, stacked


def params_from_hf(tensors: Mapping[str, np.ndarray], layers: int) -> dict[str, dict[str, np.ndarray]]:
    """Our params (float32 numpy) from HF tensors in torch layout; a missing tensor raises KeyError."""
    params: dict[str, dict[str, np.ndarray]] = {}
    for module, name, value in _leaves_from_hf(tensors.__getitem__, layers):
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
    ours = expected_shapes(config)
    shapes = {}
    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        shape = ours[module][name]
        shapes[hf_name] = shape[::-1] if transpose else shape
    for i in range(config.layers):
        for (module, name), (hf_name, transpose) in LAYER_MAP.items():
            shape = ours[LAYERS + module][name][1:]
            shapes[hf_name.format(i=i)] = shape[::-1] if transpose else shape
    return shapes


# ----- vocabulary padding (shared by every import) -----


def fit_vocab(module: str, name: str, value: np.ndarray, n_vocab: int, source: str) -> np.ndarray:
    """Pad a vocab-sized leaf up to `n_vocab` rows (zero weights, `PADDED_VOCAB_BIAS` for the LM head bias);
    a source with more rows than `n_vocab` is an error, never silently cut."""
    axis = {("gptj", "embeddings"): 0, ("gptj/lm_head", "w"): 1, ("gptj/lm_head", "b"): 0}.get((module, name))
    if axis is None or value.shape[axis] == n_vocab:
        return value
    have = value.shape[axis]
    if have > n_vocab:
        raise InteropError(
            f"{source} has a vocabulary of {have} rows but the config's n_vocab is {n_vocab}; "
            f"set n_vocab to at least {have} (rounded up to a multiple of cores_per_replica)"
        )
    if (module, name) == ("gptj", "embeddings"):  # said once per import: the embedding comes first
        print(
            f"{source}: padding the vocabulary from {have} to the config's n_vocab {n_vocab} rows "
            f"(zero weights, lm_head bias {PADDED_VOCAB_BIAS:g}: never sampled)"
        )
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, n_vocab - have)
    fill = PADDED_VOCAB_BIAS if (module, name) == ("gptj/lm_head", "b") else 0.0
    return np.pad(value, widths, constant_values=fill)


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
    """Write checkpoint `ckpt` (full or slim, any mesh, local or gs://) as a `GPTJForCausalLM` folder.

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
            _stream_pieces(pieces, slots, out_dtype)
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
        hf_config = hf_config_dict(config, bos_token_id=eos_id, eos_token_id=eos_id)
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
            f"{ckpt}: has no param {missing[0]} ({len(missing)} missing); not a GPT-J checkpoint?"
        )
    for key, shape in wanted.items():
        if saved[key][0] != shape:
            raise InteropError(
                f"{ckpt}: param {key} has shape {saved[key][0]} but the config (layers={config.layers}, "
                f"d_model={config.d_model}, n_vocab={config.n_vocab}) expects {shape}; "
                "pass the config the checkpoint was trained with"
            )


def _stream_pieces(pieces: Any, slots: dict[str, _Slot], out_dtype: np.dtype) -> None:
    def write(hf_name: str, box, values: np.ndarray, transpose: bool) -> None:
        if transpose:
            values, box = values.T, box[::-1]
        _write_region(slots[hf_name], tuple(tuple(b) for b in box), values.astype(out_dtype))

    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        for box, values in pieces.pieces(param_key(module, name)):
            write(hf_name, box, values, transpose)
    for (module, name), (hf_name, transpose) in LAYER_MAP.items():
        for box, values in pieces.pieces(param_key(LAYERS + module, name)):
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

# HF config.json field -> (our config field, how to read the HF value)
_SHAPE_FIELDS = {
    "n_embd": "d_model",
    "n_layer": "layers",
    "n_head": "n_heads",
    "rotary_dim": "pe_rotary_dims",
}


def read_hf_config(folder: str, config: Config) -> dict:
    """config.json of a GPT-J folder, checked against our config: any disagreeing field is one error."""
    path = storage.join(folder, "config.json")
    if not storage.is_dir(folder):
        raise InteropError(f"{folder}: not found; expected a Hugging Face GPT-J folder")
    try:
        hf = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise InteropError(f"{folder}: no config.json; expected a Hugging Face GPT-J folder") from None
    except ValueError as e:
        raise InteropError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gptj":
        got = hf.get("model_type") if isinstance(hf, dict) else None
        raise InteropError(f"{path}: model_type is {got!r}, expected 'gptj'")
    for hf_key, ours in _SHAPE_FIELDS.items():
        value = hf.get(hf_key)
        if hf_key == "rotary_dim" and value is None:  # HF: rotary over the whole head
            value = hf.get("n_embd", 0) // max(hf.get("n_head", 1), 1)
        if value != getattr(config, ours):
            raise InteropError(
                f"{path}: {hf_key} is {value} but the config's {ours} is {getattr(config, ours)}"
            )
    checks = {
        "n_inner": (None, 4 * config.d_model),
        "activation_function": ("gelu_new",),
        "layer_norm_epsilon": (1e-5,),
        "tie_word_embeddings": (False, None),
    }
    for key, allowed in checks.items():
        if hf.get(key, allowed[0]) not in allowed:
            raise InteropError(f"{path}: {key} is {hf.get(key)!r}; this GPT-J supports only {allowed[0]!r}")
    if not isinstance(hf.get("vocab_size"), int) or hf["vocab_size"] <= 0:
        raise InteropError(f"{path}: vocab_size is {hf.get('vocab_size')!r}, expected a positive integer")
    return hf


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
                raise InteropError(f"{file.path}: has no tensor {name}; not a GPTJForCausalLM checkpoint?")
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
            raise InteropError(f"{path}: has no tensor {name}; not a GPTJForCausalLM checkpoint?")
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
    """Our params from a local Hugging Face GPT-J folder (safetensors, sharded or not, or pytorch_model.bin).

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
    for module, name, value in _leaves_from_hf(checked, config.layers):
        value = fit_vocab(module, name, value, config.n_vocab, f"{folder}/config.json")
        params.setdefault(module, {})[name] = _place(value, _target_leaf(target, module, name))
    return params


def load_pretrained_params(path: str, config: Config, target: Any = None) -> dict:
    """Params to start from, whatever `path` holds: a Hugging Face GPT-J folder (config.json + weights), an
    original Mesh-Transformer-JAX checkpoint (meta.json + step_*/shard_*, or a step_N/ dir), or one of ours.

    Without `target` the result is float32 host numpy; with it, leaves are cast and placed like `target`.
    """
    from mesh_transformer import original

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
            f"{e} (--tune-model-path takes one of our checkpoints, a Hugging Face GPT-J folder or an "
            "original Mesh-Transformer-JAX checkpoint)"
        ) from None
    if host:
        import jax

        params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    return params
