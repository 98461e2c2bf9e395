"""Text generation from a trained model: a jitted loop over new tokens with temperature sampling.

Generation never emits ids at or above the tokenizer's vocabulary (GPT-J pads 50257 real tokens to 50400).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.model import ModelShape, build


def generate(
    shape: ModelShape,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    seq: int,
    vocab_size: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` ids (greedy when temperature == 0)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    prompt_ids = prompt_ids[-(seq - max_new_tokens) :] if max_new_tokens < seq else prompt_ids[-1:]
    max_new_tokens = min(max_new_tokens, seq - len(prompt_ids))
    buffer_T = np.zeros(seq, np.int32)
    buffer_T[: len(prompt_ids)] = prompt_ids
    out = _decode_loop(shape, vocab_size, max_new_tokens)(
        params, jnp.asarray(buffer_T), len(prompt_ids), jnp.float32(temperature), jax.random.PRNGKey(seed)
    )
    n = len(prompt_ids)
    return np.asarray(out)[n : n + max_new_tokens].tolist()


def _decode_loop(shape: ModelShape, vocab_size: int, max_new_tokens: int):
    model = build(shape)

    @jax.jit
    def run(params, buffer_T, prompt_len, temperature, key):
        def body(i, carry):
            buffer_T, key = carry
            position = prompt_len + i - 1
            logits_V = model.apply(params, None, buffer_T[None])[0, position]
            logits_V = jnp.where(jnp.arange(logits_V.shape[-1]) < vocab_size, logits_V, -jnp.inf)
            key, sub = jax.random.split(key)
            sampled = jax.random.categorical(sub, logits_V / jnp.maximum(temperature, 1e-6))
            token = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(jnp.int32)
            return buffer_T.at[position + 1].set(token), key

        buffer_T, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buffer_T, key))
        return buffer_T

    return run
