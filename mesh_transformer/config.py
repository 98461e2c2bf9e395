"""Training configuration: the JSON keys of the original Mesh-Transformer-JAX plus a few new ones.

`load_config` reads a JSON file, rejects unknown keys and impossible values with one clear message, and
returns a frozen `Config` in which every key the config's `architecture` reads has its value (the
architecture's default where the file leaves it unset). The original `configs/6B_roto_256.json` loads
unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mesh_transformer.errors import UserError


class ConfigError(UserError):
    """A configuration the user wrote cannot be used; the message names the key and what was expected."""


@dataclass(frozen=True)
class Config:
    # --- model shape (original keys) ---
    layers: int
    d_model: int
    n_heads: int
    n_vocab: int
    seq: int
    norm: str = "layernorm"  # the only normalisation of the family
    pe: str | None = None  # positions: "rotary" (gptj, gpt_neox) or "fixed" (gpt_neo: learned, absolute)
    pe_rotary_dims: int | None = None  # gptj: rotary dims per head (64); the rest gets no position signal

    # --- the model family: which architecture, and the keys only some architectures read. Unset (null)
    # means the architecture's default (`config_defaults` in mesh_transformer/models/<architecture>.py);
    # a key the architecture does not read must stay unset. ---
    architecture: str = "gptj"  # "gptj", "gpt_neox" (GPT-NeoX, Pythia) or "gpt_neo"
    d_ff: int | None = None  # MLP width (HF n_inner, intermediate_size); default 4 * d_model
    # MLP activation, by Hugging Face's name: "gelu_new" (tanh approximation; gptj and gpt_neo default),
    # "gelu" (exact erf; gpt_neox default), "gelu_fast", "gelu_pytorch_tanh", "relu", "silu"
    activation: str | None = None
    layer_norm_eps: float | None = None  # epsilon of every LayerNorm (1e-5)
    tie_word_embeddings: bool | None = None  # gpt_neox (false), gpt_neo (true): LM head = the input embedding
    # gpt_neox: the fraction of each head that is rotated, int(head_dim * rotary_pct) dims in the rotate-half
    # layout (Pythia and 20B: 0.25), and the rotary base (10000)
    rotary_pct: float | None = None
    rotary_emb_base: float | None = None
    # gpt_neox: x + attn(ln1(x)) + mlp(ln2(x)) if true (Pythia, 20B), else the MLP after the attention
    use_parallel_residual: bool | None = None
    attention_bias: bool | None = None  # gpt_neox: biases on query_key_value and dense (true)
    # gpt_neo: "global" or "local" for each layer (default: global, local, global, ...); a local layer's
    # token sees the `window_size` newest tokens, itself included (256); `n_positions` rows of the learned
    # position table, at least seq (default: seq; the released models have 2048)
    attention_layers: list[str] | None = None
    window_size: int | None = None
    n_positions: int | None = None

    # --- parallelism and batch (original keys) ---
    cores_per_replica: int = 1  # model-parallel degree (the mesh's `mp` axis)
    tpu_size: int = 1  # total devices; tpu_size / cores_per_replica is the data-parallel degree `dp`
    per_replica_batch: int = 1  # sequences per data-parallel replica per micro-batch
    gradient_accumulation_steps: int = 1

    # --- optimizer and schedule (original keys) ---
    warmup_steps: int = 0
    anneal_steps: int = 1
    lr: float = 1e-4
    end_lr: float = 1e-5
    weight_decay: float = 0.0
    total_steps: int = 1

    # --- data, evaluation, checkpoints, bookkeeping (original keys) ---
    bucket: str = ""
    model_dir: str = ""
    # The data to train on when --data is not given: a prepared dataset dir (or text files, as --data takes),
    # or a mixture {"path/of/dataset": weight, ...} of prepared datasets of one tokenizer, whose batches draw
    # rows from each in proportion to its weight (original: a tfrecords index, which must be replaced).
    train_set: str | dict[str, float] = ""
    val_set: dict[str, str] = field(default_factory=dict)
    eval_harness_tasks: list[str] = field(default_factory=list)
    val_batches: int = 0
    val_every: int = 500
    ckpt_every: int = 500
    keep_every: int = 10000
    name: str = "gptj"
    wandb_project: str = ""
    comment: str = ""

    # --- new keys ---
    seed: int = 0
    compute_dtype: str = "bfloat16"  # dtype of matmul inputs; params, softmax and accumulation stay float32
    remat: str = "layer"  # activation checkpointing: "none" or "layer" (recompute each layer in backward)
    z_loss: float = 1e-4  # coefficient of log(Z)^2 added to the loss, as the original trained with
    keep_n: int = 3  # checkpoints kept besides every `keep_every`-th step
    tokenizer: str = ""  # tokenizer.json for raw-text --data (--tokenizer overrides); none is bundled
    shard_optimizer_over_dp: bool = False  # ZeRO-1: optimizer state also split over the `dp` axis
    shard_params_over_dp: bool = False  # ZeRO-3: params also split over `dp`, gathered per layer
    tensorboard: bool = False  # also write TensorBoard event files to {model_dir}/tensorboard
    # Attention stays inside each document of a packed sequence (split at EOS) and positions restart at each
    # document, so a document is computed as if alone; false (GPT-J's training) attends across documents.
    document_mask: bool = False
    # LoRA fine-tuning (mesh_transformer/lora.py): `lora_rank` > 0 freezes the base model (held in the compute
    # dtype) and trains low-rank adapters W + (lora_alpha / lora_rank) * A @ B on the projections named in
    # `lora_targets` (the architecture's names, `lora_targets` in models/<architecture>.py; unset: its
    # default, q and v). Needs --tune-model-path: the base to adapt.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None

    # ----- derived values -----
    @property
    def mp(self) -> int:
        return self.cores_per_replica

    @property
    def dp(self) -> int:
        return self.tpu_size // self.cores_per_replica

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def global_batch(self) -> int:
        """Sequences in one micro-batch over all replicas."""
        return self.per_replica_batch * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.gradient_accumulation_steps * self.seq

    def replace(self, **changes: Any) -> Config:
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The keys whose meaning (and default) depends on the architecture.
FAMILY_KEYS = (
    "pe",
    "pe_rotary_dims",
    "d_ff",
    "activation",
    "layer_norm_eps",
    "tie_word_embeddings",
    "rotary_pct",
    "rotary_emb_base",
    "use_parallel_residual",
    "attention_bias",
    "attention_layers",
    "window_size",
    "n_positions",
)
_REQUIRED = [
    name
    for name, f in _FIELDS.items()
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]
_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "layer")


def _check_type(key: str, value: Any) -> Any:
    """Values as JSON gives them, checked against the field's declared type (ints accepted as floats)."""
    expected = _FIELDS[key].type
    if expected.endswith(" | None"):
        if value is None:
            return None
        expected = expected.removesuffix(" | None")
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
    elif expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    elif expected == "str | dict[str, float]":
        if isinstance(value, dict):
            weights_ok = all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and w != float("inf")
                for w in value.values()
            )
            if not value or not weights_ok or not all(isinstance(k, str) and k for k in value):
                raise ConfigError(
                    f"config key '{key}' must be a dataset path or a mixture {{path: positive weight}}, "
                    f"got {value!r}"
                )
        elif not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a dataset path or a mixture, got {value!r}")
    elif expected.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"config key '{key}' must be a dict of name -> dataset path, got {value!r}")
    elif expected.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of strings, got {value!r}")
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    values = {k: _check_type(k, v) for k, v in raw.items()}
    return validate(Config(**values))


