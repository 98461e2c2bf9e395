"""Import checkpoints of the original Mesh-Transformer-JAX (the GPT-J-6B release layout) as our GPT-J params.

Layout: `{model_dir}/meta.json` and `{model_dir}/step_{N}/shard_{i}/{0..15}.npz`, one folder per
model-parallel shard, each holding that shard's leaves of the state - the sorted-key flattening of
(opt_state, params, step) for a full checkpoint, of params (and step) for a slim one - split into
contiguous npz chunks (keys arr_0, arr_1, ...). bfloat16 leaves load from numpy as void 'V2'.
"""

from __future__ import annotations

import json
import re
from typing import Any

import ml_dtypes
import numpy as np

from mesh_transformer import storage
from mesh_transformer.config import Config
from mesh_transformer.hf import InteropError, _place, _target_leaf, expected_shapes, vocab_fitter
from mesh_transformer.models import gptj

LAYERS = f"{gptj.ROOT}/layers/block/"

ROOT = "causal_transformer_shard/~/"
EMBEDDING = ROOT + "embedding_shard/~/linear"
PROJECTION = ROOT + "projection_shard/~/linear"
FINAL_NORM = ROOT + "projection_shard/~/replicated_layer_norm"

# How the per-shard copies of a leaf combine: concatenate on an axis, sum, or take shard 0 (replicated).
CONCAT_OUT, CONCAT_IN, SUM, FIRST = "concat_out", "concat_in", "sum", "first"

# Layer linears in creation order (q, v, k, out, fc_in, fc_out) -> our module.
LAYER_LINEARS = {
    "linear": "q_proj",
    "linear_1": "v_proj",
    "linear_2": "k_proj",
    "linear_3": "out_proj",
    "linear_4": "fc_in",
    "linear_5": "fc_out",
}
# (original module within a layer, param) -> (our module, our param, combine)
LAYER_RULES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("linear", "w"): ("q_proj", "w", CONCAT_OUT),
    ("linear_1", "w"): ("v_proj", "w", CONCAT_OUT),
    ("linear_2", "w"): ("k_proj", "w", CONCAT_OUT),
    ("linear_3", "w"): ("out_proj", "w", CONCAT_IN),
    ("linear_4", "b"): ("fc_in", "b", CONCAT_OUT),
    ("linear_4", "w"): ("fc_in", "w", CONCAT_OUT),
    ("linear_5", "b"): ("fc_out", "b", SUM),
    ("linear_5", "w"): ("fc_out", "w", CONCAT_IN),
    ("replicated_layer_norm", "offset"): ("ln_1", "offset", FIRST),
    ("replicated_layer_norm", "scale"): ("ln_1", "scale", FIRST),
}
GLOBAL_RULES: dict[tuple[str, str], tuple[str, str, str]] = {
    (EMBEDDING, "b"): (gptj.ROOT, "embeddings", SUM),  # added to every embedding row
    (EMBEDDING, "w"): (gptj.ROOT, "embeddings", CONCAT_IN),
    (PROJECTION, "b"): (f"{gptj.ROOT}/lm_head", "b", CONCAT_OUT),
    (PROJECTION, "w"): (f"{gptj.ROOT}/lm_head", "w", CONCAT_OUT),
    (FINAL_NORM, "offset"): (f"{gptj.ROOT}/ln_f", "offset", FIRST),
    (FINAL_NORM, "scale"): (f"{gptj.ROOT}/ln_f", "scale", FIRST),
}


def param_names(layers: int) -> list[tuple[str, str]]:
    """(module, param) of the original params in the order jax flattens them: module names sorted as strings
    (layer_1 < layer_10 < layer_2), then param names (b < w, offset < scale)."""
    names = list(GLOBAL_RULES)
    names += [(f"{ROOT}layer_{k}/~/{module}", param) for k in range(layers) for module, param in LAYER_RULES]
    return sorted(names)


