"""How a completion is drawn and how its text ends: per-request settings (temperature, top-k then top-p,
seed, stop strings, log-probabilities), the device-side choice of each next token, and the host-side text
of a completion (EOS, stop strings, what is safe to stream). `engine` runs these on the model.

Semantics follow `transformers` and vLLM: temperature first, then top-k, then top-p over the renormalised
top-k distribution; a row whose top_k is 0 and top_p 1 is never filtered, whatever its batch-mates ask.
Noise comes from the row's seed, its choice index and the token's index alone, so a row's output does not
depend on what shares its batch. Log-probabilities are the model's distribution over all its ids.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.errors import UserError

UINT32 = 0xFFFFFFFF
MAX_TEMPERATURE = 1e6  # beyond it nothing changes (a uniform draw), and it fits float32
MAX_LOGPROBS = 5  # most alternatives reported per token (OpenAI's completions API allows 5)


class SamplingError(UserError):
    """A generation request that cannot be served (empty prompt, too long, bad sampling value)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 16  # 0: nothing is generated (scoring a prompt with prompt_logprobs)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings
    seed: int = 0  # any integer; taken modulo 2**64
    logprobs: int | None = None  # report each new token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # report the prompt tokens' too (the first has none); needs logprobs

    def check(self) -> None:
        if self.max_tokens < 0:
            raise SamplingError(f"max_tokens must be at least 0, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise SamplingError("stop sequences must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise SamplingError("prompt log-probabilities need logprobs")


@dataclass(frozen=True)
class Row:
    """One completion to generate: a prompt, its settings, and which of a request's choices it is."""

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    choice: int = 0  # folded into the seed: every prompt and choice of one request draws its own noise


class TokenLogprob(NamedTuple):
    """A token, its log-probability, and the likeliest alternatives as (id, log-probability), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    token_ids: list[int]  # the completion's ids, without EOS and cut at a stop string
    text: str  # "" when the generator has no tokenizer
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), or "cancelled"
    generated_tokens: int  # ids the model produced for it, EOS included (the usage count)
    logprobs: list[TokenLogprob] | None = None  # one per generated id, EOS included, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt id; the first is None


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The power of two >= n (at least `minimum`, at most `maximum` if given)."""
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return size if maximum is None else min(size, maximum)


def seed_key(seed: int) -> np.ndarray:
    """A raw uint32[2] threefry key from any integer seed (the same words `jax.random.PRNGKey` makes)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & UINT32], np.uint32)


# ----- the next token, on the device -----


def sample_next(
    logits_BV: jax.Array,
    key_B2: jax.Array,
    index_B: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    vocab_size: int,
) -> jax.Array:
    """The next id of every row: argmax where temperature is 0, else a draw from the temperature-scaled,
    top-k and then top-p filtered distribution with noise from (the row's key, the token's index)."""
    V = logits_BV.shape[-1]
    logits_BV = jnp.where(jnp.arange(V) < vocab_size, logits_BV.astype(jnp.float32), -jnp.inf)
    greedy_B = first_argmax(logits_BV)

    def draw() -> jax.Array:
        scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
        # Sorting the vocabulary costs more than a decode step of a small model: only when a row needs it.
        needs_filter = jnp.any((top_k_B > 0) | (top_p_B < 1))
        scaled_BV = jax.lax.cond(
            needs_filter, filter_top_k_top_p, lambda x, *_: x, scaled_BV, top_k_B, top_p_B
        )
        noise_BV = jax.vmap(lambda k, i: jax.random.gumbel(jax.random.fold_in(k, i), (V,)))(key_B2, index_B)
        return first_argmax(scaled_BV + noise_BV)

    sampled_B = jax.lax.cond(jnp.all(temperature_B == 0), lambda: greedy_B, draw)
    return jnp.where(temperature_B == 0, greedy_B, sampled_B)


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(x_BV, axis=-1)` (the first index of the maximum) as two plain reductions, which XLA CPU
    vectorizes: its fused (value, index) reduction took 4x as long, 4% of a decode step at batch 8.
    A row without a maximum (NaN logits) gets 0."""
    V = x_BV.shape[-1]
    is_max_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    index_B = jnp.min(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.where(index_B < V, index_B, 0)


def filter_top_k_top_p(scaled_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """The scaled logits with everything outside each row's top-k, and then outside the top-p nucleus of
    the renormalised top-k distribution, set to -inf (as transformers' TopK then TopP warpers do). top_k 0
    and top_p 1 filter nothing; the likeliest token is always kept."""
    V = scaled_BV.shape[-1]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
    rank_V = jnp.arange(V)
    in_top_k_BV = (top_k_B[:, None] <= 0) | (rank_V < top_k_B[:, None])
    sorted_BV = jnp.where(in_top_k_BV, sorted_BV, -jnp.inf)
    # Keep the smallest prefix of the sorted tokens whose renormalised mass reaches top_p.
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.maximum(jnp.sum(in_top_k_BV & (mass_before_BV < top_p_B[:, None]), axis=-1), 1)
    # top_p 1 keeps everything: float32 sums can reach 1 before the tail and would drop it.
    kept_B = jnp.where(top_p_B >= 1, jnp.sum(in_top_k_BV, axis=-1), kept_B)
    threshold_B = jnp.take_along_axis(sorted_BV, (kept_B - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)


class Logprobs(NamedTuple):
    """Log-probabilities of chosen ids under the model and the likeliest alternatives, any leading shape."""

    logprob: jax.Array  # float32 (...)
    top_ids: jax.Array  # int32 (..., MAX_LOGPROBS)
    top_logprobs: jax.Array  # float32 (..., MAX_LOGPROBS)


def token_logprobs(logits_xV: jax.Array, token_x: jax.Array, vocab_size: int) -> Logprobs:
    """log p(token) under the softmax of the logits over every id (the model's distribution, as a full
    forward pass scores it), and the MAX_LOGPROBS likeliest ids of the tokenizer's vocabulary."""
    V = logits_xV.shape[-1]
    logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
    vocab_V = jnp.arange(V)
    # a one-hot product rather than a gather keeps a vocabulary split over mp split
    chosen_x = jnp.sum(jnp.where(vocab_V == token_x[..., None], logp_xV, 0.0), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(jnp.where(vocab_V < vocab_size, logp_xV, -jnp.inf), MAX_LOGPROBS)
    return Logprobs(chosen_x, top_ids.astype(jnp.int32), top_logprobs)


# ----- the text, on the host -----


class TextTracker:
    """Host-side state of one completion: its ids, EOS, stop strings, log-probabilities, and the part of
    the text that is safe to stream."""

    def __init__(self, row: Row, detokenize: Callable[[list[int]], str] | None, eos_id: int | None):
        self.stop = row.params.stop
        self.want_logprobs = row.params.logprobs is not None
        self.detokenize, self.eos_id = detokenize, eos_id
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated id, EOS included
        self.generated = 0
        self.text = ""
        self.emitted = 0  # characters of `text` already handed to the stream
        self.finish: str | None = None

    def extend(self, new_ids: Sequence[int], logprobs: Sequence[TokenLogprob], device_done: bool) -> None:
        """Take a chunk of generated ids (with their log-probabilities when asked for); `device_done` says
        the device generates no more for this row."""
        if self.finish is not None:
            return
        # Text before its last complete character cannot change when ids are appended (a trailing U+FFFD is
        # an unfinished UTF-8 character), so a stop string completing in this chunk starts after it.
        stable = len(self.text.rstrip("\ufffd"))
        for i, token in enumerate(new_ids):
            self.generated += 1
            if self.want_logprobs:
                self.logprobs.append(logprobs[i])
            if token == self.eos_id:
                self.finish = "stop"
                break
            self.ids.append(int(token))
        if self.detokenize is not None:
            self.text = self.detokenize(self.ids)
            longest = max((len(s) for s in self.stop), default=0)
            self._cut_at_stop(max(0, stable - longest + 1))
        if self.finish is None and device_done:
            self.finish = "length"

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text, self.finish = self.text[:cut], "stop"
        # Ids, log-probabilities and the usage count end with the id that completed the stop string: the
        # shortest prefix of ids whose text holds a stop string (once there, it stays).
        contains = lambda n: any(s in self.detokenize(self.ids[:n]) for s in self.stop)  # noqa: E731
        n = bisect.bisect_left(range(len(self.ids) + 1), True, key=contains)
        self.ids, self.generated = self.ids[:n], n
        del self.logprobs[n:]

    def pending(self) -> str:
        """New text that can be streamed now: once finished, all of it; before, nothing that could still
        turn out to be part of a stop string or of an unfinished UTF-8 character."""
        end = len(self.text)
        if self.finish is None:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text[end - k : end] == s[:k]:
                        end -= k
                        break
        delta, self.emitted = self.text[self.emitted : max(end, self.emitted)], max(end, self.emitted)
        return delta

    def completion(self, prompt_logprobs: list[TokenLogprob | None] | None = None) -> Completion:
        return Completion(
            self.ids,
            self.text,
            self.finish or "length",
            self.generated,
            self.logprobs if self.want_logprobs else None,
            prompt_logprobs,
        )
