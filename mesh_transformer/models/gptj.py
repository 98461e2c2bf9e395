"""GPT-J, bit-compatible with Hugging Face `GPTJForCausalLM` and with Mesh-Transformer-JAX checkpoints.

Each block is `x + Attn(LN(x)) + MLP(LN(x))`: one LayerNorm feeds attention and the MLP in parallel. q, k, v
and the attention output have no bias; rotary embeddings in the interleaved layout on the first
`pe_rotary_dims` dims of each head; an untied LM head with a bias. Decoding reads q, k and v as one fused
matmul (`QKV`), stacked from the stored q/v/k weights by `decode_layout`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import haiku as hk
import jax

from mesh_transformer.errors import InteropError
from mesh_transformer.models import HFNames, Model
from mesh_transformer.models import layers as L
from mesh_transformer.sharding import constrain

ROOT = "gptj"
ROTARY_INTERLEAVED = True  # GPT-J's rotary layout (GPT-NeoX rotates halves: a test's negative control)
# Created in this order (q, v, k), as in the original's checkpoints; decoding reads them fused.
QKV = L.Fused("qkv_proj", ("q_proj", "v_proj", "k_proj"))

PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^gptj/embeddings$", ("vocab", "embed")),
    (r"^gptj/layers/block/ln_1/(scale|offset)$", ("layers", "embed")),
    (r"^gptj/layers/block/(q_proj|k_proj|v_proj)/w$", ("layers", "embed", "heads")),
    (r"^gptj/layers/block/qkv_proj/w$", ("layers", "embed", None, "heads")),  # decoding's fused q, v, k
    (r"^gptj/layers/block/out_proj/w$", ("layers", "heads", "embed")),
    (r"^gptj/layers/block/fc_in/w$", ("layers", "embed", "mlp")),
    (r"^gptj/layers/block/fc_in/b$", ("layers", "mlp")),
    (r"^gptj/layers/block/fc_out/w$", ("layers", "mlp", "embed")),
    (r"^gptj/layers/block/fc_out/b$", ("layers", "embed")),
    (r"^gptj/ln_f/(scale|offset)$", ("embed",)),
    (r"^gptj/lm_head/w$", ("embed", "vocab")),
    (r"^gptj/lm_head/b$", ("vocab",)),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTJ(Model):
    rotary_dims: int  # rotary on the first dims of each head; the rest of the head gets no position signal
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5

    architecture: ClassVar[str] = "gptj"
    root: ClassVar[str] = ROOT
    hf_model_type: ClassVar[str] = "gptj"
    hf_class: ClassVar[str] = "GPTJForCausalLM"
    config_defaults: ClassVar[dict[str, Any]] = {
        "pe": "rotary",
        "pe_rotary_dims": 64,
        "d_ff": lambda c: 4 * c.d_model,
        "activation": "gelu_new",
        "layer_norm_eps": 1e-5,
    }
    param_axes: ClassVar[list] = PARAM_AXES
    lora_targets: ClassVar[dict[str, str]] = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "out": "out_proj",
        "fc_in": "fc_in",
        "fc_out": "fc_out",
    }
    lora_default_targets: ClassVar[tuple[str, ...]] = ("q", "v")
    config_keys: ClassVar[dict[str, str]] = {"rotary_dims": "pe_rotary_dims"}

    @classmethod
    def check_config(cls, c: Any) -> None:
        from mesh_transformer.config import ConfigError

        if c.pe != "rotary":
            raise ConfigError(f"config key 'pe' must be \"rotary\" (GPT-J), got {c.pe!r}")
        if c.pe_rotary_dims <= 0 or c.pe_rotary_dims % 2:
            raise ConfigError(f"pe_rotary_dims must be a positive even number, got {c.pe_rotary_dims}")
        if c.pe_rotary_dims > c.head_dim:
            raise ConfigError(
                f"pe_rotary_dims ({c.pe_rotary_dims}) must not exceed the head dimension "
                f"d_model / n_heads = {c.head_dim}"
            )

    # ----- the forward pass -----

    def forward(self, tokens_BT, cache=None, segment_ids_BT=None):
        return Transformer(self, name=ROOT)(tokens_BT, cache, segment_ids_BT)

    def decode_layout(self, params: Any) -> Any:
        """One array per layer, and each layer's q, v, k weights stacked into one (D, 3, D) "qkv_proj"."""
        return L.fuse(super().decode_layout(params), ROOT, self.layers, QKV)

    # ----- Hugging Face -----

    def hf_names(self) -> tuple[HFNames, HFNames]:
        return GLOBAL_NAMES, LAYER_NAMES

    def hf_config(self, seq: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
        return {
            "architectures": [self.hf_class],
            "model_type": self.hf_model_type,
            "n_embd": self.d_model,
            "n_head": self.n_heads,
            "n_layer": self.layers,
            "n_positions": seq,
            "n_inner": None if self.d_ff == 4 * self.d_model else self.d_ff,
            "rotary_dim": self.rotary_dims,
            "vocab_size": self.n_vocab,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": self.activation,
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

    @classmethod
    def config_from_hf(cls, hf: dict, source: str) -> dict[str, tuple[Any, str]]:
        d_model, n_heads = hf.get("n_embd", 4096), hf.get("n_head", 16)
        if hf.get("tie_word_embeddings") not in (False, None):
            raise InteropError(
                f"{source}: tie_word_embeddings is {hf['tie_word_embeddings']!r}; "
                "this GPT-J supports only False"
            )
        if hf.get("activation_function", "gelu_new") not in L.ACTIVATIONS:
            raise InteropError(
                f"{source}: activation_function {hf['activation_function']!r} is not supported"
            )
        rotary = hf.get("rotary_dim")
        inner = hf.get("n_inner")
        return {
            "layers": (hf.get("n_layer", 28), "n_layer"),
            "d_model": (d_model, "n_embd"),
            "n_heads": (n_heads, "n_head"),
            # HF: rotary over the whole head without a rotary_dim; 4 * n_embd without n_inner
            "pe_rotary_dims": (d_model // max(n_heads, 1) if rotary is None else rotary, "rotary_dim"),
            "d_ff": (4 * d_model if inner is None else inner, "n_inner"),
            "activation": (hf.get("activation_function", "gelu_new"), "activation_function"),
            "layer_norm_eps": (hf.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
        }

    @classmethod
    def hf_context(cls, hf: dict) -> int:
        return hf.get("n_positions", 2048)

    # ----- FLOPs and memory -----

    def layer_activation_bytes(self, batch: int, seq: int, mp: int, act_bytes: int) -> int:
        return L.block_activation_bytes(
            batch=batch, seq=seq, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, mp=mp,
            act=act_bytes, norms=1,
        )  # fmt: skip


GLOBAL_NAMES: HFNames = {
    (ROOT, "embeddings"): ("transformer.wte.weight", False),
    (f"{ROOT}/ln_f", "scale"): ("transformer.ln_f.weight", False),
    (f"{ROOT}/ln_f", "offset"): ("transformer.ln_f.bias", False),
    (f"{ROOT}/lm_head", "w"): ("lm_head.weight", True),
    (f"{ROOT}/lm_head", "b"): ("lm_head.bias", False),
}
LAYER_NAMES: HFNames = {
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


class Block(hk.Module):
    """One GPT-J layer: a shared LayerNorm feeding attention and MLP in parallel."""

    def __init__(self, m: GPTJ, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, x_BTD, sin_TR, cos_TR, mask, cache: L.LayerCache | None = None):
        m = self.m
        fan_in = 1.0 / math.sqrt(m.d_model)
        out_std = (2.0 / m.layers) / math.sqrt(m.d_model)
        rotary = L.Rotary(m.rotary_dims, 10000.0, ROTARY_INTERLEAVED)
        h_BTD = L.layer_norm("ln_1", m.layer_norm_eps)(x_BTD)

        q, v, k = L.projections(
            h_BTD, QKV, m.d_model, decode=cache is not None, stddev=fan_in, dtype=m.compute_dtype
        )
        q_BTHK, v_BTHK, k_BTHK = (L.split_heads(y, m.n_heads) for y in (q, v, k))
        q_BTHK = rotary.apply(q_BTHK, sin_TR, cos_TR)
        k_BTHK = rotary.apply(k_BTHK, sin_TR, cos_TR)
        attn_BTD, cache = L.attention(
            q_BTHK, k_BTHK, v_BTHK, mask, scale=True, dtype=m.compute_dtype, cache=cache
        )
        attn_BTD = L.Dense(m.d_model, stddev=out_std, bias=False, dtype=m.compute_dtype, name="out_proj")(
            attn_BTD
        )

        ff_BTF = L.Dense(m.d_ff, stddev=fan_in, bias=True, dtype=m.compute_dtype, name="fc_in")(h_BTD)
        ff_BTF = constrain(L.ACTIVATIONS[m.activation](ff_BTF), ("batch", "seq", "mlp"))
        ff_BTD = L.Dense(m.d_model, stddev=out_std, bias=True, dtype=m.compute_dtype, name="fc_out")(ff_BTF)

        x_BTD = constrain(x_BTD + attn_BTD + ff_BTD, ("batch", "seq", "embed"))
        return x_BTD if cache is None else (x_BTD, cache)


class Transformer(hk.Module):
    """Token ids -> logits: embedding, the blocks (stacked, or unrolled over a KV cache), ln_f, LM head."""

    def __init__(self, m: GPTJ, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, tokens_BT, cache: L.KVCache | None, segment_ids_BT):
        m = self.m
        wte_VD = constrain(
            L.table("embeddings", m.n_vocab, m.d_model, 1.0 / math.sqrt(m.n_vocab)), ("vocab", "embed")
        )
        x_BTD = constrain(jax.numpy.take(wte_VD, tokens_BT, axis=0), ("batch", "seq", "embed"))
        rotary = L.Rotary(m.rotary_dims, 10000.0, ROTARY_INTERLEAVED)
        block = lambda name: Block(m, name=name)  # noqa: E731
        x_BTD, cache = L.rotary_layers(block, rotary, x_BTD, m.layers, m.remat, cache, segment_ids_BT)

        x_BTD = L.layer_norm("ln_f", m.layer_norm_eps)(x_BTD)
        logits_BTV = L.Dense(
            m.n_vocab, stddev=1.0 / math.sqrt(m.d_model), bias=True, dtype=m.compute_dtype, name="lm_head"
        )(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "seq", "vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)
