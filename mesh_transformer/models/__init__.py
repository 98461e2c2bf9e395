"""The model family behind one interface: a registry from a config's `architecture` to the `Model` subclass
of that architecture, one file each (gptj.py, gpt_neox.py, gpt_neo.py), and what every architecture provides.

The train step, sharding, checkpoints, sampling and serving, evaluation, AOT compilation, the memory estimate,
MFU and the Hugging Face import/export reach an architecture only through `model_for(config)` and the methods
of `Model`; none of them asks which architecture it holds. A fourth architecture is one new file (a `Model`
subclass: its forward pass for training and decoding, partition rules, Hugging Face names and config mapping,
FLOPs and memory figures) registered in `ARCHITECTURES`, and its tests.

Parameter layouts, in one place per architecture: the *stored* layout (what `init` creates, checkpoints save
and the Hugging Face maps read: layers stacked under `{root}/layers/block/`) and the *decoding* layout derived
from it by `Model.decode_layout` (one array per layer, and whatever projections decoding reads fused).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.models.layers import STACK, KVCache, unstack_layers

__all__ = ["ARCHITECTURES", "KVCache", "Model", "build", "model_for", "param_count"]

# (our module, our param) -> (Hugging Face tensor name, transposed?); a layer's module is relative to the
# stack and its name holds {i} for the layer's index. Torch linears are [out, in], our `w` [in, out].
HFNames = dict[tuple[str, str], tuple[str, bool]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model(abc.ABC):
    """The hyper-parameters of one model of one architecture. Frozen and hashable: jitted functions take it as
    a static argument. Each architecture adds its own fields and implements the abstract methods."""

    layers: int
    d_model: int
    n_heads: int
    n_vocab: int
    d_ff: int
    compute_dtype: str = "float32"  # dtype of matmul inputs; params, softmax, LayerNorm, accumulation float32
    remat: str = "none"  # "layer": recompute each layer's activations in the backward pass

    architecture: ClassVar[str]  # the config's "architecture" value
    root: ClassVar[str]  # Haiku scope of every parameter
    hf_model_type: ClassVar[str]  # config.json's model_type
    hf_class: ClassVar[str]  # config.json's architectures[0]
    # Config keys of the family section that this architecture reads, with its defaults (config.py declares
    # and documents them; a key another architecture reads must stay unset).
    config_defaults: ClassVar[dict[str, Any]]
    # The partition rules: a regex on "module/param" -> logical axes of the array ("layers" first if stacked).
    param_axes: ClassVar[list[tuple[str, tuple[str | None, ...]]]]
    # LoRA (mesh_transformer/lora.py): the config's `lora_targets` names -> the layer's `Dense` module each
    # adapts (relative to the stack; its Hugging Face name, from `hf_names`, gives PEFT's target_modules),
    # and the targets of a config that names none.
    lora_targets: ClassVar[dict[str, str]]
    lora_default_targets: ClassVar[tuple[str, ...]]
    # Fields whose config key has another name: field -> key (see `from_config`).
    config_keys: ClassVar[dict[str, str]] = {}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # ----- config -----

    @classmethod
    def from_config(cls, config: Any) -> Model:
        """The model a validated `Config` describes: each field is the config key of its name, or of the name
        `config_keys` gives it; lists become tuples, so that the model stays hashable."""

        def value(field: str) -> Any:
            v = getattr(config, cls.config_keys.get(field, field))
            return tuple(v) if isinstance(v, list) else v

        return cls(**{f.name: value(f.name) for f in dataclasses.fields(cls)})

    @classmethod
    @abc.abstractmethod
    def check_config(cls, config: Any) -> None:
        """Raise `ConfigError` (one line naming the key) for values this architecture cannot use."""

    # ----- the forward pass -----

    @abc.abstractmethod
    def forward(
        self, tokens_BT: jax.Array, cache: KVCache | None = None, segment_ids_BT: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Inside `hk.transform`: token ids (B, T) -> float32 logits (B, T, V); with `segment_ids_BT`,
        attention stays inside each document and positions restart there. With a `KVCache` (params in the
        decoding layout): the T tokens continue each row's cached context -> (logits, the cache holding them
        too)."""

    def transformed(self) -> hk.Transformed:
        return hk.transform(
            lambda tokens_BT, cache=None, segment_ids_BT=None: self.forward(tokens_BT, cache, segment_ids_BT)
        )

    def decode_layout(self, params: Any) -> Any:
        """The params as decoding (a `KVCache` given) reads them, derived from the stored layout: here one
        array per layer; an architecture that fuses projections for decoding adds that."""
        return unstack_layers(params, self.root, self.layers)

    def abstract_params(self, seq: int = 8) -> Any:
        """Shapes and dtypes of the stored params, by tracing only."""
        tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
        return jax.eval_shape(self.transformed().init, jax.random.PRNGKey(0), tokens)

    # ----- Hugging Face -----

    @abc.abstractmethod
    def hf_names(self) -> tuple[HFNames, HFNames]:
        """(the global tensors, one layer's tensors): our (module, param) -> (HF name, transposed?), in the
        order the HF state dict lists them."""

    @abc.abstractmethod
    def hf_config(self, seq: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
        """config.json of the equivalent Hugging Face model."""

    @classmethod
    @abc.abstractmethod
    def config_from_hf(cls, hf: dict, source: str) -> dict[str, tuple[Any, str]]:
        """Our config keys from a Hugging Face config.json (its defaults where a key is missing), each as
        (value, the HF key it came from); a value we cannot represent raises `InteropError` naming `source`.
        Shapes (layers, d_model, n_heads) included; the vocabulary and the context are not."""

    @classmethod
    @abc.abstractmethod
    def hf_context(cls, hf: dict) -> int:
        """The context length a Hugging Face config.json declares."""

    # ----- FLOPs and memory -----

    def lookup_params(self) -> int:
        """Params used only as table lookups (not in any matmul): an untied input embedding, learned
        positions."""
        return self.n_vocab * self.d_model

    def matmul_params(self) -> int:
        """N of MFU's 6N: every param that takes part in a matmul."""
        return param_count(self.abstract_params()) - self.lookup_params()

    def attended_keys(self, seq: int) -> float:
        """Keys a query attends to, averaged over a sequence and the layers: T / 2 for causal attention."""
        return seq / 2

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs (forward + backward) per trained token (PaLM appendix B): 6 N for the matmuls of the
        params, plus per layer 12 * D * (keys attended) for QK^T and AV (2 * 2 * D per key forward, times 3
        for forward + backward) - 6 * L * D * T for causal attention over T tokens."""
        return 6.0 * self.matmul_params() + 12.0 * self.layers * self.d_model * self.attended_keys(seq)

    @abc.abstractmethod
    def layer_activation_bytes(self, batch: int, seq: int, mp: int, act_bytes: int) -> int:
        """Bytes one layer's forward keeps for its backward on one device (batch rows, heads, mlp and vocab
        split over mp, activations of `act_bytes` bytes): what the memory estimate multiplies by layers."""


def param_count(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def is_stacked(module: str) -> bool:
    """Whether a param of this module carries a leading layers axis (stored layout)."""
    return module.split("/", 1)[-1].startswith(STACK)


def _registry() -> dict[str, type[Model]]:
    from mesh_transformer.models.gpt_neo import GPTNeo
    from mesh_transformer.models.gpt_neox import GPTNeoX
    from mesh_transformer.models.gptj import GPTJ

    return {cls.architecture: cls for cls in (GPTJ, GPTNeoX, GPTNeo)}


ARCHITECTURES: dict[str, type[Model]] = _registry()


def for_hf_model_type(model_type: Any, source: str) -> type[Model]:
    """The architecture of a Hugging Face config.json's model_type; another one is one clear error."""
    from mesh_transformer.errors import InteropError

    for cls in ARCHITECTURES.values():
        if cls.hf_model_type == model_type:
            return cls
    known = ", ".join(repr(cls.hf_model_type) for cls in ARCHITECTURES.values())
    raise InteropError(f"{source}: model_type is {model_type!r}, not one of the family ({known})")


def model_for(config: Any) -> Model:
    """The model of a validated `Config`."""
    return ARCHITECTURES[config.architecture].from_config(config)


@functools.cache
def build(model: Model) -> hk.Transformed:
    """Pure (init, apply) of a model: apply(params, None, tokens_BT) -> logits_BTV (pass segment_ids_BT= for
    packed documents), apply(model.decode_layout(params), None, tokens_BT, cache) -> (logits_BTV, cache)."""
    return model.transformed()


def all_param_axes() -> list[tuple[str, tuple[str | None, ...]]]:
    """Every architecture's partition rules (their roots differ: no rule of one matches another's params)."""
    return [rule for cls in ARCHITECTURES.values() for rule in cls.param_axes]
