"""Continuous batching and sampling semantics: rows beyond the slots reuse freed slots and give what they
give alone, a long row does not hold short ones back, a chunk ends once its rows fit a smaller program
and arrivals are prefilled by one call per prompt bucket, prefill shapes stay bucketed (and `warm_up`
compiles every program traffic runs), a failing listener fails its row only; top-k then top-p as transformers'
warpers, top_p 1 never filtered beside a top-p batch-mate, and a stop string completing inside a multi-byte
character never streamed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_sampling import SEQ, SHAPE, tiny_params, tiny_tokenizer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from mesh_transformer.engine import Engine, Generator
from mesh_transformer.sampling import Row, SamplingParams, TextTracker, filter_top_k_top_p


@pytest.fixture(scope="module")
def generator():
    return Generator(
        SHAPE,
        tiny_params(),
        seq=SEQ,
        tokenizer=tiny_tokenizer(),
        chunk_tokens=8,
        max_batch=4,
        batch_sizes=(1, 4),
    )


class Collect:
    def __init__(self):
        self.text, self.completion, self.error, self.stop = "", None, None, False

    def on_text(self, delta):
        self.text += delta

    def on_done(self, completion):
        self.completion = completion

    def on_error(self, error):
        self.error = error

    def cancelled(self):
        return self.stop


def test_rows_beyond_the_slots_take_freed_slots_and_equal_their_answers_alone(generator):
    rows = [
        Row(
            list(range(1, 2 + i % 7)),
            SamplingParams(max_tokens=[16, 2, 5, 9][i % 4], temperature=0.8, seed=i),
        )
        for i in range(10)
    ]
    alone = [generator.generate([row])[0].token_ids for row in rows]
    engine = Engine(generator, batch=4, slots=SEQ)
    listeners = [Collect() for _ in rows]
    for row, listener in zip(rows, listeners, strict=True):
        engine.add(row, listener)
    admitted_beside_live_rows = 0
    while engine.busy:
        waiting, live = len(engine.waiting), engine.live
        engine.step()
        assert engine.live <= 4
        admitted_beside_live_rows += live > 0 and len(engine.waiting) < waiting
    assert [listener.completion.token_ids for listener in listeners] == alone
    assert all(listener.text == listener.completion.text for listener in listeners)
    assert admitted_beside_live_rows >= 2  # rows joined a running batch in freed slots, twice at least


def test_a_short_row_finishes_while_a_long_one_goes_on(generator):
    engine = Engine(generator, batch=4, slots=SEQ)
    long, short = Collect(), Collect()
    engine.add(Row([1, 2, 3], SamplingParams(max_tokens=100, temperature=0)), long)
    engine.step()
    engine.add(Row([4, 5], SamplingParams(max_tokens=3, temperature=0)), short)
    for _ in range(2):  # its first id right after its prefill, then the other two
        engine.step()
    assert short.completion is not None and short.completion.generated_tokens == 3
    assert long.completion is None and engine.live == 1
    long.stop = True
    engine.step()
    assert long.completion.finish_reason == "cancelled" and not engine.busy


def test_a_chunk_ends_once_its_rows_fit_a_smaller_program_and_each_prompt_bucket_prefills_alone(generator):
    engine = Engine(generator, batch=4, slots=SEQ)
    calls, insert, decode = [], engine._run_insert, engine._run_decode
    engine._run_insert = lambda size, *args: calls.append(("insert", size)) or insert(size, *args)
    engine._run_decode = lambda rows, *args: calls.append(("decode", rows)) or decode(rows, *args)
    rows = [
        Row([1, 2], SamplingParams(max_tokens=3, temperature=0)),
        Row(list(range(1, 21)), SamplingParams(max_tokens=20, temperature=0)),
    ]
    short, long = Collect(), Collect()
    engine.add(rows[1], long)
    engine.add(rows[0], short)
    # Both prefilled by a call per prompt bucket (shortest first), drawing their first ids, then decoded
    # in the 4-row program until one row is left (2 more steps), not for a whole chunk of 8.
    engine.step()
    assert calls == [("insert", (16,)), ("insert", (32,)), ("decode", 4)]
    assert short.completion.generated_tokens == 3 and long.completion is None
    assert len(engine._live[min(engine._live)].tracker.ids) == 3
    while engine.busy:
        engine.step()
    assert calls[3:] == [("decode", 1)] * 3  # 17 ids left: chunks of 8, 8, 1
    alone, by_itself = Engine(generator, batch=4, slots=SEQ), Collect()  # the programs compiled above
    alone.add(rows[1], by_itself)
    while alone.busy:
        alone.step()
    assert long.completion.token_ids == by_itself.completion.token_ids


def test_prefill_shapes_are_bucketed_and_warm_up_covers_every_program_traffic_runs(generator):
    engine = Engine(generator, batch=4, slots=SEQ)
    used, program = set(), engine._program
    engine._program = lambda kind, size: used.add((kind, size)) or program(kind, size)
    for n in (1, 3, 7, 12, 16, 2, 9):  # prompts of 1..16 tokens, one to three at a time
        for _ in range(1 + n % 3):
            engine.add(Row(list(range(1, n + 1)), SamplingParams(max_tokens=2 + n % 4)), Collect())
        while engine.busy:
            engine.step()
    assert {size for kind, size in used if kind == "insert"} == {(16,)}  # whatever the number of rows
    assert {size for kind, size in used if kind == "decode"} == {(1,), (4,)}  # live rows: 1, or 2-3 of 4
    assert used <= set(engine.program_sizes())  # what `warm_up` compiles


def test_a_listener_that_raises_fails_its_own_row_only(generator):
    class Broken(Collect):
        def on_text(self, delta):
            raise RuntimeError("listener bug")

    engine = Engine(generator, batch=4, slots=SEQ)
    broken, fine = Broken(), Collect()
    engine.add(Row([1, 2], SamplingParams(max_tokens=8, temperature=0)), broken)
    engine.add(Row([1, 2], SamplingParams(max_tokens=8, temperature=0)), fine)
    while engine.busy:
        engine.step()
    assert isinstance(broken.error, RuntimeError) and broken.completion is None
    assert fine.completion.generated_tokens == 8 and fine.error is None


def transformers_kept(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The ids transformers' TopK then TopP warpers leave finite (its order in generate)."""
    scores = torch.from_numpy(logits[None].copy())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())


