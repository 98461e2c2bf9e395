"""LoRA fine-tuning for every architecture of the family, in one place: low-rank adapters on the projections a
config's `lora_targets` names, a frozen base, and PEFT adapter folders in and out.

The adapters are a side path of the `Dense` projections they adapt, added by intercepting `Dense.__call__`
(the layers stay as they are): y = x @ W + (lora_alpha / lora_rank) * (x @ A) @ B, A (in, r) and B (r, out)
Haiku params `lora_a` / `lora_b` of the adapted module, stacked over layers like W, so W is never copied. A
starts as PEFT's (uniform in +-1/sqrt(in)), B as zeros: step 0 computes the base model exactly.

A LoRA train state holds base and adapters in one params tree (evaluation, scoring and sampling read it like
any other); `LoraTrainer` differentiates and optimizes the adapters only (no gradients, no Adam moments for
the base), keeps the base's matmul weights in the compute dtype, and saves only the adapters and their
optimizer state, with what identifies the base (its path and the sha256 of its float32 values), which resume
checks. Sampling and the Hugging Face export merge W + scale * A @ B into the stored layout; `write_peft` and
`read_peft` convert to and from the folders `peft.PeftModel.from_pretrained` reads.

Sharding: A splits its input dim like W's input dim and B its output dim like W's output dim (the rank dim is
never split), so a LoRA run works on every (dp, mp) mesh that the base's partition rules do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from mesh_transformer import storage
from mesh_transformer.checkpoint import CheckpointError
from mesh_transformer.config import Config
from mesh_transformer.errors import InteropError
from mesh_transformer.models import Model, model_for
from mesh_transformer.models import layers as L
from mesh_transformer.train import Trainer, TrainState

ADAPTERS = ("lora_a", "lora_b")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts: rank, alpha and the targets (names of `Model.lora_targets`)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def modules(self, model: Model) -> dict[str, str]:
        """Stacked module ("gptj/layers/block/q_proj") -> target name, for every adapted projection."""
        return {f"{model.root}/{L.STACK}{model.lora_targets[t]}": t for t in self.targets}

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def spec_for(config: Config) -> LoraSpec | None:
    if not config.lora_rank:
        return None
    return LoraSpec(
        config.lora_rank, float(config.lora_alpha), in_order(model_for(config), config.lora_targets)
    )


def in_order(model: Model, targets) -> tuple[str, ...]:
    """Targets in the architecture's order (`Model.lora_targets`), whatever order they were named in."""
    return tuple(t for t in model.lora_targets if t in targets)


# ----- the side path -----


def _interceptor(model: Model, spec: LoraSpec, stored_layout: bool):
    # Inside the layer stack (a lifted scan) a layer's modules are named relative to it: "block/q_proj".
    block = L.STACK.rstrip("/").rsplit("/", 1)[-1]
    adapted = {f"{block}/{model.lora_targets[t]}" for t in spec.targets}

    def intercept(next_f, args, kwargs, context):
        dense = context.module
        if not (isinstance(dense, L.Dense) and context.method_name == "__call__"):
            return next_f(*args, **kwargs)
        name = "/".join(dense.module_name.split("/")[-2:])
        if not name.startswith(f"{block}/"):  # outside the layer stack (the LM head)
            return next_f(*args, **kwargs)
        with hk.custom_getter(_stored_layout) if stored_layout else contextlib.nullcontext():
            y = next_f(*args, **kwargs)
        if name not in adapted:
            return y
        x = args[0]
        d_in, bound = x.shape[-1], 1.0 / math.sqrt(x.shape[-1])
        a_IR = hk.get_parameter(
            "lora_a", (d_in, spec.rank), jnp.float32, init=hk.initializers.RandomUniform(-bound, bound)
        )
        b_RO = hk.get_parameter("lora_b", (spec.rank, dense.d_out), jnp.float32, init=jnp.zeros)
        cd = dense.dtype
        xa = jnp.einsum("...i,ir->...r", x.astype(cd), a_IR.astype(cd), preferred_element_type=jnp.float32)
        xab = jnp.einsum("...r,ro->...o", xa.astype(cd), b_RO.astype(cd), preferred_element_type=jnp.float32)
        return y + spec.scale * xab

    return intercept