def _shard_shape(module: str, param: str, c: Config, shards: int, n_vocab: int) -> tuple[int, ...]:
    d, f = c.d_model, c.d_ff
    if module == EMBEDDING:
        return (d,) if param == "b" else (n_vocab // shards, d)
    if module == PROJECTION:
        return (n_vocab // shards,) if param == "b" else (d, n_vocab // shards)
    if module == FINAL_NORM or module.endswith("replicated_layer_norm"):
        return (d,)
    linear = module.rsplit("/~/", 1)[1]
    return {
        ("linear", "w"): (d, d // shards),
        ("linear_1", "w"): (d, d // shards),
        ("linear_2", "w"): (d, d // shards),
        ("linear_3", "w"): (d // shards, d),
        ("linear_4", "b"): (f // shards,),
        ("linear_4", "w"): (d, f // shards),
        ("linear_5", "b"): (d,),
        ("linear_5", "w"): (f // shards, d),
    }[(linear, param)]


def _step_dir(path: str) -> str:
    """The step_N directory a path names: itself, or the step meta.json of a model_dir points at."""
    path = path.rstrip("/")
    if storage.is_dir(storage.join(path, "shard_0")):
        return path
    meta_path = storage.join(path, "meta.json")
    try:
        step = int(json.loads(storage.read_text(meta_path))["step"])
    except FileNotFoundError:
        raise InteropError(f"{path}: not an original checkpoint (no meta.json and no shard_0/)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InteropError(f"{meta_path}: expected JSON with an integer 'step' ({e})") from None
    step_dir = storage.join(path, f"step_{step}")
    if not storage.is_dir(storage.join(step_dir, "shard_0")):
        raise InteropError(f"{meta_path}: names step {step} but {step_dir}/shard_0 does not exist")
    return step_dir


def is_original_checkpoint(path: str) -> bool:
    path = path.rstrip("/")
    if storage.is_file(storage.join(path, "shard_0", "0.npz")):
        return True
    files, dirs = storage.list_dir(path)
    return "meta.json" in files and any(
        re.fullmatch(r"step_\d+", d) and storage.is_dir(storage.join(path, d, "shard_0")) for d in dirs
    )


class _Shard:
    """The leaves of one shard folder, addressed by flat index, each read from its npz only when asked for."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.index: list[tuple[Any, str, str]] = []  # (open NpzFile, member key, file) per leaf
        chunk = 0
        while storage.is_file(path := storage.join(directory, f"{chunk}.npz")):
            try:  # a gs:// npz is read lazily through a seekable stream, like a local one
                npz = np.load(storage.open_file(path) if storage.is_gcs(path) else path, allow_pickle=False)
                keys = sorted(npz.files, key=lambda k: int(k.removeprefix("arr_")))
            except (OSError, ValueError) as e:
                raise InteropError(f"{path}: not a readable npz file ({e})") from None
            self.index += [(npz, key, path) for key in keys]
            chunk += 1
        if chunk == 0:
            raise InteropError(f"{directory}: holds no 0.npz; not a shard of an original checkpoint")

    def leaf(self, i: int) -> np.ndarray:
        npz, key, path = self.index[i]
        try:
            value = npz[key]
        except (OSError, ValueError) as e:
            raise InteropError(f"{path}: cannot read {key} ({e}); the file is damaged") from None
        if value.dtype == np.dtype("V2"):  # numpy has no bfloat16: the original saved bf16 as raw 2 bytes
            value = value.view(ml_dtypes.bfloat16)
        return value.astype(np.float32)


def load_original_params(path: str, config: Config, target: Any = None) -> dict:
    """Our params from an original checkpoint: a model_dir with meta.json, or one step_N/ directory.

    Full (opt_state, params, step) and slim (params, with or without step) checkpoints both load; only the
    params are read. Leaves are float32 numpy, or cast and placed like `target` when given.
    """
    step_dir = _step_dir(path)
    ours = {m for m, _, _ in GLOBAL_RULES.values()} | {LAYERS + m for m, _, _ in LAYER_RULES.values()}
    if set(expected_shapes(config)) != ours:
        raise InteropError(
            f"{step_dir}: an original Mesh-Transformer-JAX checkpoint holds a GPT-J, not a model of the "
            f"config's architecture ({config.architecture})"
        )
    shard_dirs = []
    while storage.is_dir(d := storage.join(step_dir, f"shard_{len(shard_dirs)}")):
        shard_dirs.append(d)
    shards = [_Shard(d) for d in shard_dirs]
    counts = {len(s.index) for s in shards}
    if len(counts) != 1:
        raise InteropError(
            f"{step_dir}: shards hold different numbers of leaves {sorted(counts)}; incomplete copy?"
        )
    total = counts.pop()
    names = param_names(config.layers)
    if total < len(names):
        raise InteropError(
            f"{step_dir}: holds {total} leaves per shard, fewer than the {len(names)} params of a "
            f"{config.layers}-layer GPT-J; does the config's layers match the checkpoint?"
        )
    # Params come after opt_state and before step (a scalar) in sorted-key order.
    last_is_step = total > len(names) and shards[0].leaf(total - 1).ndim == 0
    first = total - len(names) - (1 if last_is_step else 0)
    n = len(shards)
    n_vocab = n * shards[0].leaf(first + names.index((EMBEDDING, "w"))).shape[0]

    def combined(k: int) -> tuple[np.ndarray, str]:
        module, param = names[k]
        expect = _shard_shape(module, param, config, n, n_vocab)
        rule = GLOBAL_RULES.get((module, param)) or LAYER_RULES[(module.rsplit("/~/", 1)[1], param)]
        how = rule[2]
        values = [shards[0].leaf(first + k)] if how == FIRST else [s.leaf(first + k) for s in shards]
        for s, v in zip(shards, values, strict=False):
            if v.shape != expect:
                raise InteropError(
                    f"{s.directory}: {module}/{param} has shape {v.shape}, but the config "
                    f"(layers={config.layers}, d_model={config.d_model}) with {n} shards expects {expect}; "
                    "is it the checkpoint's config?"
                )
        if how == FIRST:
            return values[0], how
        if how == SUM:
            return np.sum(values, axis=0), how
        return np.concatenate(values, axis=-1 if how == CONCAT_OUT else 0), how

    position = {name: k for k, name in enumerate(names)}
    params: dict[str, dict[str, Any]] = {}

    fit = vocab_fitter(config.n_vocab, step_dir)

    def put(module: str, param: str, value: np.ndarray) -> None:
        value = fit(module, param, value)
        params.setdefault(module, {})[param] = _place(value, _target_leaf(target, module, param))

    embeddings = combined(position[(EMBEDDING, "w")])[0] + combined(position[(EMBEDDING, "b")])[0]
    put("gptj", "embeddings", embeddings)
    del embeddings
    for (module, param), (ours, our_param, _) in GLOBAL_RULES.items():
        if module != EMBEDDING:
            put(ours, our_param, combined(position[(module, param)])[0])
    for (linear, param), (ours, our_param, _) in LAYER_RULES.items():
        stacked = None
        for k in range(config.layers):
            value = combined(position[(f"{ROOT}layer_{k}/~/{linear}", param)])[0]
            if stacked is None:
                stacked = np.empty((config.layers, *value.shape), np.float32)
            stacked[k] = value
        put(LAYERS + ours, our_param, stacked)
    return params
