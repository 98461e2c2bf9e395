"""GPT-J in Haiku, bit-compatible with Hugging Face `GPTJForCausalLM`.

Each block is `x + Attn(LN(x)) + MLP(LN(x))` with interleaved partial rotary embeddings, an untied LM head
with bias, and float32 softmax/LayerNorm. Layers are stacked (`hk.layer_stack`) so that a 28-layer model
compiles once per layer, not 28 times. Model code names logical axes only; `sharding` maps them to the mesh.

With a `KVCache` the same modules run incrementally for generation, unrolled over layers that each have
their own weights (`unstack_layers`): each row's new keys and values are written into the cache after the
tokens that row already holds, and attention reads every cached slot (see `GPTJ.__call__`).

Shape suffixes: B batch, T sequence, S cache slots, D d_model, H heads, K head dim, F d_ff, V vocab,
L layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.config import Config
from mesh_transformer.sharding import constrain


class ModelShape(NamedTuple):
    """The hyper-parameters the forward pass needs (a subset of `Config`, hashable for jit)."""

    layers: int
    d_model: int
    n_heads: int
    n_vocab: int
    rotary_dims: int
    compute_dtype: str
    remat: str

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, c: Config) -> ModelShape:
        return cls(c.layers, c.d_model, c.n_heads, c.n_vocab, c.pe_rotary_dims, c.compute_dtype, c.remat)


# ----- rotary position embedding (GPT-J "interleaved" style) -----


def rotary_sin_cos(positions_T: jax.Array, rotary_dims: int) -> tuple[jax.Array, jax.Array]:
    """sin/cos tables (T, rotary_dims), each frequency repeated for an adjacent pair of dims.

    Positions may carry leading dims, e.g. (B, T) when each row of a batch starts at its own offset."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dims, 2, dtype=np.float32) / rotary_dims))
    angles_TR = positions_T.astype(jnp.float32)[..., None] * inv_freq  # (..., T, rot/2)
    sin, cos = jnp.sin(angles_TR), jnp.cos(angles_TR)
    return jnp.repeat(sin, 2, axis=-1), jnp.repeat(cos, 2, axis=-1)


def rotate_every_two(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return jnp.stack([-x_odd, x_even], axis=-1).reshape(x.shape)


def apply_rotary(x_BTHK: jax.Array, sin_TR: jax.Array, cos_TR: jax.Array) -> jax.Array:
    rot = sin_TR.shape[-1]
    x_rot, x_pass = x_BTHK[..., :rot], x_BTHK[..., rot:]
    sin, cos = sin_TR[..., None, :], cos_TR[..., None, :]  # broadcast over heads
    x_rot = x_rot * cos + rotate_every_two(x_rot) * sin
    return jnp.concatenate([x_rot, x_pass], axis=-1)


# ----- building blocks -----


class Dense(hk.Module):
    """x @ w (+ b): inputs cast to the compute dtype, products accumulated in float32."""

    def __init__(self, d_out: int, *, stddev: float, bias: bool, dtype: str, name: str):
        super().__init__(name=name)
        self.d_out, self.stddev, self.bias, self.dtype = d_out, stddev, bias, jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = hk.get_parameter(
            "w", (x.shape[-1], self.d_out), jnp.float32, init=hk.initializers.TruncatedNormal(self.stddev)
        )
        y = jnp.einsum(
            "...i,io->...o", x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32
        )
        if self.bias:
            y = y + hk.get_parameter("b", (self.d_out,), jnp.float32, init=jnp.zeros)
        return y


def layer_norm(name: str):
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name=name)


class KVCache(NamedTuple):
    """Keys and values of every layer for B rows of S slots, one array per layer. Row b holds the keys and
    values of its first `length_B[b]` tokens at slots [0, length_B[b]), so a slot is a position; each row
    grows on its own, which lets a decode batch hold requests at different points of their generation. A
    forward pass of T tokens writes row b's at slots [length_B[b], length_B[b] + T) and advances every
    length by T (a caller that right-pads a row sets its length back to its real tokens); slots past a row's
    length may hold stale values, which no query attends to. The layouts are the ones attention's two
    matmuls (batched over b, h) read in place: keys (B, H, K, S), values (B, H, S, K); and one array per
    layer, so that no layer's cache is sliced out of (copied from) a stacked one."""

    k_BHKS: tuple[jax.Array, ...]
    v_BHSK: tuple[jax.Array, ...]
    length_B: jax.Array  # int32: tokens held by each row

    @classmethod
    def empty(cls, shape: ModelShape, batch: int, slots: int) -> KVCache:
        H, K = shape.n_heads, shape.head_dim
        dtype = jnp.dtype(shape.compute_dtype)
        return cls(
            tuple(jnp.zeros((batch, H, K, slots), dtype) for _ in range(shape.layers)),
            tuple(jnp.zeros((batch, H, slots, K), dtype) for _ in range(shape.layers)),
            jnp.zeros((batch,), jnp.int32),
        )