def _stored_layout(next_getter, value, context):
    """A custom getter for the frozen weights of the layer stack: each layer's slice in the stored (row-major)
    layout, so that a relayout the compiler wants for a matmul is done one layer at a time inside the layer
    loop. Left free, TPU's layout assignment relaid GPT-J's q, k and v weights once for the whole stack and
    hoisted that copy out of the accumulation loop, where frozen weights are loop-invariant (2.63 GiB of the
    6B step's 17.01 GiB on one v5e chip, which now needs 14.25). Trained weights need no pin: their cast to
    the compute dtype in the loop is a new array of whatever layout the matmul wants. CPU programs go without
    the pin, which cost them speed and saves them nothing (a CPU has no loop-invariant relayout to hoist)."""
    value = next_getter(value)
    return with_layout_constraint(value, Layout(tuple(range(value.ndim))))


@functools.cache
def transformed(model: Model, spec: LoraSpec, stored_layout: bool = False) -> hk.Transformed:
    """(init, apply) of `model` with adapters: `models.build(model)` plus the `lora_a`, `lora_b` params; with
    `stored_layout` (accelerator programs), frozen layer weights read in their stored layout."""

    def forward(tokens_BT, cache=None, segment_ids_BT=None):
        with hk.intercept_methods(_interceptor(model, spec, stored_layout)):
            return model.forward(tokens_BT, cache, segment_ids_BT)

    return hk.transform(forward)


