"""Sampled tokens follow the distribution their settings name, checked statistically against the model's own
logits from a plain forward pass: temperature T draws from softmax(logits / T), top-k and top-p from the
renormalised kept tokens. Each check is a chi-square test over draws with many seeds, through the public
`Generator`, with a negative control showing that the test tells the intended distribution from a wrong one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from mesh_transformer.engine import Generator
from mesh_transformer.models import build
from mesh_transformer.models.gptj import GPTJ
from mesh_transformer.sampling import Row, SamplingParams

SHAPE = GPTJ(
    layers=2,
    d_model=32,
    n_heads=4,
    n_vocab=64,
    d_ff=128,
    rotary_dims=4,
    compute_dtype="float32",
    remat="none",
)
VOCAB = 48  # the tokenizer's size: ids 48..63 are padding and never drawn
PROMPT = [3, 14, 15, 9, 2, 6]
DRAWS = 2048  # one seed each


@pytest.fixture(scope="module")
def params():
    params = jax.jit(build(SHAPE).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree_util.tree_map(np.asarray, params)
    # logits spread over a few nats: a distribution with both likely and rare tokens
    params["gptj/lm_head"]["w"] = params["gptj/lm_head"]["w"] * 3.0
    return params


@pytest.fixture(scope="module")
def logits(params) -> np.ndarray:
    """The next-token logits after PROMPT, from one forward pass without cache or sampler."""
    out = build(SHAPE).apply(params, None, jnp.asarray([PROMPT]))
    return np.asarray(out[0, -1, :VOCAB], np.float64)


@pytest.fixture(scope="module")
def generator(params):
    return Generator(SHAPE, params, seq=32, vocab_size=VOCAB, max_batch=512, chunk_tokens=1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def counts(generator: Generator, **settings) -> np.ndarray:
    """How often each id was drawn as the first token, over DRAWS seeds."""
    rows = [Row(PROMPT, SamplingParams(max_tokens=1, seed=seed, **settings)) for seed in range(DRAWS)]
    ids = [c.token_ids[0] for c in generator.generate(rows)]
    return np.bincount(ids, minlength=VOCAB)


def p_value(observed: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; ids expected fewer than 5 times are pooled into one bin. A draw of an id
    that `probs` gives no mass at all is an outright failure (0)."""
    assert observed.shape == probs.shape and observed.sum() == DRAWS
    if observed[probs == 0].any():
        return 0.0
    expected = probs * DRAWS
    big = expected >= 5
    f_obs = np.append(observed[big], observed[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    if f_exp[-1] < 5:  # too little rare mass for a bin of its own: fold it into the smallest bin
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
        f_obs[np.argmin(f_exp)] += observed[~big].sum()
        f_exp[np.argmin(f_exp)] += expected[~big].sum()
    return float(chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue)


def kept(probs: np.ndarray, n: int) -> np.ndarray:
    """`probs` renormalised over its n likeliest ids."""
    out = np.zeros_like(probs)
    top = np.argsort(-probs)[:n]
    out[top] = probs[top] / probs[top].sum()
    return out


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_draws_follow_softmax_of_logits_over_temperature(generator, logits, temperature):
    observed = counts(generator, temperature=temperature)
    assert p_value(observed, softmax(logits / temperature)) > 1e-3
    # negative control: the same draws are far from an unscaled (temperature 1) distribution
    assert p_value(observed, softmax(logits)) < 1e-6


def test_top_k_draws_follow_the_renormalised_k_likeliest(generator, logits):
    probs = softmax(logits)
    observed = counts(generator, temperature=1.0, top_k=5)
    assert p_value(observed, kept(probs, 5)) > 1e-3
    assert p_value(observed, probs) < 1e-6


def test_top_p_draws_follow_the_renormalised_nucleus(generator, logits):
    probs = softmax(logits)
    cumulative = np.cumsum(np.sort(probs)[::-1])
    # the nucleus is the smallest set of likeliest ids holding top_p of the mass; top_p is put halfway
    # between two cumulative masses so that no rounding or boundary convention changes which set that is
    n = int(np.searchsorted(cumulative, 0.7)) + 1
    top_p = float((cumulative[n - 2] + cumulative[n - 1]) / 2)
    assert n >= 3 and probs.max() < top_p < 0.9  # a nucleus of several ids, well short of everything
    observed = counts(generator, temperature=1.0, top_p=top_p)
    assert p_value(observed, kept(probs, n)) > 1e-3
    assert p_value(observed, probs) < 1e-6