def _resolve_family_keys(c: Config) -> Config:
    """The architecture's defaults filled in for the keys it reads; a key it does not read must be unset."""
    from mesh_transformer import models

    if c.architecture not in models.ARCHITECTURES:
        raise ConfigError(
            f"config key 'architecture' must be one of {', '.join(models.ARCHITECTURES)}, "
            f"got {c.architecture!r}"
        )
    defaults = models.ARCHITECTURES[c.architecture].config_defaults
    resolved = {}
    for key in FAMILY_KEYS:
        value = getattr(c, key)
        if key not in defaults:
            if value is not None:
                readers = [name for name, cls in models.ARCHITECTURES.items() if key in cls.config_defaults]
                raise ConfigError(
                    f"config key '{key}' does not apply to architecture '{c.architecture}' "
                    f"(only to {', '.join(readers)}); remove it"
                )
        elif value is None:
            default = defaults[key]
            resolved[key] = default(c) if callable(default) else default
    return dataclasses.replace(c, **resolved) if resolved else c


def _check_family_keys(c: Config) -> None:
    """The keys several architectures read; then the architecture's own checks."""
    from mesh_transformer import models
    from mesh_transformer.models.layers import ACTIVATIONS

    if c.d_ff is not None and (c.d_ff <= 0 or c.d_ff % c.cores_per_replica):
        raise ConfigError(
            f"config key 'd_ff' ({c.d_ff}) must be a positive multiple of cores_per_replica "
            f"({c.cores_per_replica})"
        )
    if c.activation is not None and c.activation not in ACTIVATIONS:
        raise ConfigError(
            f"config key 'activation' must be one of {', '.join(ACTIVATIONS)}, got {c.activation!r}"
        )
    if c.layer_norm_eps is not None and not c.layer_norm_eps > 0:
        raise ConfigError(f"config key 'layer_norm_eps' must be positive, got {c.layer_norm_eps}")
    models.ARCHITECTURES[c.architecture].check_config(c)