def adapter_axes(path: str, base_axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """Logical axes of an adapter ("root/.../q_proj/lora_a") from those of the weight it adapts (layers,
    in, out): A keeps the input axis, B the output axis."""
    layers, d_in, d_out = base_axes
    return (layers, d_in, None) if path.endswith("/lora_a") else (layers, None, d_out)


# ----- base and adapters -----


def split(params: Any) -> tuple[Any, Any]:
    """(adapters, base) of a params tree."""
    return hk.data_structures.partition(lambda module, name, _: name in ADAPTERS, params)


def join(adapters: Any, base: Any) -> Any:
    return hk.data_structures.merge(base, adapters)


def merged(params: Any, spec: LoraSpec) -> Any:
    """The base params with every adapted W replaced by W + scale * A @ B (float32): the stored layout of
    the model, as sampling and export read it. Host numpy in, host numpy out; device arrays likewise."""
    adapters, base = split(params)
    out = {module: dict(leaves) for module, leaves in base.items()}
    for module, leaves in adapters.items():
        a, b = leaves["lora_a"], leaves["lora_b"]
        f32 = np.float32 if isinstance(a, np.ndarray) else jnp.float32
        out[module]["w"] = out[module]["w"].astype(f32) + spec.scale * (a.astype(f32) @ b.astype(f32))
    return out


def frozen_dtype(name: str, compute_dtype: str) -> Any:
    """The base's matmul weights ("w") in the compute dtype, which `Dense` casts them to anyway (so the
    forward is unchanged); embeddings, biases and norms stay float32 (as `engine` keeps them for sampling)."""
    return jnp.dtype(compute_dtype) if name == "w" else jnp.dtype(jnp.float32)


def params_sha256(params: Any) -> str:
    """The identity of a base: sha256 over every leaf's path, shape and float32 bytes (whatever format it was
    read from: the same weights as a Hugging Face folder or one of our checkpoints hash the same)."""
    digest = hashlib.sha256()
    for module in sorted(params):
        for name in sorted(params[module]):
            value = np.ascontiguousarray(np.asarray(jax.device_get(params[module][name]), np.float32))
            digest.update(f"{module}/{name}{value.shape}".encode())
            digest.update(value.data)
    return digest.hexdigest()


def _absolute(path: str) -> str:
    return path.rstrip("/") if storage.is_gcs(path) else os.path.abspath(path)


def is_peft_folder(path: str) -> bool:
    return storage.path_exists(storage.join(path, PEFT_CONFIG))


def is_fine_tune(path: str) -> bool:
    """Whether `path` is a LoRA fine-tune: one of our LoRA checkpoints or a PEFT folder."""
    return is_peft_folder(path) or lora_info(path) is not None


def lora_info(path: str) -> dict | None:
    """The LoRA identity a checkpoint's extra holds ({"base", "base_sha256", "spec"}), or None when `path`
    is not a LoRA checkpoint (a full or slim checkpoint of ours, a Hugging Face folder, ...)."""
    from mesh_transformer.checkpoint import read_extra

    if is_peft_folder(path):
        return None
    try:
        return read_extra(path).get("lora")
    except CheckpointError:
        return None


# ----- PEFT folders -----


def _peft_modules(model: Model, spec: LoraSpec) -> dict[str, str]:
    """Stacked module -> its Hugging Face module, "{i}" for the layer ("transformer.h.{i}.attn.q_proj")."""
    _, layer_names = model.hf_names()
    out = {}
    for module, target in spec.modules(model).items():
        hf_name, transposed = layer_names[(model.lora_targets[target], "w")]
        assert transposed and hf_name.endswith(".weight"), hf_name
        out[module] = hf_name.removesuffix(".weight")
    return out


def write_peft(
    output_dir: str, adapters: Any, model: Model, spec: LoraSpec, base_model: str | None = None
) -> None:
    """A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) of `adapters` (host or
    device, stacked), loadable with `peft.PeftModel.from_pretrained(base, output_dir)`."""
    from safetensors.numpy import save_file

    from mesh_transformer.hf import _check_output_dir

    _check_output_dir(output_dir)
    names = _peft_modules(model, spec)
    tensors = {}
    for module, hf_module in names.items():
        a_LIR = np.asarray(jax.device_get(adapters[module]["lora_a"]), np.float32)
        b_LRO = np.asarray(jax.device_get(adapters[module]["lora_b"]), np.float32)
        for i in range(model.layers):
            prefix = PEFT_PREFIX + hf_module.format(i=i)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_LIR[i].T)  # torch (r, in)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_LRO[i].T)  # torch (out, r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({hf.rsplit(".", 1)[-1] for hf in names.values()}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(output_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_peft(folder: str, model: Model) -> tuple[Any, LoraSpec, str | None]:
    """(stacked float32 adapters, their spec, the base_model_name_or_path) of a PEFT LoRA folder of this
    architecture; what we cannot represent is one clear error naming the folder."""
    from safetensors.numpy import load

    where = storage.join(folder, PEFT_CONFIG)
    try:
        config = json.loads(storage.read_text(where))
    except ValueError as e:
        raise InteropError(f"{where}: not valid JSON ({e})") from None
    unsupported = {
        "peft_type": "LORA",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
    }
    for key, expected in unsupported.items():
        if config.get(key, expected) != expected:
            raise InteropError(f"{where}: {key} is {config[key]!r}; only {expected!r} is supported")
    wanted = config.get("target_modules") or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    by_hf = {}
    for target in model.lora_targets:
        hf_name = model.hf_names()[1][(model.lora_targets[target], "w")][0].removesuffix(".weight")
        by_hf[hf_name.rsplit(".", 1)[-1]] = target
    unknown = [m for m in wanted if m not in by_hf]
    if unknown or not wanted:
        raise InteropError(
            f"{where}: target_modules {wanted!r} are not all projections of {model.architecture} "
            f"({', '.join(by_hf)})"
        )
    spec = LoraSpec(
        int(config["r"]), float(config["lora_alpha"]), in_order(model, {by_hf[m] for m in wanted})
    )
    tensors = load(storage.read_bytes(storage.join(folder, PEFT_WEIGHTS)))
    adapters: dict[str, dict[str, np.ndarray]] = {}
    for module, hf_module in _peft_modules(model, spec).items():
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            layers = []
            for i in range(model.layers):
                name = f"{PEFT_PREFIX}{hf_module.format(i=i)}.{theirs}.weight"
                if name not in tensors:
                    raise InteropError(f"{folder}/{PEFT_WEIGHTS}: tensor {name} is missing")
                layers.append(np.asarray(tensors[name], np.float32).T)
            adapters.setdefault(module, {})[ours] = np.stack(layers)
    return adapters, spec, config.get("base_model_name_or_path")


# ----- loading a base, with or without adapters -----


