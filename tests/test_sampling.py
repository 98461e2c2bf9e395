"""KV-cache generation: cached logits equal the full forward pass, greedy equals its argmax step by step,
per-request settings (top-k, top-p, stop strings, EOS, seed) behave, rows do not depend on their batch-mates,
and the sharded generator equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mesh_transformer.engine import Generator, generate, sampling_mesh
from mesh_transformer.models import KVCache, Model, build
from mesh_transformer.models.gptj import GPTJ
from mesh_transformer.sampling import (
    Row,
    SamplingError,
    SamplingParams,
    bucket,
    first_argmax,
    sample_next,
)
from mesh_transformer.sharding import make_mesh

SHAPE = GPTJ(
    layers=2,
    d_model=64,
    n_heads=4,
    n_vocab=320,
    d_ff=256,
    rotary_dims=8,
    compute_dtype="float32",
    remat="none",
)
SEQ = 128
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello model! Sampling and serving a tiny GPT-J.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text ✓ and numbers 12345.",
]


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on a few sentences, with <|endoftext|> as EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    return tokenizer


def tiny_params(shape: Model = SHAPE, seed: int = 0, logit_scale: float = 8.0):
    """Random params; the LM head is scaled up so that logits are far apart and a float rounding
    difference (sharded vs not, batch of 1 vs 16) cannot swap the winner."""
    params = jax.jit(build(shape).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree_util.tree_map(np.asarray, params)
    params["gptj/lm_head"]["w"] = params["gptj/lm_head"]["w"] * logit_scale
    return params


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generator(params, tokenizer):
    return Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, chunk_tokens=8)


# Requests in these tests keep to prompts <= 16 and max_tokens <= 16, in batches of 1 or 5..8, so that
# they share a few compiled shapes.


_forward = jax.jit(build(SHAPE).apply)


def full_logits(params, ids) -> np.ndarray:
    """Logits of the whole sequence at once, padded to one length (causal: the padding changes nothing)."""
    padded = np.zeros((1, 64), np.int32)
    padded[0, : len(ids)] = ids
    return np.asarray(_forward(params, None, jnp.asarray(padded)))[0, : len(ids)]


def test_cached_logits_match_full_forward_for_rows_at_their_own_positions(params):
    """Each row of a cache grows at its own position: two rows prefilled with different (right-padded)
    lengths, then decoded a token at a time, give the logits of a full forward pass over each row alone."""
    apply = jax.jit(build(SHAPE).apply)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 14))
    length = np.array([8, 4])  # row 1's prompt is 4 tokens, padded to 8 like row 0's
    cache = KVCache.empty(SHAPE, 2, 24)
    layer_params = SHAPE.decode_layout(params)
    prompt = np.where(np.arange(8) < length[:, None], tokens[:, :8], 0)
    logits_BTV, cache = apply(layer_params, None, jnp.asarray(prompt), cache)
    assert cache.length_B.tolist() == [8, 8]
    cache = cache._replace(length_B=jnp.asarray(length, jnp.int32))  # the padding is not part of row 1
    expected = [full_logits(params, tokens[b]) for b in range(2)]
    for b in range(2):
        np.testing.assert_allclose(logits_BTV[b, : length[b]], expected[b][: length[b]], atol=1e-4, rtol=0)
    for step in range(6):
        next_B = jnp.asarray(tokens[np.arange(2), length + step][:, None])
        logits_BTV, cache = apply(layer_params, None, next_B, cache)
        for b in range(2):
            np.testing.assert_allclose(logits_BTV[b, 0], expected[b][length[b] + step], atol=1e-4, rtol=0)
    assert cache.length_B.tolist() == [14, 10]


def test_greedy_equals_argmax_of_full_forward_step_by_step(params, generator):
    prompts = [[5, 17, 42], list(range(30, 46)), [7], [8, 9], [250] * 5]  # left-padded to one length
    rows = [Row(p, SamplingParams(max_tokens=16, temperature=0)) for p in prompts]
    for prompt, completion in zip(prompts, generator.generate(rows), strict=True):
        produced = completion.token_ids + [0] * (completion.finish_reason == "stop")  # EOS is id 0
        argmax = np.argmax(full_logits(params, prompt + produced)[:, :300], axis=-1)
        assert produced == argmax[len(prompt) - 1 : -1].tolist()


def test_never_emits_ids_beyond_the_tokenizer_vocabulary(params, tokenizer):
    # The padded ids 300..319 get a huge bias: unmasked, greedy and sampling would always pick them.
    biased = jax.tree_util.tree_map(np.array, params)
    biased["gptj/lm_head"]["b"][300:] = 1e4
    gen = Generator(SHAPE, biased, seq=SEQ, tokenizer=tokenizer, chunk_tokens=8)
    rows = [
        Row([1, 2, 3], SamplingParams(max_tokens=16, temperature=t, seed=s)) for t, s in [(0, 0), (1.5, 1)]
    ]
    for completion in gen.generate(rows[:1]) + gen.generate(rows[1:]):
        assert completion.generated_tokens == 16
        assert all(0 < t < 300 for t in completion.token_ids)


def test_first_argmax_equals_numpy_argmax_ties_included():
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # few distinct values: many tied maxima
    x[5, 10:] = -np.inf
    x[6] = -np.inf  # all masked: numpy picks index 0 too
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
    x[7, 3] = np.nan  # a broken row still yields an id inside the vocabulary
    assert int(first_argmax(jnp.asarray(x))[7]) == 0


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits_BV = jnp.asarray(np.random.default_rng(1).normal(size=(1, 50)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits_BV[0]))
    probs = np.asarray(jax.nn.softmax(logits_BV[0]))[order]
    nucleus = order[: int(np.searchsorted(np.cumsum(probs), 0.5)) + 1]
    n = 200
    keys = jnp.asarray([[0, i] for i in range(n)], jnp.uint32)
    draw = jax.jit(
        lambda k, p: sample_next(
            jnp.repeat(logits_BV, n, 0),
            keys,
            jnp.zeros(n, jnp.int32),
            jnp.ones(n),
            jnp.full(n, k),
            jnp.full(n, p),
            50,
        )
    )

    def draws(top_k, top_p):
        return set(np.asarray(draw(top_k, top_p)).tolist())

    assert draws(0, 1.0) - set(order[:3].tolist())  # unfiltered, draws go beyond the top 3
    assert draws(3, 1.0) <= set(order[:3].tolist())
    assert draws(1, 1.0) == {int(order[0])}
    assert draws(0, 0.5) <= set(nucleus.tolist())
    assert draws(0, 1e-6) == {int(order[0])}


def test_a_row_does_not_depend_on_its_batch_mates(generator):
    target = Row([11, 12, 13, 14], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234))
    alone = generator.generate([target])[0]
    others = [
        Row(list(range(1, 2 + 3 * i)), SamplingParams(max_tokens=8 + i, temperature=0.7, top_k=5 * i, seed=i))
        for i in range(5)
    ]
    in_batch = generator.generate(others[:2] + [target] + others[2:])[2]
    assert in_batch.token_ids == alone.token_ids
    reseeded = generator.generate(
        [Row(target.prompt_ids, SamplingParams(max_tokens=16, temperature=1.0, seed=1))]
    )
    assert reseeded[0].token_ids != alone.token_ids
    second_choice = generator.generate([Row(target.prompt_ids, target.params, choice=1)])[0]
    assert second_choice.token_ids != alone.token_ids


def test_stop_string_cuts_the_text_and_the_stream_never_shows_it(generator, tokenizer):
    prompt = tokenizer.encode("Hello world").ids
    full = generator.generate([Row(prompt, SamplingParams(max_tokens=16, temperature=0))])[0]
    assert len(full.text) > 10 and full.finish_reason == "length"
    stop = full.text[6:9]
    cut = full.text.find(stop)
    streamed: list[str] = []
    settings = SamplingParams(max_tokens=16, temperature=0, stop=("\x00never", stop))
    stopped = generator.generate([Row(prompt, settings)], on_text=lambda i, d: streamed.append(d))[0]
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop"
    assert "".join(streamed) == stopped.text
    n = len(stopped.token_ids)
    assert stopped.token_ids == full.token_ids[:n]
    assert stop not in tokenizer.decode(full.token_ids[: n - 1]) and stop in tokenizer.decode(
        full.token_ids[:n]
    )
    assert stopped.generated_tokens == n < full.generated_tokens


def test_stream_deltas_add_up_to_the_text(generator, tokenizer):
    prompt = tokenizer.encode("Ünïcödé").ids
    streamed: list[str] = []
    settings = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    completion = generator.generate([Row(prompt, settings)], on_text=lambda i, d: streamed.append(d))[0]
    assert "".join(streamed) == completion.text == tokenizer.decode(completion.token_ids)


def test_eos_ends_a_completion_and_is_not_part_of_it(params, generator):
    ids = generator.generate([Row([3, 4, 5], SamplingParams(max_tokens=12, temperature=0))])[0].token_ids
    eos = ids[4]
    gen = Generator(SHAPE, params, seq=SEQ, vocab_size=300, eos_id=eos, chunk_tokens=8)
    completion = gen.generate([Row([3, 4, 5], SamplingParams(max_tokens=12, temperature=0))])[0]
    assert completion.token_ids == ids[: ids.index(eos)]
    assert completion.finish_reason == "stop"
    assert completion.generated_tokens == ids.index(eos) + 1


def test_cancelled_rows_stop_and_the_others_finish(generator):
    rows = [Row([1, 2], SamplingParams(max_tokens=16, temperature=0)) for _ in range(5)]
    results = generator.generate(rows, cancelled=lambda i: i == 0)
    assert results[0].finish_reason == "cancelled" and results[0].generated_tokens < 16
    assert all(r.generated_tokens == 16 and r.finish_reason == "length" for r in results[1:])


def test_sharded_generation_equals_single_device(params, tokenizer, generator):
    mesh = make_mesh(2, 4)  # rows over dp, heads / mlp / vocab over mp
    sharded = Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, mesh=mesh, chunk_tokens=8)
    rows = [
        Row([9, 8, 7], SamplingParams(max_tokens=16, temperature=0.8, seed=5)),
        Row([1] * 16, SamplingParams(max_tokens=10, temperature=0)),
    ] + [Row([i + 1], SamplingParams(max_tokens=16, temperature=0.5, seed=i)) for i in range(3)]
    assert [c.token_ids for c in sharded.generate(rows)] == [c.token_ids for c in generator.generate(rows)]
    assert sharded.params["gptj/layer_0/qkv_proj"]["w"].sharding.spec == PartitionSpec(None, None, "mp")
    assert sampling_mesh(2).shape == {"dp": 1, "mp": 2}


def test_bad_requests_raise_one_clear_error(generator):
    with pytest.raises(SamplingError, match="prompt is empty"):
        generator.generate([Row([], SamplingParams())])
    with pytest.raises(SamplingError, match="exceed the model's context of 128"):
        generator.generate([Row([1] * 100, SamplingParams(max_tokens=40))])
    with pytest.raises(SamplingError, match="temperature"):
        generator.generate([Row([1], SamplingParams(temperature=-1))])
    with pytest.raises(SamplingError, match="top_p"):
        generator.generate([Row([1], SamplingParams(top_p=0))])
    with pytest.raises(SamplingError, match="prompt ids"):
        generator.generate([Row([300], SamplingParams())])


def test_buckets_are_powers_of_two_within_limits():
    assert [bucket(n, 16, 128) for n in (1, 16, 17, 100, 129, 5000)] == [16, 16, 32, 128, 128, 128]
    assert bucket(5, 1) == 8


def test_generate_entry_point_keeps_the_newest_tokens_of_a_long_prompt(params):
    prompt = list(range(1, 41))
    ids = generate(SHAPE, params, prompt, 8, seq=24, vocab_size=300, temperature=0)
    expected: list[int] = []  # greedy from the newest 16 prompt tokens, one full forward pass per token
    for _ in range(8):
        expected.append(int(np.argmax(full_logits(params, prompt[-16:] + expected)[-1, :300])))
    assert ids == expected
