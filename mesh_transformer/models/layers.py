"""The building blocks every architecture of the family is made of, so that each architecture's file reads top
to bottom: `Dense` (the one place a projection's matmul happens), LayerNorm, activations, rotary position
embeddings in both layouts, attention masks (causal, local window, per document), attention over the sequence
or over a KV cache, and the layer loops (stacked for training, unrolled for decoding).

Layers live under `{root}/layers/block/...` stacked on a leading layers axis in training (`layer_stack`) and
as `{root}/layer_{i}/...`, one array per layer, in decoding (`unstack_layers`).

Shape suffixes: B batch, T sequence, S cache slots, D d_model, H heads, K head dim, R rotary dims, F d_ff,
V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.sharding import constrain

STACK = "layers/block/"  # the scope of stacked layers under an architecture's root
GLOBAL_WINDOW = 1 << 30  # the window of a layer that attends to every earlier token

# ----- projections -----


class Dense(hk.Module):
    """x @ w (+ b): inputs cast to the compute dtype, products accumulated in float32. Every projection of
    every architecture is one of these, so that an adapter (LoRA) can wrap the matmul in one place."""

    def __init__(self, d_out: int, *, stddev: float, bias: bool, dtype: str, name: str):
        super().__init__(name=name)
        self.d_out, self.stddev, self.bias, self.dtype = d_out, stddev, bias, jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = hk.get_parameter(
            "w", (x.shape[-1], self.d_out), jnp.float32, init=hk.initializers.TruncatedNormal(self.stddev)
        )
        y = matmul(x, w, self.dtype)
        if self.bias:
            y = y + hk.get_parameter("b", (self.d_out,), jnp.float32, init=jnp.zeros)
        return y


MATMUL = "...i,io->...o"  # a projection's einsum: x (..., I) @ w (I, O)
# Set while a train step on CPU devices is traced (see `weight_gradients_transposed_first`).
_TRANSPOSE_FIRST = contextvars.ContextVar("weight_gradients_transposed_first", default=False)


@contextlib.contextmanager
def weight_gradients_transposed_first(enabled: bool = True) -> Iterator[None]:
    """Around the tracing of a train step: each projection's weight gradient x^T @ g takes x's transpose as
    an op of its own. XLA CPU sends a dot whose left operand contracts its leading dims (x^T @ g as JAX's
    gradient writes it) to its generic dot emitter, at about half the speed of YNNPACK, which takes the same
    product once the transpose is made first (benchmarks/profile_train_step.py, GPT-J 117M: the step's
    backward matmuls 14.1 s -> 10.7 s). TPU folds a transpose into its dots, so only CPU programs ask."""
    token = _TRANSPOSE_FIRST.set(enabled)
    try:
        yield
    finally:
        _TRANSPOSE_FIRST.reset(token)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: str | jnp.dtype) -> jax.Array:
    """jnp.einsum of two operands cast to `dtype`, products accumulated in and returned as float32: the
    projections (`Dense`) and the tied LM head (`unembed`) of every architecture.

    Below float32 the gradient is computed as the forward is: the incoming gradient cast to `dtype` and both
    gradient matmuls fed `dtype` operands (as torch's autocast does). JAX's own transpose of a bf16 x bf16 ->
    f32 dot promotes the bf16 operand to the f32 gradient's type, so the backward's matmuls ran in float32
    and every saved bf16 activation was converted back to float32 first (8% of a bf16 step in
    benchmarks/profile_train_step.py). float32 keeps JAX's own gradient, bit for bit as before, unless the
    weight gradient is to be transposed first (see `weight_gradients_transposed_first`). `spec` is
    "a,b->out" where each operand's indices appear in the other or the output (no index summed alone)."""
    dtype = jnp.dtype(dtype)
    transpose_first = spec == MATMUL and _TRANSPOSE_FIRST.get()
    if dtype == jnp.float32 and not transpose_first:
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return _custom_einsum(a, b, spec, dtype, a.dtype, b.dtype, transpose_first)


def matmul(x: jax.Array, w_IO: jax.Array, dtype: str | jnp.dtype) -> jax.Array:
    """x (..., I) @ w (I, O), as `einsum` computes it."""
    return einsum(MATMUL, x, w_IO, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _custom_einsum(a, b, spec, dtype, a_dtype, b_dtype, transpose_first):
    return _custom_forward(a, b, spec, dtype, a_dtype, b_dtype, transpose_first)[0]


def _custom_forward(a, b, spec, dtype, a_dtype, b_dtype, transpose_first):
    a, b = a.astype(dtype), b.astype(dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _custom_backward(spec, dtype, a_dtype, b_dtype, transpose_first, saved, g):
    a, b = saved
    operands, out = spec.split("->")
    a_spec, b_spec = operands.split(",")
    g = g.astype(dtype)
    da = jnp.einsum(f"{out},{b_spec}->{a_spec}", g, b, preferred_element_type=jnp.float32)
    if transpose_first:  # MATMUL: (x^T) (I, N) @ g (N, O), N every leading index of x
        x_IN = jax.lax.optimization_barrier(a.reshape(-1, a.shape[-1]).T)
        db = jnp.matmul(x_IN, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
    else:
        db = jnp.einsum(f"{a_spec},{out}->{b_spec}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a_dtype), db.astype(b_dtype)


_custom_einsum.defvjp(_custom_forward, _custom_backward)


class Fused(NamedTuple):
    """Bias-free projections of one input that decoding reads as one matmul: training keeps each part as its
    own `Dense` ("q_proj", ...); `fuse` stacks their (D, F) weights, in the order of `parts`, into one
    (D, len(parts), F) weight named `name`, which `projections` reads when decoding."""

    name: str
    parts: tuple[str, ...]


def projections(
    x_BTD: jax.Array, group: Fused, d_out: int, *, decode: bool, stddev: float, dtype: str
) -> list[jax.Array]:
    """The outputs of the projections of `group`, in the order of its parts."""
    if not decode:
        return [
            Dense(d_out, stddev=stddev, bias=False, dtype=dtype, name=part)(x_BTD) for part in group.parts
        ]
    with hk.name_scope(group.name):
        w_DNF = hk.get_parameter(
            "w",
            (x_BTD.shape[-1], len(group.parts), d_out),
            jnp.float32,
            init=hk.initializers.TruncatedNormal(stddev),
        )
    cd = jnp.dtype(dtype)
    y_BTNF = jnp.einsum(
        "btd,dnf->btnf", x_BTD.astype(cd), w_DNF.astype(cd), preferred_element_type=jnp.float32
    )
    return [y_BTNF[:, :, i] for i in range(len(group.parts))]


def fuse(params: dict, root: str, layers: int, group: Fused) -> dict:
    """Decoding's layout of a fused group: in every layer `{root}/layer_{i}/`, the parts' weights stacked."""
    out = dict(params)
    for i in range(layers):
        scope = f"{root}/layer_{i}/"
        weights = [out.pop(scope + part)["w"] for part in group.parts]
        out[scope + group.name] = {"w": jnp.stack(weights, axis=1)}
    return out


def unembed(x_BTD: jax.Array, table_VD: jax.Array, dtype: str) -> jax.Array:
    """Logits of a tied LM head: x @ table^T, float32 accumulation."""
    return einsum("btd,vd->btv", x_BTD, table_VD, dtype)


def table(name: str, rows: int, d_model: int, stddev: float) -> jax.Array:
    """A float32 (rows, D) embedding table, a param of the current module (the architecture's root)."""
    return hk.get_parameter(name, (rows, d_model), jnp.float32, init=hk.initializers.TruncatedNormal(stddev))


# ----- normalisation and activations -----


def layer_norm(name: str, eps: float = 1e-5) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=eps, name=name)


# Hugging Face's `hidden_act` / `activation_function` names -> the function.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),  # the same formula, written otherwise
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# ----- rotary position embeddings -----


class Rotary(NamedTuple):
    """Rotary embeddings on the first `dims` dims of each head, frequencies 1 / base^(2i / dims).

    The two layouts of the family pair the dims differently: GPT-J's `interleaved` one rotates adjacent pairs
    (x0, x1), (x2, x3), ... (`rotate_every_two`); GPT-NeoX's rotate-half one pairs dim i with dim i + dims/2
    (`rotate_half`). The same weights give different logits under the other layout."""

    dims: int
    base: float
    interleaved: bool

    def tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """sin, cos (..., T, dims) for positions (..., T), e.g. (B, T) when each row has its own offsets."""
        inv_freq = 1.0 / (self.base ** (np.arange(0, self.dims, 2, dtype=np.float32) / self.dims))
        angles_TR = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., T, dims / 2)
        sin, cos = jnp.sin(angles_TR), jnp.cos(angles_TR)
        if self.interleaved:  # each frequency repeated for an adjacent pair of dims
            return jnp.repeat(sin, 2, axis=-1), jnp.repeat(cos, 2, axis=-1)
        return jnp.concatenate([sin, sin], axis=-1), jnp.concatenate([cos, cos], axis=-1)

    def apply(self, x_BTHK: jax.Array, sin_TR: jax.Array, cos_TR: jax.Array) -> jax.Array:
        x_rot, x_pass = x_BTHK[..., : self.dims], x_BTHK[..., self.dims :]
        sin, cos = sin_TR[..., None, :], cos_TR[..., None, :]  # broadcast over heads
        rotate = rotate_every_two if self.interleaved else rotate_half
        x_rot = x_rot * cos + rotate(x_rot) * sin
        return jnp.concatenate([x_rot, x_pass], axis=-1)


def rotate_every_two(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return jnp.stack([-x_odd, x_even], axis=-1).reshape(x.shape)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) halves -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


# ----- attention masks -----


class Positions(NamedTuple):
    """Where the tokens of a forward pass sit: their positions (T) or (B, T), and which earlier tokens (or
    cache slots) each may attend to, before any local window: (T, T), (B, 1, T, T) or (B, 1, T, S)."""

    positions: jax.Array
    mask: jax.Array
    distance: jax.Array  # how far back each attended token or slot is (the mask's shape): local windows

    def within(self, window: jax.Array | int) -> jax.Array:
        """The mask of a layer that sees only the `window` newest tokens (itself included)."""
        return self.mask & (self.distance < window)


def sequence_positions(T: int, segment_ids_BT: jax.Array | None = None) -> Positions:
    """A training or scoring pass over T tokens: causal; with segment ids, kept inside each document."""
    t_T = jnp.arange(T)
    distance_TT = t_T[:, None] - t_T[None, :]
    if segment_ids_BT is None:
        return Positions(t_T, jnp.tril(jnp.ones((T, T), dtype=bool)), distance_TT)
    positions_BT, mask_B1TT = document_positions_and_mask(segment_ids_BT)
    return Positions(positions_BT, mask_B1TT, distance_TT)


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


def cache_positions(cache: KVCache, T: int) -> Positions:
    """T new tokens continuing each row of the cache: a new token sees its row's slots up to and including
    its own (slot = position)."""
    position_BT = cache.length_B[:, None] + jnp.arange(T)
    slot_S = jnp.arange(cache.v_BHSK[0].shape[2])
    distance_B1TS = position_BT[:, None, :, None] - slot_S[None, None, None, :]
    return Positions(position_BT, distance_B1TS >= 0, distance_B1TS)


# ----- the KV cache and attention -----


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
    def empty(cls, model: Any, batch: int, slots: int) -> KVCache:
        """The empty cache of a model (anything with layers, n_heads, head_dim and compute_dtype)."""
        H, K = model.n_heads, model.head_dim
        dtype = jnp.dtype(model.compute_dtype)
        return cls(
            tuple(jnp.zeros((batch, H, K, slots), dtype) for _ in range(model.layers)),
            tuple(jnp.zeros((batch, H, slots, K), dtype) for _ in range(model.layers)),
            jnp.zeros((batch,), jnp.int32),
        )


class LayerCache(NamedTuple):
    """One layer's keys and values (updated in place) and where each row's new tokens go."""

    k_BHKS: jax.Array
    v_BHSK: jax.Array
    length_B: jax.Array


def _write_rows(cache_BHxy: jax.Array, new_BHxy: jax.Array, start_B: jax.Array, axis: int) -> jax.Array:
    """`new` written into `cache` along `axis` (the slot axis, 2 or 3) from each row's own start slot."""
    at = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis - 1)  # noqa: E731
    return jax.vmap(at)(cache_BHxy, new_BHxy.astype(cache_BHxy.dtype), start_B)


def split_heads(y_BTD: jax.Array, n_heads: int) -> jax.Array:
    B, T, D = y_BTD.shape
    return constrain(y_BTD.reshape(B, T, n_heads, D // n_heads), ("batch", "seq", "heads", None))


def attention(
    q_BTHK: jax.Array,
    k_BTHK: jax.Array,
    v_BTHK: jax.Array,
    mask: jax.Array,
    *,
    scale: bool,
    dtype: str,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """softmax(q k^T [/ sqrt(K)], masked) v in float32 -> (B, T, H * K). Scores are divided by sqrt(K) when
    `scale` (GPT-J, GPT-NeoX), not at all otherwise (GPT-Neo). With a cache, the new keys and values are
    written into it first and the queries attend to its slots (`mask` is then (B, 1, T, S))."""
    B, T, H, K = q_BTHK.shape
    cd = jnp.dtype(dtype)
    if cache is None:
        keys, values, k_spec, v_spec = k_BTHK, v_BTHK, "bshk", "bshk"
    else:
        k_BHKS = _write_rows(cache.k_BHKS, k_BTHK.transpose(0, 2, 3, 1), cache.length_B, axis=3)
        v_BHSK = _write_rows(cache.v_BHSK, v_BTHK.transpose(0, 2, 1, 3), cache.length_B, axis=2)
        cache = cache._replace(k_BHKS=k_BHKS, v_BHSK=v_BHSK)
        keys, values, k_spec, v_spec = k_BHKS, v_BHSK, "bhks", "bhsk"
    # JAX's own gradients here (`einsum`'s bf16 ones hit a gradient layout XLA CPU has no bf16 x bf16 -> f32
    # kernel for: dk of "bthk,bshk->bhts")
    scores_BHTS = jnp.einsum(
        f"bthk,{k_spec}->bhts", q_BTHK.astype(cd), keys.astype(cd), preferred_element_type=jnp.float32
    )
    if scale:
        scores_BHTS = scores_BHTS / math.sqrt(K)
    scores_BHTS = jnp.where(mask, scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    attn_BTHK = jnp.einsum(
        f"bhts,{v_spec}->bthk", probs_BHTS.astype(cd), values.astype(cd), preferred_element_type=jnp.float32
    )
    return attn_BTHK.reshape(B, T, H * K), cache


# ----- the layer loops -----


def stacked_layers(
    layer: Callable, x_BTD: jax.Array, layers: int, remat: str, per_layer: Sequence[jax.Array] = ()
) -> jax.Array:
    """x through `layers` layers of one structure, compiled once (`hk.layer_stack`: their params stacked on a
    leading axis under `layers/block`); `layer(x, *per_layer_i)` gets row i of each `per_layer` array (e.g.
    the layer's attention window). With remat "layer", each layer is recomputed in the backward pass."""
    if per_layer:
        step = lambda x, *inputs: (layer(x, *inputs), None)  # noqa: E731
    else:
        step = layer
    if remat == "layer":
        step = hk.remat(step)
    stack = hk.layer_stack(layers, with_per_layer_inputs=bool(per_layer), name="layers")
    if per_layer:
        return stack(step)(x_BTD, *per_layer)[0]
    return stack(step)(x_BTD)


def decoding_layers(
    layer: Callable[[int, jax.Array, LayerCache], tuple[jax.Array, LayerCache]],
    x_BTD: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """x through every layer with its own cache, unrolled over layers that each have their own weights
    (`layer_{i}`, see `unstack_layers`): slicing one layer out of stacked weights inside the decode loop
    copies it on every token, which doubled the step's time. layer(i, x, layer_cache) -> (x, layer_cache)."""
    k_BHKS, v_BHSK = [], []
    for i in range(len(cache.k_BHKS)):
        x_BTD, layer_cache = layer(i, x_BTD, LayerCache(cache.k_BHKS[i], cache.v_BHSK[i], cache.length_B))
        k_BHKS.append(layer_cache.k_BHKS)
        v_BHSK.append(layer_cache.v_BHSK)
    return x_BTD, KVCache(tuple(k_BHKS), tuple(v_BHSK), cache.length_B + x_BTD.shape[1])


def rotary_layers(
    block: Callable[[str], Callable], rotary: Rotary, x_BTD: jax.Array, layers: int, remat: str,
    cache: KVCache | None, segment_ids_BT: jax.Array | None,
) -> tuple[jax.Array, KVCache | None]:  # fmt: skip
    """x through the layers of a rotary model (GPT-J, GPT-NeoX): `block(name)` makes one layer, called as
    layer(x, sin, cos, mask[, layer_cache]); stacked for training (`stacked_layers`), unrolled over the
    cache for decoding (`decoding_layers`, which also returns the cache)."""
    T = x_BTD.shape[1]
    if cache is None:
        where = sequence_positions(T, segment_ids_BT)
        sin_TR, cos_TR = rotary.tables(where.positions)
        layer = lambda x: block("block")(x, sin_TR, cos_TR, where.mask)  # noqa: E731
        return stacked_layers(layer, x_BTD, layers, remat), None
    where = cache_positions(cache, T)
    sin_BTR, cos_BTR = rotary.tables(where.positions)
    layer = lambda i, x, c: block(f"layer_{i}")(x, sin_BTR, cos_BTR, where.mask, c)  # noqa: E731
    return decoding_layers(layer, x_BTD, cache)


def unstack_layers(params: dict, root: str, layers: int) -> dict:
    """Every stacked per-layer array ("{root}/layers/block/fc_in") split into one array per layer
    ("{root}/layer_0/fc_in", ...); everything else as it is."""
    stacked = f"{root}/{STACK}"
    out = {}
    for module, leaves in params.items():
        if module.startswith(stacked):
            for i in range(layers):
                out[f"{root}/layer_{i}/{module[len(stacked) :]}"] = {n: v[i] for n, v in leaves.items()}
        else:
            out[module] = leaves
    return out


# ----- memory -----


def block_activation_bytes(
    *, batch: int, seq: int, d_model: int, n_heads: int, d_ff: int, mp: int, act: int, norms: int
) -> int:
    """Bytes one pre-LayerNorm attention + MLP block keeps for its backward on one device: the float32
    residual input and `norms` LayerNorm outputs, q, k, v (and rotary copies of q, k), the float32 scores and
    the probabilities, the attention output, and the float32 MLP input and its activation."""
    B, T, D, F = batch, seq, d_model, d_ff
    return (
        B * T * D * 4 * (1 + norms)
        + B * T * 3 * D // mp * act * 2
        + B * n_heads // mp * T * T * (4 + act)
        + B * T * D // mp * act
        + B * T * F // mp * (4 + act)
    )