class _LayerCache(NamedTuple):
    """What one layer needs of the cache: its keys and values (updated in place), where each row's new
    tokens go, and which slots each new token may attend to."""

    k_BHKS: jax.Array
    v_BHSK: jax.Array
    length_B: jax.Array
    mask_B1TS: jax.Array  # which slots each new token may attend to


def _write_rows(cache_BHxy: jax.Array, new_BHxy: jax.Array, start_B: jax.Array, axis: int) -> jax.Array:
    """`new` written into `cache` along `axis` (the slot axis, 2 or 3) from each row's own start slot."""
    at = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis - 1)  # noqa: E731
    return jax.vmap(at)(cache_BHxy, new_BHxy.astype(cache_BHxy.dtype), start_B)


class Block(hk.Module):
    """One GPT-J layer: a shared LayerNorm feeding attention and MLP in parallel."""

    def __init__(self, shape: ModelShape, name: str = "block"):
        super().__init__(name=name)
        self.s = shape

    def __call__(
        self,
        x_BTD: jax.Array,
        sin_TR: jax.Array,
        cos_TR: jax.Array,
        cache: _LayerCache | None = None,
        mask_B1TT: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, _LayerCache]:
        """x_BTD -> x_BTD; with a cache, (x_BTD, the cache holding this layer's new keys and values).
        Without a cache, `mask_B1TT` (the earlier tokens each may attend to) replaces the causal mask."""
        s = self.s
        fan_in = 1.0 / math.sqrt(s.d_model)
        out_std = (2.0 / s.layers) / math.sqrt(s.d_model)
        h_BTD = layer_norm("ln_1")(x_BTD)

        # Attention. The linear creation order q, v, k matches the original checkpoints.
        B, T, _ = h_BTD.shape
        cd = jnp.dtype(s.compute_dtype)
        split = lambda y: constrain(y.reshape(B, T, s.n_heads, s.head_dim), ("batch", "seq", "heads", None))
        if cache is None:
            q_BTHK, v_BTHK, k_BTHK = (
                split(Dense(s.d_model, stddev=fan_in, bias=False, dtype=s.compute_dtype, name=name)(h_BTD))
                for name in ("q_proj", "v_proj", "k_proj")
            )
        else:  # generation: one matmul over q, k and v's weights, stacked by `unstack_layers`
            with hk.name_scope("qkv_proj"):
                w_D3D = hk.get_parameter(
                    "w", (s.d_model, 3, s.d_model), jnp.float32, init=hk.initializers.TruncatedNormal(fan_in)
                )
            qkv_BT3D = jnp.einsum(
                "btd,dce->btce", h_BTD.astype(cd), w_D3D.astype(cd), preferred_element_type=jnp.float32
            )
            q_BTHK, k_BTHK, v_BTHK = (split(qkv_BT3D[:, :, i]) for i in range(3))
        q_BTHK = apply_rotary(q_BTHK, sin_TR, cos_TR)
        k_BTHK = apply_rotary(k_BTHK, sin_TR, cos_TR)

        if cache is None:
            keys, values, k_spec, v_spec = k_BTHK, v_BTHK, "bshk", "bshk"
            mask = jnp.tril(jnp.ones((T, T), dtype=bool)) if mask_B1TT is None else mask_B1TT  # (T, S), S = T
        else:
            k_BHKS = _write_rows(cache.k_BHKS, k_BTHK.transpose(0, 2, 3, 1), cache.length_B, axis=3)
            v_BHSK = _write_rows(cache.v_BHSK, v_BTHK.transpose(0, 2, 1, 3), cache.length_B, axis=2)
            cache = cache._replace(k_BHKS=k_BHKS, v_BHSK=v_BHSK)
            keys, values, k_spec, v_spec, mask = k_BHKS, v_BHSK, "bhks", "bhsk", cache.mask_B1TS
        scores_BHTS = jnp.einsum(
            f"bthk,{k_spec}->bhts", q_BTHK.astype(cd), keys.astype(cd), preferred_element_type=jnp.float32
        ) / math.sqrt(s.head_dim)
        scores_BHTS = jnp.where(mask, scores_BHTS, jnp.finfo(jnp.float32).min)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
        attn_BTHK = jnp.einsum(
            f"bhts,{v_spec}->bthk",
            probs_BHTS.astype(cd),
            values.astype(cd),
            preferred_element_type=jnp.float32,
        )
        attn_BTD = attn_BTHK.reshape(B, T, s.d_model)
        attn_BTD = Dense(s.d_model, stddev=out_std, bias=False, dtype=s.compute_dtype, name="out_proj")(
            attn_BTD
        )

        # MLP
        ff_BTF = Dense(4 * s.d_model, stddev=fan_in, bias=True, dtype=s.compute_dtype, name="fc_in")(h_BTD)
        ff_BTF = constrain(jax.nn.gelu(ff_BTF, approximate=True), ("batch", "seq", "mlp"))
        ff_BTD = Dense(s.d_model, stddev=out_std, bias=True, dtype=s.compute_dtype, name="fc_out")(ff_BTF)

        x_BTD = constrain(x_BTD + attn_BTD + ff_BTD, ("batch", "seq", "embed"))
        return x_BTD if cache is None else (x_BTD, cache)