def load_base(path: str, config: Config) -> tuple[Any, str, Any]:
    """(float32 host base params, the base's path, the adapters a PEFT folder brings or None) of
    `--tune-model-path`: a base model (ours, Hugging Face, original) or a PEFT folder over one."""
    from mesh_transformer.hf import load_pretrained_params

    adapters = None
    if is_peft_folder(path):
        adapters, spec, base = read_peft(path, model_for(config))
        if spec != spec_for(config) and spec_for(config) is not None:
            raise InteropError(
                f"{path}: holds LoRA {spec.to_json()}, but the config asks for {spec_for(config).to_json()}"
            )
        if not base:
            raise InteropError(f"{path}/{PEFT_CONFIG}: base_model_name_or_path is not set")
        path = base
    return load_pretrained_params(path, config), _absolute(path), adapters


def load_merged(path: str, config: Config) -> Any:
    """The merged float32 host params of a LoRA checkpoint (full or slim, or a model_dir's newest) or of a
    PEFT folder: its base, read again from where the checkpoint says, with W + scale * A @ B."""
    from mesh_transformer.checkpoint import load_params

    model = model_for(config)
    if is_peft_folder(path):
        adapters, spec, base = read_peft(path, model)
        if not base:
            raise InteropError(f"{path}/{PEFT_CONFIG}: base_model_name_or_path is not set")
        base_params, _, _ = load_base(base, config)
        return merged(join(adapters, base_params), spec)
    info = lora_info(path)
    if info is None:
        raise CheckpointError(f"{path}: not a LoRA checkpoint (no LoRA identity in its metadata)")
    spec = LoraSpec(info["spec"]["rank"], info["spec"]["alpha"], tuple(info["spec"]["targets"]))
    base_params, _, _ = load_base(info["base"], config)
    check_base(params_sha256(base_params), info, path, info["base"])
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract_adapters(model, spec, config.seq)
    )
    adapters = jax.tree_util.tree_map(np.asarray, jax.device_get(load_params(path, target)))
    return merged(join(adapters, base_params), spec)


def abstract_adapters(model: Model, spec: LoraSpec, seq: int) -> Any:
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    return split(jax.eval_shape(transformed(model, spec).init, jax.random.PRNGKey(0), tokens))[0]


def adapters_for_hf(path: str, config: Config) -> tuple[Any, LoraSpec, str]:
    """(float32 host adapters, spec, base path) of a LoRA checkpoint, for `to_hf_weights.py --peft`."""
    from mesh_transformer.checkpoint import load_params

    info = lora_info(path)
    if info is None:
        raise CheckpointError(f"{path}: not a LoRA checkpoint (no LoRA identity in its metadata)")
    spec = LoraSpec(info["spec"]["rank"], info["spec"]["alpha"], tuple(info["spec"]["targets"]))
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
        abstract_adapters(model_for(config), spec, config.seq),
    )
    return jax.tree_util.tree_map(np.asarray, jax.device_get(load_params(path, target))), spec, info["base"]


def export_merged(ckpt: str, config: Config, output_dir: str, *, tokenizer: str | None = None, **options):
    """`hf.export_checkpoint` of a LoRA checkpoint: its adapters merged into its base (float32, then cast
    to the export dtype); the run's tokenizer comes along as for any checkpoint."""
    import tempfile

    from mesh_transformer.checkpoint import save_params
    from mesh_transformer.data import find_tokenizer
    from mesh_transformer.hf import _check_output_dir, export_checkpoint

    _check_output_dir(output_dir)
    tokenizer = find_tokenizer(ckpt, config, tokenizer)
    params = jax.device_put(load_merged(ckpt, config), jax.devices("cpu")[0])
    with tempfile.TemporaryDirectory(prefix="lora-merged-") as tmp:
        save_params(os.path.join(tmp, "params"), params)
        del params
        return export_checkpoint(
            os.path.join(tmp, "params"), config, output_dir, tokenizer=tokenizer, **options
        )


def export_peft(ckpt: str, config: Config, output_dir: str) -> str:
    """`to_hf_weights.py --peft`: the adapters of a LoRA checkpoint as a PEFT folder over its base; returns
    the base it names (`base_model_name_or_path`)."""
    adapters, spec, base = adapters_for_hf(ckpt, config)
    write_peft(output_dir, adapters, model_for(config), spec, base_model=base)
    return base


