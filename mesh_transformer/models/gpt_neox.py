"""GPT-NeoX and the Pythia suite, bit-compatible with Hugging Face `GPTNeoXForCausalLM`.

Each block has two LayerNorms: with `use_parallel_residual` (Pythia, GPT-NeoX-20B) `x + Attn(LN1(x)) +
MLP(LN2(x))`, without it `y = x + Attn(LN1(x))`, then `y + MLP(LN2(y))`. q, k and v come from one fused
projection `query_key_value` whose output is laid out per head - (heads, 3, head_dim), not [Q | K | V] - as
Hugging Face stores it, so that a head's q, k and v stay on one device when heads split over `mp`. Rotary
embeddings in the rotate-half layout on the first int(head_dim * rotary_pct) dims of each head, with base
`rotary_emb_base`. The MLP is `intermediate_size` (`d_ff`) wide; the LM head `embed_out` has no bias and is
untied unless `tie_word_embeddings`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import haiku as hk
import jax.numpy as jnp

from mesh_transformer.errors import InteropError
from mesh_transformer.models import HFNames, Model
from mesh_transformer.models import layers as L
from mesh_transformer.sharding import constrain

ROOT = "gpt_neox"
ROTARY_INTERLEAVED = False  # NeoX rotates halves (GPT-J interleaves: a test's negative control)

PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^gpt_neox/embed_in$", ("vocab", "embed")),
    (r"^gpt_neox/layers/block/(input|post_attention)_layernorm/(scale|offset)$", ("layers", "embed")),
    # the output dim is (heads, 3, head_dim) flattened: an mp split keeps whole heads' q, k, v together
    (r"^gpt_neox/layers/block/query_key_value/w$", ("layers", "embed", "heads")),
    (r"^gpt_neox/layers/block/query_key_value/b$", ("layers", "heads")),
    (r"^gpt_neox/layers/block/dense/w$", ("layers", "heads", "embed")),
    (r"^gpt_neox/layers/block/dense/b$", ("layers", "embed")),
    (r"^gpt_neox/layers/block/dense_h_to_4h/w$", ("layers", "embed", "mlp")),
    (r"^gpt_neox/layers/block/dense_h_to_4h/b$", ("layers", "mlp")),
    (r"^gpt_neox/layers/block/dense_4h_to_h/w$", ("layers", "mlp", "embed")),
    (r"^gpt_neox/layers/block/dense_4h_to_h/b$", ("layers", "embed")),
    (r"^gpt_neox/final_layer_norm/(scale|offset)$", ("embed",)),
    (r"^gpt_neox/embed_out/w$", ("embed", "vocab")),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeoX(Model):
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = True

    architecture: ClassVar[str] = "gpt_neox"
    root: ClassVar[str] = ROOT
    hf_model_type: ClassVar[str] = "gpt_neox"
    hf_class: ClassVar[str] = "GPTNeoXForCausalLM"
    config_defaults: ClassVar[dict[str, Any]] = {
        "pe": "rotary",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000.0,
        "use_parallel_residual": True,
        "d_ff": lambda c: 4 * c.d_model,
        "activation": "gelu",
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": True,
    }
    param_axes: ClassVar[list] = PARAM_AXES
    lora_targets: ClassVar[dict[str, str]] = {
        "query_key_value": "query_key_value",
        "dense": "dense",
        "dense_h_to_4h": "dense_h_to_4h",
        "dense_4h_to_h": "dense_4h_to_h",
    }
    lora_default_targets: ClassVar[tuple[str, ...]] = ("query_key_value",)

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)  # as Hugging Face computes it

    @classmethod
    def check_config(cls, c: Any) -> None:
        from mesh_transformer.config import ConfigError

        if c.pe != "rotary":
            raise ConfigError(f"config key 'pe' must be \"rotary\" (GPT-NeoX), got {c.pe!r}")
        dims = int(c.head_dim * c.rotary_pct)
        if not 0 < c.rotary_pct <= 1 or dims == 0 or dims % 2:
            raise ConfigError(
                f"config key 'rotary_pct' ({c.rotary_pct}) must be in (0, 1] and rotate a positive even "
                f"number of each head's {c.head_dim} dims (int(head_dim * rotary_pct) = {dims})"
            )
        if c.rotary_emb_base <= 0:
            raise ConfigError(f"config key 'rotary_emb_base' must be positive, got {c.rotary_emb_base}")

    # ----- the forward pass -----

    def forward(self, tokens_BT, cache=None, segment_ids_BT=None):
        return Transformer(self, name=ROOT)(tokens_BT, cache, segment_ids_BT)

    # ----- Hugging Face -----

    def hf_names(self) -> tuple[HFNames, HFNames]:
        global_names: HFNames = {
            (ROOT, "embed_in"): ("gpt_neox.embed_in.weight", False),
            (f"{ROOT}/final_layer_norm", "scale"): ("gpt_neox.final_layer_norm.weight", False),
            (f"{ROOT}/final_layer_norm", "offset"): ("gpt_neox.final_layer_norm.bias", False),
        }
        if not self.tie_word_embeddings:  # the file's name; transformers 5 calls it lm_head once loaded
            global_names[(f"{ROOT}/embed_out", "w")] = ("embed_out.weight", True)
        layer = "gpt_neox.layers.{i}."
        layer_names: HFNames = {
            ("input_layernorm", "scale"): (layer + "input_layernorm.weight", False),
            ("input_layernorm", "offset"): (layer + "input_layernorm.bias", False),
            ("post_attention_layernorm", "scale"): (layer + "post_attention_layernorm.weight", False),
            ("post_attention_layernorm", "offset"): (layer + "post_attention_layernorm.bias", False),
            ("query_key_value", "w"): (layer + "attention.query_key_value.weight", True),
            ("dense", "w"): (layer + "attention.dense.weight", True),
            ("dense_h_to_4h", "w"): (layer + "mlp.dense_h_to_4h.weight", True),
            ("dense_h_to_4h", "b"): (layer + "mlp.dense_h_to_4h.bias", False),
            ("dense_4h_to_h", "w"): (layer + "mlp.dense_4h_to_h.weight", True),
            ("dense_4h_to_h", "b"): (layer + "mlp.dense_4h_to_h.bias", False),
        }
        if self.attention_bias:
            layer_names[("query_key_value", "b")] = (layer + "attention.query_key_value.bias", False)
            layer_names[("dense", "b")] = (layer + "attention.dense.bias", False)
        return global_names, layer_names

    def hf_config(self, seq: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
        return {
            "architectures": [self.hf_class],
            "model_type": self.hf_model_type,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.d_ff,
            "hidden_act": self.activation,
            # the rotary settings as transformers 5 reads them, and as older versions (and the Hub) name them
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct,
            },
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "max_position_embeddings": seq,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.n_vocab,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def config_from_hf(cls, hf: dict, source: str) -> dict[str, tuple[Any, str]]:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise InteropError(
                f"{source}: rope_parameters {rope!r}: only the default rotary embedding is supported"
            )

        def rotary(new: str, old: str, default: float) -> tuple[Any, str]:
            if new in rope:
                return rope[new], f"rope_parameters.{new}"
            return hf.get(old, default), old

        if hf.get("hidden_act", "gelu") not in L.ACTIVATIONS:
            raise InteropError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
        return {
            "layers": (hf.get("num_hidden_layers", 44), "num_hidden_layers"),
            "d_model": (hf.get("hidden_size", 6144), "hidden_size"),
            "n_heads": (hf.get("num_attention_heads", 64), "num_attention_heads"),
            "d_ff": (hf.get("intermediate_size", 24576), "intermediate_size"),
            "rotary_pct": rotary("partial_rotary_factor", "rotary_pct", 0.25),
            "rotary_emb_base": rotary("rope_theta", "rotary_emb_base", 10000.0),
            "use_parallel_residual": (hf.get("use_parallel_residual", True), "use_parallel_residual"),
            "activation": (hf.get("hidden_act", "gelu"), "hidden_act"),
            "layer_norm_eps": (hf.get("layer_norm_eps", 1e-5), "layer_norm_eps"),
            "tie_word_embeddings": (hf.get("tie_word_embeddings", False), "tie_word_embeddings"),
            "attention_bias": (hf.get("attention_bias", True), "attention_bias"),
        }

    @classmethod
    def hf_context(cls, hf: dict) -> int:
        return hf.get("max_position_embeddings", 2048)

    # ----- FLOPs and memory -----

    def lookup_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.n_vocab * self.d_model  # a tied table is the LM head

    def layer_activation_bytes(self, batch: int, seq: int, mp: int, act_bytes: int) -> int:
        return L.block_activation_bytes(
            batch=batch, seq=seq, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, mp=mp,
            act=act_bytes, norms=2,
        )  # fmt: skip


class Block(hk.Module):
    """One GPT-NeoX layer: attention and MLP, each behind its own LayerNorm, in parallel or in sequence."""

    def __init__(self, m: GPTNeoX, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, x_BTD, sin_TR, cos_TR, mask, cache: L.LayerCache | None = None):
        m = self.m
        small = math.sqrt(2.0 / (5 * m.d_model))  # GPT-NeoX's "small_init" and "wang_init"
        out_std = 2.0 / (m.layers * math.sqrt(m.d_model))
        dense = lambda d, std, bias, name: L.Dense(d, stddev=std, bias=bias, dtype=m.compute_dtype, name=name)  # noqa: E731
        rotary = L.Rotary(m.rotary_dims, m.rotary_emb_base, ROTARY_INTERLEAVED)
        B, T, D = x_BTD.shape
        K = m.head_dim

        h_BTD = L.layer_norm("input_layernorm", m.layer_norm_eps)(x_BTD)
        qkv_BTD3 = dense(3 * D, small, m.attention_bias, "query_key_value")(h_BTD)
        qkv_BTH3K = constrain(qkv_BTD3.reshape(B, T, m.n_heads, 3 * K), ("batch", "seq", "heads", None))
        q_BTHK, k_BTHK, v_BTHK = (
            qkv_BTH3K[..., i * K : (i + 1) * K] for i in range(3)
        )  # per head: q | k | v
        q_BTHK = rotary.apply(q_BTHK, sin_TR, cos_TR)
        k_BTHK = rotary.apply(k_BTHK, sin_TR, cos_TR)
        attn_BTD, cache = L.attention(
            q_BTHK, k_BTHK, v_BTHK, mask, scale=True, dtype=m.compute_dtype, cache=cache
        )
        attn_BTD = dense(D, out_std, m.attention_bias, "dense")(attn_BTD)

        def mlp(y_BTD):
            y_BTD = L.layer_norm("post_attention_layernorm", m.layer_norm_eps)(y_BTD)
            ff_BTF = dense(m.d_ff, small, True, "dense_h_to_4h")(y_BTD)
            ff_BTF = constrain(L.ACTIVATIONS[m.activation](ff_BTF), ("batch", "seq", "mlp"))
            return dense(D, out_std, True, "dense_4h_to_h")(ff_BTF)

        if m.use_parallel_residual:
            x_BTD = x_BTD + attn_BTD + mlp(x_BTD)
        else:
            x_BTD = x_BTD + attn_BTD
            x_BTD = x_BTD + mlp(x_BTD)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        return x_BTD if cache is None else (x_BTD, cache)


class Transformer(hk.Module):
    """Token ids -> logits: embed_in, the blocks (stacked, or unrolled over a KV cache), final LayerNorm,
    embed_out (or the tied embed_in)."""

    def __init__(self, m: GPTNeoX, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, tokens_BT, cache: L.KVCache | None, segment_ids_BT):
        m = self.m
        small = math.sqrt(2.0 / (5 * m.d_model))
        embed_VD = constrain(L.table("embed_in", m.n_vocab, m.d_model, small), ("vocab", "embed"))
        x_BTD = constrain(jnp.take(embed_VD, tokens_BT, axis=0), ("batch", "seq", "embed"))
        rotary = L.Rotary(m.rotary_dims, m.rotary_emb_base, ROTARY_INTERLEAVED)
        block = lambda name: Block(m, name=name)  # noqa: E731
        x_BTD, cache = L.rotary_layers(block, rotary, x_BTD, m.layers, m.remat, cache, segment_ids_BT)

        x_BTD = L.layer_norm("final_layer_norm", m.layer_norm_eps)(x_BTD)
        if m.tie_word_embeddings:
            logits_BTV = L.unembed(x_BTD, embed_VD, m.compute_dtype)
        else:
            logits_BTV = L.Dense(
                m.n_vocab, stddev=small, bias=False, dtype=m.compute_dtype, name="embed_out"
            )(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "seq", "vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)