def document_positions_and_mask(segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For rows packing several documents (segment ids non-decreasing along T): each token's position within
    its document, and the attention mask that keeps it to its own document's earlier tokens - so every
    document is computed as if it were alone."""
    T = segment_ids_BT.shape[1]
    t_T = jnp.arange(T)
    starts_BT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_T, 0), axis=1)  # where each token's document starts
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return t_T - first_BT, (same_BTT & (t_T[:, None] >= t_T[None, :]))[:, None]


class GPTJ(hk.Module):
    """Token ids (B, T) -> float32 logits (B, T, V); with `segment_ids_BT`, attention stays inside documents.

    With a `KVCache`: the T tokens continue each row's cached context; returns their logits (B, T, V) and
    the cache holding them too."""

    def __init__(self, shape: ModelShape, name: str = "gptj"):
        super().__init__(name=name)
        self.s = shape

    def __call__(
        self, tokens_BT: jax.Array, cache: KVCache | None = None, segment_ids_BT: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        s = self.s
        wte_VD = hk.get_parameter(
            "embeddings",
            (s.n_vocab, s.d_model),
            jnp.float32,
            init=hk.initializers.TruncatedNormal(1.0 / math.sqrt(s.n_vocab)),
        )
        wte_VD = constrain(wte_VD, ("vocab", "embed"))
        x_BTD = constrain(jnp.take(wte_VD, tokens_BT, axis=0), ("batch", "seq", "embed"))
        T = tokens_BT.shape[1]

        if cache is None:
            positions, mask_B1TT = jnp.arange(T), None
            if segment_ids_BT is not None:
                positions, mask_B1TT = document_positions_and_mask(segment_ids_BT)
            sin_TR, cos_TR = rotary_sin_cos(positions, s.rotary_dims)

            def layer(x):
                return Block(s, name="block")(x, sin_TR, cos_TR, mask_B1TT=mask_B1TT)

            if s.remat == "layer":
                layer = hk.remat(layer)
            x_BTD = hk.layer_stack(s.layers, name="layers")(layer)(x_BTD)
        else:
            position_BT = cache.length_B[:, None] + jnp.arange(T)
            sin_BTR, cos_BTR = rotary_sin_cos(position_BT, s.rotary_dims)
            # A new token sees its row's slots up to and including its own (slot = position).
            slot_S = jnp.arange(cache.v_BHSK[0].shape[2])
            mask_B1TS = slot_S[None, None, None, :] <= position_BT[:, None, :, None]
            # Unrolled over layers, each with its own weights (see `unstack_layers`): slicing one layer out of
            # stacked weights inside the decode loop copies it on every token, which doubled the step's time.
            k_BHKS, v_BHSK = [], []
            for i in range(s.layers):
                layer_cache = _LayerCache(cache.k_BHKS[i], cache.v_BHSK[i], cache.length_B, mask_B1TS)
                x_BTD, layer_cache = Block(s, name=f"layer_{i}")(x_BTD, sin_BTR, cos_BTR, layer_cache)
                k_BHKS.append(layer_cache.k_BHKS)
                v_BHSK.append(layer_cache.v_BHSK)
            cache = KVCache(tuple(k_BHKS), tuple(v_BHSK), cache.length_B + T)

        x_BTD = layer_norm("ln_f")(x_BTD)
        logits_BTV = Dense(
            s.n_vocab, stddev=1.0 / math.sqrt(s.d_model), bias=True, dtype=s.compute_dtype, name="lm_head"
        )(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", "seq", "vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)


def build(shape: ModelShape) -> hk.Transformed:
    """Pure (init, apply) functions of the model; apply(params, None, tokens_BT) -> logits_BTV (pass
    segment_ids_BT= for packed documents that must not see each other), and
    apply(unstack_layers(params), None, tokens_BT, cache) -> (logits_BTV, cache) for generation."""
    return hk.transform(
        lambda tokens_BT, cache=None, segment_ids_BT=None: GPTJ(shape)(tokens_BT, cache, segment_ids_BT)
    )


STACKED_LAYER = "gptj/layers/block/"


def unstack_layers(params: dict, layers: int) -> dict:
    """The params as generation (a `KVCache` given) reads them: every stacked per-layer array
    ("gptj/layers/block/fc_in") split into one array per layer ("gptj/layer_0/fc_in", ...), and each layer's
    q, k and v weights stacked into one (D, 3, D) "qkv_proj", read with one matmul."""
    out = {}
    for module, leaves in params.items():
        if module.startswith(STACKED_LAYER):
            for i in range(layers):
                out[f"gptj/layer_{i}/{module[len(STACKED_LAYER) :]}"] = {n: v[i] for n, v in leaves.items()}
        else:
            out[module] = leaves
    for i in range(layers):
        q, k, v = (out.pop(f"gptj/layer_{i}/{m}")["w"] for m in ("q_proj", "k_proj", "v_proj"))
        out[f"gptj/layer_{i}/qkv_proj"] = {"w": jnp.stack([q, k, v], axis=1)}
    return out


def param_count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
