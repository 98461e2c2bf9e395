"""GPT-Neo, bit-compatible with Hugging Face `GPTNeoForCausalLM`.

Learned absolute positions `wpe` are added to the token embeddings `wte`; each block is sequential,
`y = x + Attn(LN1(x))`, then `y + MLP(LN2(y))`. q, k and v have no bias and the attention output has one;
attention scores are not divided by sqrt(head_dim). Layers attend globally or locally as `attention_layers`
says: a local layer lets token i see only tokens j with i - window_size < j <= i. The LM head has no bias and
is the transposed `wte` unless `tie_word_embeddings` is false. Decoding reads q, k and v as one fused matmul.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import haiku as hk
import jax.numpy as jnp
import numpy as np

from mesh_transformer.errors import InteropError
from mesh_transformer.models import HFNames, Model
from mesh_transformer.models import layers as L
from mesh_transformer.sharding import constrain

ROOT = "gpt_neo"
QKV = L.Fused("qkv_proj", ("q_proj", "k_proj", "v_proj"))
ATTENTION_TYPES = ("global", "local")
TABLE_STD = 0.02  # Hugging Face's initializer_range, for the token and position tables
SCALE_SCORES = False  # GPT-Neo does not divide scores by sqrt(head_dim) (GPT-J and NeoX do: a test's control)

PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^gpt_neo/wte$", ("vocab", "embed")),
    (r"^gpt_neo/wpe$", (None, "embed")),
    (r"^gpt_neo/layers/block/ln_[12]/(scale|offset)$", ("layers", "embed")),
    (r"^gpt_neo/layers/block/(q_proj|k_proj|v_proj)/w$", ("layers", "embed", "heads")),
    (r"^gpt_neo/layers/block/qkv_proj/w$", ("layers", "embed", None, "heads")),  # decoding's fused q, k, v
    (r"^gpt_neo/layers/block/out_proj/w$", ("layers", "heads", "embed")),
    (r"^gpt_neo/layers/block/out_proj/b$", ("layers", "embed")),
    (r"^gpt_neo/layers/block/c_fc/w$", ("layers", "embed", "mlp")),
    (r"^gpt_neo/layers/block/c_fc/b$", ("layers", "mlp")),
    (r"^gpt_neo/layers/block/c_proj/w$", ("layers", "mlp", "embed")),
    (r"^gpt_neo/layers/block/c_proj/b$", ("layers", "embed")),
    (r"^gpt_neo/ln_f/(scale|offset)$", ("embed",)),
    (r"^gpt_neo/lm_head/w$", ("embed", "vocab")),
]


def default_attention_layers(layers: int) -> list[str]:
    """Hugging Face's default pattern: global, local, global, local, ..."""
    return [ATTENTION_TYPES[i % 2] for i in range(layers)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeo(Model):
    n_positions: int  # rows of the learned position table
    attention_layers: tuple[str, ...]  # "global" or "local", one per layer
    window_size: int = 256
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    architecture: ClassVar[str] = "gpt_neo"
    root: ClassVar[str] = ROOT
    hf_model_type: ClassVar[str] = "gpt_neo"
    hf_class: ClassVar[str] = "GPTNeoForCausalLM"
    config_defaults: ClassVar[dict[str, Any]] = {
        "pe": "fixed",
        "n_positions": lambda c: c.seq,
        "attention_layers": lambda c: default_attention_layers(c.layers),
        "window_size": 256,
        "d_ff": lambda c: 4 * c.d_model,
        "activation": "gelu_new",
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
    param_axes: ClassVar[list] = PARAM_AXES
    lora_targets: ClassVar[dict[str, str]] = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "out": "out_proj",
        "c_fc": "c_fc",
        "c_proj": "c_proj",
    }
    lora_default_targets: ClassVar[tuple[str, ...]] = ("q", "v")

    @classmethod
    def check_config(cls, c: Any) -> None:
        from mesh_transformer.config import ConfigError

        if c.pe != "fixed":
            raise ConfigError(
                f"config key 'pe' must be \"fixed\" (GPT-Neo's learned positions), got {c.pe!r}"
            )
        if len(c.attention_layers) != c.layers or not set(c.attention_layers) <= set(ATTENTION_TYPES):
            raise ConfigError(
                f'config key \'attention_layers\' must list "global" or "local" for each of the {c.layers} '
                f"layers, got {c.attention_layers!r}"
            )
        if c.window_size <= 0:
            raise ConfigError(f"config key 'window_size' must be a positive integer, got {c.window_size}")
        if c.n_positions < c.seq:
            raise ConfigError(
                f"config key 'n_positions' ({c.n_positions}) must be at least seq ({c.seq}): "
                "every position needs a row of the learned position table"
            )

    def windows(self) -> list[int]:
        """How many of the newest tokens each layer attends to (itself included)."""
        return [self.window_size if t == "local" else L.GLOBAL_WINDOW for t in self.attention_layers]

    # ----- the forward pass -----

    def forward(self, tokens_BT, cache=None, segment_ids_BT=None):
        return Transformer(self, name=ROOT)(tokens_BT, cache, segment_ids_BT)

    def decode_layout(self, params: Any) -> Any:
        """One array per layer, and each layer's q, k, v weights stacked into one (D, 3, D) "qkv_proj"."""
        return L.fuse(super().decode_layout(params), ROOT, self.layers, QKV)

    # ----- Hugging Face -----

    def hf_names(self) -> tuple[HFNames, HFNames]:
        global_names: HFNames = {
            (ROOT, "wte"): ("transformer.wte.weight", False),
            (ROOT, "wpe"): ("transformer.wpe.weight", False),
            (f"{ROOT}/ln_f", "scale"): ("transformer.ln_f.weight", False),
            (f"{ROOT}/ln_f", "offset"): ("transformer.ln_f.bias", False),
        }
        if not self.tie_word_embeddings:
            global_names[(f"{ROOT}/lm_head", "w")] = ("lm_head.weight", True)
        layer, attn = "transformer.h.{i}.", "transformer.h.{i}.attn.attention."
        layer_names: HFNames = {
            ("ln_1", "scale"): (layer + "ln_1.weight", False),
            ("ln_1", "offset"): (layer + "ln_1.bias", False),
            ("q_proj", "w"): (attn + "q_proj.weight", True),
            ("k_proj", "w"): (attn + "k_proj.weight", True),
            ("v_proj", "w"): (attn + "v_proj.weight", True),
            ("out_proj", "w"): (attn + "out_proj.weight", True),
            ("out_proj", "b"): (attn + "out_proj.bias", False),
            ("ln_2", "scale"): (layer + "ln_2.weight", False),
            ("ln_2", "offset"): (layer + "ln_2.bias", False),
            ("c_fc", "w"): (layer + "mlp.c_fc.weight", True),
            ("c_fc", "b"): (layer + "mlp.c_fc.bias", False),
            ("c_proj", "w"): (layer + "mlp.c_proj.weight", True),
            ("c_proj", "b"): (layer + "mlp.c_proj.bias", False),
        }
        return global_names, layer_names

    def hf_config(self, seq: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
        return {
            "architectures": [self.hf_class],
            "model_type": self.hf_model_type,
            "hidden_size": self.d_model,
            "num_layers": self.layers,
            "num_heads": self.n_heads,
            "intermediate_size": None if self.d_ff == 4 * self.d_model else self.d_ff,
            "activation_function": self.activation,
            "attention_types": compress_attention_layers(self.attention_layers),
            "window_size": self.window_size,
            "max_position_embeddings": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.n_vocab,
            "resid_dropout": 0.0,
            "embed_dropout": 0.0,
            "attention_dropout": 0.0,
            "initializer_range": TABLE_STD,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def config_from_hf(cls, hf: dict, source: str) -> dict[str, tuple[Any, str]]:
        types = hf.get("attention_types", [[list(ATTENTION_TYPES), 12]])
        try:
            attention_layers = [t for pattern, repeats in types for _ in range(repeats) for t in pattern]
        except (TypeError, ValueError):
            raise InteropError(
                f"{source}: attention_types {types!r} is not [[[types...], repeats], ...]"
            ) from None
        if hf.get("activation_function", "gelu_new") not in L.ACTIVATIONS:
            raise InteropError(
                f"{source}: activation_function {hf['activation_function']!r} is not supported"
            )
        d_model, inner = hf.get("hidden_size", 2048), hf.get("intermediate_size")
        return {
            "layers": (hf.get("num_layers", 24), "num_layers"),
            "d_model": (d_model, "hidden_size"),
            "n_heads": (hf.get("num_heads", 16), "num_heads"),
            "d_ff": (4 * d_model if inner is None else inner, "intermediate_size"),
            "attention_layers": (attention_layers, "attention_types"),
            "window_size": (hf.get("window_size", 256), "window_size"),
            "n_positions": (hf.get("max_position_embeddings", 2048), "max_position_embeddings"),
            "activation": (hf.get("activation_function", "gelu_new"), "activation_function"),
            "layer_norm_eps": (hf.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
            "tie_word_embeddings": (hf.get("tie_word_embeddings", True), "tie_word_embeddings"),
        }

    @classmethod
    def hf_context(cls, hf: dict) -> int:
        return hf.get("max_position_embeddings", 2048)

    # ----- FLOPs and memory -----

    def lookup_params(self) -> int:
        """The position table; the token table too when it is not also the LM head."""
        return (self.n_positions + (0 if self.tie_word_embeddings else self.n_vocab)) * self.d_model

    def attended_keys(self, seq: int) -> float:
        """T / 2 for a global layer; a local one's query t sees min(t + 1, w) keys: w - w (w - 1) / 2T."""
        w = self.window_size
        local = seq / 2 if w >= seq else w - w * (w - 1) / (2 * seq)
        return float(np.mean([local if t == "local" else seq / 2 for t in self.attention_layers]))

    def layer_activation_bytes(self, batch: int, seq: int, mp: int, act_bytes: int) -> int:
        # a local layer computes the whole (masked) score matrix too
        return L.block_activation_bytes(
            batch=batch, seq=seq, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, mp=mp,
            act=act_bytes, norms=2,
        )  # fmt: skip


def compress_attention_layers(attention_layers: tuple[str, ...]) -> list:
    """Hugging Face's attention_types: the shortest pattern whose repeats give the layers, [[pattern, n]]."""
    n = len(attention_layers)
    for period in range(1, n + 1):
        if n % period == 0 and list(attention_layers) == list(attention_layers[:period]) * (n // period):
            return [[list(attention_layers[:period]), n // period]]
    raise AssertionError("unreachable: the whole list is its own pattern")


class Block(hk.Module):
    """One GPT-Neo layer: attention (global or local), then the MLP, each behind its own LayerNorm."""

    def __init__(self, m: GPTNeo, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, x_BTD, mask, cache: L.LayerCache | None = None):
        m = self.m
        fan_in = 1.0 / math.sqrt(m.d_model)
        out_std = (2.0 / m.layers) / math.sqrt(m.d_model)
        dense = lambda d, std, bias, name: L.Dense(d, stddev=std, bias=bias, dtype=m.compute_dtype, name=name)  # noqa: E731

        h_BTD = L.layer_norm("ln_1", m.layer_norm_eps)(x_BTD)
        q, k, v = L.projections(
            h_BTD, QKV, m.d_model, decode=cache is not None, stddev=fan_in, dtype=m.compute_dtype
        )
        q_BTHK, k_BTHK, v_BTHK = (L.split_heads(y, m.n_heads) for y in (q, k, v))
        attn_BTD, cache = L.attention(
            q_BTHK, k_BTHK, v_BTHK, mask, scale=SCALE_SCORES, dtype=m.compute_dtype, cache=cache
        )
        x_BTD = x_BTD + dense(m.d_model, out_std, True, "out_proj")(attn_BTD)

        h_BTD = L.layer_norm("ln_2", m.layer_norm_eps)(x_BTD)
        ff_BTF = dense(m.d_ff, fan_in, True, "c_fc")(h_BTD)
        ff_BTF = constrain(L.ACTIVATIONS[m.activation](ff_BTF), ("batch", "seq", "mlp"))
        x_BTD = constrain(
            x_BTD + dense(m.d_model, out_std, True, "c_proj")(ff_BTF), ("batch", "seq", "embed")
        )
        return x_BTD if cache is None else (x_BTD, cache)


class Transformer(hk.Module):
    """Token ids -> logits: wte + wpe, the blocks (stacked with each layer's window, or unrolled over a KV
    cache), ln_f, the LM head (the tied wte, or lm_head)."""

    def __init__(self, m: GPTNeo, name: str):
        super().__init__(name=name)
        self.m = m

    def __call__(self, tokens_BT, cache: L.KVCache | None, segment_ids_BT):
        m = self.m
        wte_VD = constrain(L.table("wte", m.n_vocab, m.d_model, TABLE_STD), ("vocab", "embed"))
        wpe_PD = constrain(L.table("wpe", m.n_positions, m.d_model, TABLE_STD), (None, "embed"))
        T = tokens_BT.shape[1]
        where = L.sequence_positions(T, segment_ids_BT) if cache is None else L.cache_positions(cache, T)
        x_BTD = jnp.take(wte_VD, tokens_BT, axis=0) + jnp.take(wpe_PD, where.positions, axis=0)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))

        if cache is None:
            layer = lambda x, window: Block(m, name="block")(x, where.within(window))  # noqa: E731
            windows_L = jnp.asarray(m.windows(), jnp.int32)
            x_BTD = L.stacked_layers(layer, x_BTD, m.layers, m.remat, per_layer=(windows_L,))
        else:
            masks = {w: where.within(w) for w in set(m.windows())}  # one mask per distinct window
            windows = m.windows()
            layer = lambda i, x, c: Block(m, name=f"layer_{i}")(x, masks[windows[i]], c)  # noqa: E731
            x_BTD, cache = L.decoding_layers(layer, x_BTD, cache)

        x_BTD = L.layer_norm("ln_f", m.layer_norm_eps)(x_BTD)
        if m.tie_word_embeddings:
            logits_BTV = L.unembed(x_BTD, wte_VD, m.compute_dtype)
        else:
            logits_BTV = L.Dense(
                m.n_vocab,
                stddev=1.0 / math.sqrt(m.d_model),
                bias=False,
                dtype=m.compute_dtype,
                name="lm_head",
            )(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "seq", "vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)