def validate(c: Config) -> Config:
    positive = [
        "layers",
        "d_model",
        "n_heads",
        "n_vocab",
        "seq",
        "cores_per_replica",
        "tpu_size",
        "per_replica_batch",
        "gradient_accumulation_steps",
        "total_steps",
        "anneal_steps",
        "val_every",
        "ckpt_every",
        "keep_every",
        "keep_n",
    ]
    for key in positive:
        if getattr(c, key) <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {getattr(c, key)}")
    for key in ("warmup_steps", "val_batches"):
        if getattr(c, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(c, key)}")
    for key in ("lr", "end_lr", "weight_decay", "z_loss"):
        if getattr(c, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(c, key)}")
    if c.norm != "layernorm":
        raise ConfigError(f"config key 'norm' must be \"layernorm\", got {c.norm!r}")
    if c.d_model % c.n_heads:
        raise ConfigError(f"d_model ({c.d_model}) must be divisible by n_heads ({c.n_heads})")
    if c.n_heads % c.cores_per_replica:
        raise ConfigError(
            f"n_heads ({c.n_heads}) must be divisible by cores_per_replica ({c.cores_per_replica})"
        )
    if c.n_vocab % c.cores_per_replica:
        raise ConfigError(
            f"n_vocab ({c.n_vocab}) must be divisible by cores_per_replica ({c.cores_per_replica})"
        )
    if c.tpu_size % c.cores_per_replica:
        raise ConfigError(
            f"tpu_size ({c.tpu_size}) must be divisible by cores_per_replica ({c.cores_per_replica})"
        )
    if c.compute_dtype not in _DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(_DTYPES)}, got {c.compute_dtype!r}")
    if c.remat not in _REMAT:
        raise ConfigError(f"remat must be one of {', '.join(_REMAT)}, got {c.remat!r}")
    if c.shard_params_over_dp and not c.shard_optimizer_over_dp:
        raise ConfigError("shard_params_over_dp requires shard_optimizer_over_dp")
    if (c.shard_optimizer_over_dp or c.shard_params_over_dp) and c.d_model % c.dp:
        raise ConfigError(
            f"shard_optimizer_over_dp / shard_params_over_dp split d_model over dp = tpu_size / "
            f"cores_per_replica, so d_model ({c.d_model}) must be divisible by dp ({c.dp})"
        )
    c = _resolve_family_keys(c)
    _check_family_keys(c)
    return _check_lora_keys(c)


def _check_lora_keys(c: Config) -> Config:
    """lora_rank >= 0, a positive lora_alpha, targets the architecture has (its default filled in)."""
    from mesh_transformer import models

    if c.lora_rank < 0:
        raise ConfigError(f"config key 'lora_rank' must be >= 0 (0 = no LoRA), got {c.lora_rank}")
    if not c.lora_alpha > 0:
        raise ConfigError(f"config key 'lora_alpha' must be positive, got {c.lora_alpha}")
    if c.lora_rank == 0:
        if c.lora_targets is not None:
            raise ConfigError("config key 'lora_targets' needs lora_rank > 0; remove it or set lora_rank")
        return c
    arch = models.ARCHITECTURES[c.architecture]
    if c.lora_targets is None:
        return dataclasses.replace(c, lora_targets=list(arch.lora_default_targets))
    unknown = [t for t in c.lora_targets if t not in arch.lora_targets]
    if unknown or not c.lora_targets or len(set(c.lora_targets)) != len(c.lora_targets):
        raise ConfigError(
            f"config key 'lora_targets' must be distinct names of {c.architecture}'s projections "
            f"({', '.join(arch.lora_targets)}), got {c.lora_targets!r}"
        )
    return c


def load_config(path: str, **overrides: Any) -> Config:
    """Read a JSON config (local or gs://); `overrides` (command-line values such as tpu_size) replace its
    keys."""
    from mesh_transformer import storage

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (storage.StorageError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(raw)


def check_device_count(c: Config, device_count: int) -> None:
    if device_count != c.tpu_size:
        raise ConfigError(
            f"the config's tpu_size is {c.tpu_size} but {device_count} devices are available "
            f"(pass --tpu-size {device_count} to override)"
        )
