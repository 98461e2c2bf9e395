"""The Haiku GPT-J equals Hugging Face `GPTJForCausalLM` with the same random weights."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM

from mesh_transformer.hf import params_from_hf
from mesh_transformer.models import build, gptj, layers, param_count
from mesh_transformer.models.gptj import GPTJ


def random_hf_model(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab=96, seed=0) -> GPTJForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTJConfig(
        vocab_size=vocab,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rotary_dim,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    hf = GPTJForCausalLM(cfg).eval()
    # HF initialises biases and LayerNorms to 0/1; randomise everything so that a swapped tensor shows, and
    # make q/k large enough that attention (and so the rotary position signal) matters.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            std = 0.3 if ("q_proj" in name or "k_proj" in name) else 0.1
            p.copy_(torch.randn_like(p) * std + (1.0 if name.endswith("ln_1.weight") else 0.0))
    return hf


def gptj_of(c: GPTJConfig, **changes) -> GPTJ:
    """Our GPT-J of a transformers config's shape (float32, no remat)."""
    shape = dict(
        layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, n_vocab=c.vocab_size, d_ff=4 * c.n_embd
    )
    return GPTJ(**shape, rotary_dims=c.rotary_dim, compute_dtype="float32", remat="none", **changes)


def ours_vs_hf(hf: GPTJForCausalLM, tokens_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = gptj_of(hf.config)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = params_from_hf(tensors, shape)
    ours = np.asarray(build(shape).apply(params, None, jnp.asarray(tokens_BT)))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens_BT).long()).logits.numpy()
    return ours, theirs


@pytest.mark.parametrize(
    "n_embd,n_head,rotary_dim",
    [(64, 4, 8), (64, 4, 16), (96, 3, 32)],  # rotary on part of the head, and on all of it
)
def test_logits_match_transformers_gptj(n_embd, n_head, rotary_dim):
    hf = random_hf_model(n_embd=n_embd, n_head=n_head, rotary_dim=rotary_dim)
    tokens_BT = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 24))
    ours, theirs = ours_vs_hf(hf, tokens_BT)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_neox_rotary_style_does_not_match(monkeypatch):
    """Negative control: "rotate_half" (GPT-NeoX) rotary gives different logits from GPT-J's interleaved."""
    hf = random_hf_model()
    tokens_BT = np.random.default_rng(1).integers(0, hf.config.vocab_size, (1, 24))
    ours, theirs = ours_vs_hf(hf, tokens_BT)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    monkeypatch.setattr(gptj, "ROTARY_INTERLEAVED", False)
    neox, theirs = ours_vs_hf(hf, tokens_BT)
    assert np.abs(neox - theirs).max() > 1e-2


def test_bfloat16_compute_stays_close_to_float32():
    shape32 = GPTJ(layers=2, d_model=64, n_heads=4, n_vocab=96, d_ff=256, rotary_dims=8)
    model32, model16 = build(shape32), build(dataclasses.replace(shape32, compute_dtype="bfloat16"))
    tokens_BT = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 16)))
    params = model32.init(jax.random.PRNGKey(0), tokens_BT)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out32 = model32.apply(params, None, tokens_BT)
    out16 = model16.apply(params, None, tokens_BT)
    assert out16.dtype == jnp.float32  # float32 accumulation and softmax whatever the compute dtype
    assert 0 < float(jnp.abs(out32 - out16).max()) < 5e-2


def dot_generals(jaxpr):
    """Every dot_general of a jaxpr, those of its sub-jaxprs (scan, remat, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from dot_generals(sub)


def test_bfloat16_gradients_are_bfloat16_matmuls_with_float32_accumulation():
    """A bf16 model's gradient matmuls take bf16 operands (JAX's own transpose promoted them to float32) and
    equal, to float32 rounding, the exact products of the bf16-rounded operands; the float32 gradient of the
    whole model stays close to the bf16 one."""
    shape32 = GPTJ(layers=2, d_model=64, n_heads=4, n_vocab=96, d_ff=256, rotary_dims=8)
    model32, model16 = build(shape32), build(dataclasses.replace(shape32, compute_dtype="bfloat16"))
    tokens_BT = jnp.asarray(np.random.default_rng(4).integers(0, 96, (2, 16)))
    params = model32.init(jax.random.PRNGKey(0), tokens_BT)
    grad_fn = jax.jit(jax.grad(lambda p: model16.apply(p, None, tokens_BT).astype(jnp.float32).std()))
    dots = list(dot_generals(jax.make_jaxpr(grad_fn)(params).jaxpr))
    # attention's two products (batched over b, h) keep JAX's gradient; the others are the projections: q, k,
    # v, out, fc_in, fc_out in the layer scan's forward body, their dx and dw in its backward body; lm_head's
    unbatched = [e for e in dots if not e.params["dimension_numbers"][1][0]]
    assert len(unbatched) == 3 * 6 + 3
    assert all(v.aval.dtype == jnp.bfloat16 for e in unbatched for v in e.invars)

    rounded = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    x, w, g = (
        jax.random.normal(jax.random.PRNGKey(i), s)
        for i, s in enumerate([(2, 16, 32), (32, 24), (2, 16, 24)])
    )
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.matmul(x, w, jnp.bfloat16) * g), (0, 1)))(x, w)
    np.testing.assert_allclose(dx, np.einsum("bto,io->bti", rounded(g), rounded(w)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bti,bto->io", rounded(x), rounded(g)), rtol=0, atol=1e-5)

    grads16 = jax.tree_util.tree_leaves(grad_fn(params))
    grads32 = jax.tree_util.tree_leaves(jax.grad(lambda p: model32.apply(p, None, tokens_BT).std())(params))
    for a, b in zip(grads16, grads32, strict=True):
        assert a.dtype == jnp.float32 and float(jnp.abs(a - b).max()) < 5e-2 * float(jnp.abs(b).max()) + 1e-6


def test_remat_keeps_gradient_values():
    """Values only; that remat recomputes (and saves memory) is checked in the compiled train step in
    test_train.py."""
    shape = GPTJ(layers=3, d_model=64, n_heads=4, n_vocab=96, d_ff=256, rotary_dims=8)
    tokens_BT = jnp.asarray(np.random.default_rng(3).integers(0, 96, (2, 16)))
    plain, remat = build(shape), build(dataclasses.replace(shape, remat="layer"))
    params = plain.init(jax.random.PRNGKey(0), tokens_BT)

    def grads(m):
        return jax.grad(lambda p: m.apply(p, None, tokens_BT).sum())(params)

    for a, b in zip(
        jax.tree_util.tree_leaves(grads(plain)), jax.tree_util.tree_leaves(grads(remat)), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_6b_parameter_count_matches_transformers_gptj_6b():
    """The count of `transformers`' GPT-J-6B, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        hf = GPTJForCausalLM(
            GPTJConfig(
                vocab_size=50400,
                n_positions=2048,
                n_embd=4096,
                n_layer=28,
                n_head=16,
                rotary_dim=64,
                tie_word_embeddings=False,
            )
        )
    expected = sum(p.numel() for p in hf.parameters())
    shape = GPTJ(
        layers=28,
        d_model=4096,
        n_heads=16,
        n_vocab=50400,
        d_ff=16384,
        rotary_dims=64,
        compute_dtype="bfloat16",
    )
    params = jax.eval_shape(build(shape).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert param_count(params) == expected
    assert expected == 6_050_882_784  # the figure REFERENCE.md and the README quote