def check_base(digest: str, info: dict, where: str, base_path: str) -> None:
    """One clear line when a base of sha256 `digest` is not the base the LoRA checkpoint at `where` was
    trained on."""
    if digest != info["base_sha256"]:
        raise CheckpointError(
            f"{where}: its LoRA adapters were trained on base {info['base']} "
            f"(sha256 {info['base_sha256'][:16]}), but {base_path} holds other weights "
            f"(sha256 {digest[:16]}); resume with the same base model"
        )


# ----- training -----


class LoraTrainer(Trainer):
    """A `Trainer` that trains adapters over a frozen base (see the module docstring)."""

    def __init__(self, config: Config, mesh: Any):
        self.spec = spec_for(config)
        self.base_identity: dict | None = None  # {"base", "base_sha256"} once a base is loaded
        super().__init__(config, mesh)
        self._jit_start = jax.jit(self._start, out_shardings=self.state_shardings)

    def _transformed(self) -> hk.Transformed:
        return transformed(model_for(self.config), self.spec, stored_layout=not self.on_cpu)

    def split(self, params):
        return split(params)

    def join(self, trained, frozen):
        return join(trained, frozen)

    def _from_params(self, params) -> TrainState:
        adapters, base = split(params)
        base = {
            module: {n: v.astype(frozen_dtype(n, self.config.compute_dtype)) for n, v in leaves.items()}
            for module, leaves in base.items()
        }
        return super()._from_params(join(adapters, base))

    def _start(self, base, adapters, key) -> TrainState:
        """Step 0 over `base`: `adapters` if given (a PEFT folder's), else freshly initialised ones."""
        if adapters is None:
            dummy_BT = jnp.zeros((1, self.config.seq), jnp.int32)
            adapters = split(self.model.init(key, dummy_BT))[0]  # the base's init is dead code
        return self._from_params(join(adapters, base))

    @property
    def _base_target(self) -> Any:
        return split(self.abstract_state.params)[1]

    def _load_base(self, path: str) -> tuple[Any, Any]:
        """(the base on the mesh, in its frozen dtypes; a PEFT folder's adapters or None), identity noted."""
        host, base_path, adapters = load_base(path, self.config)
        self.base_identity = {"base": base_path, "base_sha256": params_sha256(host)}
        placed = jax.tree_util.tree_map(
            lambda x, t: jax.device_put(np.asarray(x).astype(t.dtype), t.sharding), host, self._base_target
        )
        return placed, adapters

    def init_state(self, seed: int) -> TrainState:
        from mesh_transformer.config import ConfigError

        raise ConfigError(
            "lora_rank > 0 fine-tunes a base model: pass --tune-model-path (one of our checkpoints, a "
            "Hugging Face folder, an original Mesh-Transformer-JAX checkpoint or a PEFT adapter folder)"
        )

    def tuned_state(self, tune_model_path: str) -> TrainState:
        base, adapters = self._load_base(tune_model_path)
        return self._jit_start(base, adapters, jax.random.PRNGKey(self.config.seed))

    @property
    def abstract_saved_state(self) -> TrainState:
        return self.saved(self.abstract_state)

    def saved(self, state: TrainState) -> TrainState:
        return TrainState(state.step, split(state.params)[0], state.opt_state)

    def checkpoint_extra(self) -> dict:
        assert self.base_identity is not None, "no base loaded"
        return {"lora": dict(self.base_identity, spec=self.spec.to_json())}

    def resumed(self, saved: TrainState, extra: dict, tune_model_path: str | None) -> TrainState:
        info = extra.get("lora")
        if not isinstance(info, dict):
            raise CheckpointError("the checkpoint to resume holds no LoRA adapters (it is not a LoRA run's)")
        if info.get("spec") != self.spec.to_json():
            raise CheckpointError(
                f"the checkpoint to resume holds LoRA {info.get('spec')}, the config asks for "
                f"{self.spec.to_json()}"
            )
        path = tune_model_path or info["base"]
        base, _ = self._load_base(path)
        check_base(self.base_identity["base_sha256"], info, "the checkpoint to resume", path)
        return TrainState(saved.step, join(saved.params, base), saved.opt_state)

    def servable(self, params):
        return merged(params, self.spec)