def test_top_k_then_top_p_keeps_what_transformers_keeps():
    # The case: p = [.4, .3, .2, .1]; top-k 2 leaves [.57, .43], whose nucleus at .5 is one token.
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    ours = filter_top_k_top_p(jnp.asarray(logits[None]), jnp.array([2]), jnp.array([0.5]))
    assert set(np.flatnonzero(np.isfinite(np.asarray(ours[0])))) == {0} == transformers_kept(logits, 2, 0.5)
    rng = np.random.default_rng(0)
    cases = [(k, p) for k in (0, 1, 3, 17, 50) for p in (1.0, 0.95, 0.6, 0.2, 1e-6)]
    logits = (rng.normal(size=(len(cases), 50)) * 2).astype(np.float32)
    ours = np.asarray(
        filter_top_k_top_p(
            jnp.asarray(logits),
            jnp.array([k for k, _ in cases]),
            jnp.array([p for _, p in cases], jnp.float32),
        )
    )
    for row, (k, p) in enumerate(cases):
        assert set(np.flatnonzero(np.isfinite(ours[row]))) == transformers_kept(logits[row], k, p), (k, p)


def test_a_row_with_top_p_1_is_never_filtered_beside_a_top_p_batch_mate():
    V = 50_400  # GPT-J's vocabulary: a float32 sum of 50k probabilities reaches 1 before the tail
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, V)) * 0.1
    kept = np.isfinite(np.asarray(filter_top_k_top_p(logits, jnp.array([0, 0]), jnp.array([1.0, 0.9]))))
    assert kept[0].all() and 0 < kept[1].sum() < V


def test_a_stop_string_completing_inside_a_multibyte_character_is_found_and_never_streamed():
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode("ab🙂cd").ids  # the emoji is four byte tokens
    assert len(ids) == 8 and tokenizer.decode(ids[:4]).endswith("\ufffd")
    tracker = TextTracker(Row([1], SamplingParams(stop=("🙂",))), tokenizer.decode, eos_id=0)
    tracker.extend(ids[:4], [], device_done=False)  # "ab" and half the emoji
    streamed = tracker.pending()
    assert tracker.finish is None and streamed == "ab"
    tracker.extend(ids[4:], [], device_done=False)  # the emoji completes in this chunk
    streamed += tracker.pending()
    assert tracker.finish == "stop" and tracker.text == streamed == "ab"
    assert tracker.ids == ids[:6] and tracker.generated == 6  # ends with the id that completed it
