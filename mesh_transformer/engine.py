"""Generation on the device: continuous batching over the slots of one KV cache.

An `Engine` keeps B rows ("slots") of a KV cache of S positions on the mesh, each holding one completion at
its own position. Between decode chunks, waiting rows are prefilled into free slots by one call per prompt
length bucket (a power of two, so traffic compiles a handful of programs), each row drawing its first id
from its prefill's logits at once; a decode chunk (a jitted `lax.while_loop`, no Python per token) then
advances the live rows, computing only as many rows as the smallest of a few sizes that holds them, and
ends early once the rows left fit a smaller size (or a waiting request can take a finished row's slot).
A row that finishes (EOS, max_tokens, a stop string, a cancelled request) frees its slot for the next
arrival. The engine calls the model's `apply` with a `KVCache` and knows nothing else of the architecture.

`Generator` is a model on a mesh with its tokenizer: `generate(rows)` runs rows through an engine sized for
them (offline), `engine()` makes the long-lived one a server drives.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import heapq
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mesh_transformer import sharding
from mesh_transformer.config import Config
from mesh_transformer.models import KVCache, Model, build, model_for
from mesh_transformer.prepare import EOS_CANDIDATES
from mesh_transformer.sampling import (
    MAX_LOGPROBS,
    MAX_TEMPERATURE,
    UINT32,
    Completion,
    Logprobs,
    Row,
    SamplingError,
    SamplingParams,
    TextTracker,
    TokenLogprob,
    bucket,
    sample_next,
    seed_key,
    token_logprobs,
)

MIN_PROMPT_BUCKET = 16
MIN_OUTPUT_BUCKET = 16
PREFILL_TOKENS = 2048  # padded prompt tokens prefilled per admission at most (unless one prompt is longer)
# A row's settings as `_insert` takes them: temperature, top_k, top_p, max_tokens, logprobs, prompt_logprobs.
_SETTINGS_DTYPES = (np.float32, np.int32, np.float32, np.int32, np.bool_, np.bool_)
# XLA CPU hands every dot to YNNPACK by default, which suits training's dots of thousands of rows; a decode
# step's dots have 1-16 rows, and XLA's own kernels ran them 1.2-1.4x faster (4-layer d_model 512 model,
# 4-16 rows; 1.4-1.6x the engine's throughput under saturating load), and prefill no slower. Engine programs
# on CPU are compiled with these options (no other platform has the switch).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Every engine's compiled programs, by what they were compiled for (see `Engine._program`).
_COMPILED: dict[tuple, Any] = {}
_COMPILING = threading.Lock()


# ----- device state and programs -----


class SlotState(NamedTuple):
    """What the device keeps for every slot between calls."""

    cache: KVCache
    next_B: jax.Array  # int32: the id drawn last, fed to the model at the next step
    count_B: jax.Array  # int32: ids generated so far
    done_B: jax.Array  # bool: nothing (more) to generate: finished, released, or never used
    key_B2: jax.Array  # uint32: the row's seed with its choice index folded in
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    max_tokens_B: jax.Array
    logprobs_B: jax.Array  # bool: the row reports log-probabilities


class Sampled(NamedTuple):
    """Ids drawn by one device call (-1 where a row drew none) and their log-probabilities."""

    ids: jax.Array
    logprobs: Logprobs


def _pin(state: SlotState, mesh: Mesh) -> SlotState:
    """The state in its one layout (cache heads over mp, rows over dp): every program then receives the
    layout it was compiled for."""
    rows = lambda x: jax.lax.with_sharding_constraint(x, sharding.row_sharding(mesh, x.ndim))  # noqa: E731
    kv = sharding.kv_cache_sharding(mesh)
    cache = state.cache
    k, v = jax.lax.with_sharding_constraint((cache.k_BHKS, cache.v_BHSK), kv)
    pinned = {name: rows(getattr(state, name)) for name in SlotState._fields[1:]}
    return SlotState(KVCache(k, v, rows(cache.length_B)), **pinned)


@functools.partial(jax.jit, static_argnames=("shape", "mesh", "batch", "slots"))
def _empty_state(*, shape: Model, mesh: Mesh, batch: int, slots: int) -> SlotState:
    zeros = lambda dtype: jnp.zeros((batch,), dtype)  # noqa: E731
    state = SlotState(
        KVCache.empty(shape, batch, slots),
        zeros(jnp.int32),
        zeros(jnp.int32),
        jnp.ones((batch,), bool),
        jnp.zeros((batch, 2), jnp.uint32),
        zeros(jnp.float32),
        zeros(jnp.int32),
        jnp.ones((batch,), jnp.float32),
        zeros(jnp.int32),
        zeros(bool),
    )
    return _pin(state, mesh)


# The device programs are module-level jitted functions; an engine compiles them ahead of time for each
# size it uses (see `Engine._program`), and every engine of one model on one mesh shares what was compiled.
@functools.partial(jax.jit, static_argnames=("shape", "mesh", "vocab_size", "eos_id"), donate_argnums=1)
def _insert(
    params,
    state: SlotState,
    count,
    tokens_AP,
    length_A,
    slot_A,
    seed_A2,
    choice_A,
    settings,
    *,
    shape: Model,
    mesh: Mesh,
    vocab_size: int,
    eos_id: int,
) -> tuple[SlotState, Sampled, jax.Array, Logprobs]:
    """Prefill the first `count` of A prompts (right-padded to P) one after another, each into a fresh cache
    copied into its slot `slot_A[a]` (the rows past `count` are fillers, and their slots past the batch),
    and draw each row's first id from its last prompt token's logits, so that an arrival's first token
    needs no decode call. The count is a traced loop bound, so one program serves any number of rows: a
    program per P alone. Returns the state, the first ids (-1 for a row of max_tokens 0) with their
    log-probabilities, which rows are done already, and, for a row that asks for them, its prompt tokens'
    log-probabilities after the first (entry t - 1 is token t's)."""
    temperature_A, top_k_A, top_p_A, max_tokens_A, logprobs_A, prompt_logprobs_A = settings
    model = build(shape)
    A, P = tokens_AP.shape
    N = MAX_LOGPROBS
    no_scores_1 = Logprobs(
        jnp.zeros((1, P - 1)), jnp.zeros((1, P - 1, N), jnp.int32), jnp.zeros((1, P - 1, N))
    )

    def prefill(a, carry):
        cache, scores, last_AV = carry
        tokens_1P = jax.lax.dynamic_slice_in_dim(tokens_AP, a, 1)
        with sharding.activation_sharding(mesh):
            fresh = KVCache.empty(shape, 1, P)
            k, v = jax.lax.with_sharding_constraint(
                (fresh.k_BHKS, fresh.v_BHSK), sharding.kv_cache_sharding(mesh)
            )
            logits_1PV, fresh = model.apply(params, None, tokens_1P, fresh._replace(k_BHKS=k, v_BHSK=v))
        at = (slot_A[a], 0, 0, 0)
        cache = KVCache(
            tuple(
                jax.lax.dynamic_update_slice(k, f, at)
                for k, f in zip(cache.k_BHKS, fresh.k_BHKS, strict=True)
            ),
            tuple(
                jax.lax.dynamic_update_slice(v, f, at)
                for v, f in zip(cache.v_BHSK, fresh.v_BHSK, strict=True)
            ),
            cache.length_B,
        )
        row_scores = jax.lax.cond(
            prompt_logprobs_A[a],
            lambda: token_logprobs(logits_1PV[:, :-1], tokens_1P[:, 1:], vocab_size),
            lambda: no_scores_1,
        )
        scores = jax.tree.map(
            lambda s, r: jax.lax.dynamic_update_slice_in_dim(s, r, a, 0), scores, row_scores
        )
        last_1V = jax.lax.dynamic_slice_in_dim(logits_1PV[0], length_A[a] - 1, 1).astype(jnp.float32)
        return cache, scores, jax.lax.dynamic_update_slice_in_dim(last_AV, last_1V, a, 0)

    no_scores = jax.tree.map(lambda x: jnp.zeros((A, *x.shape[1:]), x.dtype), no_scores_1)
    last_AV = jnp.zeros((A, shape.n_vocab), jnp.float32)
    cache, scores, last_AV = jax.lax.fori_loop(0, count, prefill, (state.cache, no_scores, last_AV))
    key_A2 = jax.vmap(jax.random.fold_in)(seed_A2, choice_A)
    first_A = sample_next(
        last_AV, key_A2, jnp.zeros_like(length_A), temperature_A, top_k_A, top_p_A, vocab_size
    )
    no_logprobs = Logprobs(jnp.zeros((A,)), jnp.zeros((A, N), jnp.int32), jnp.zeros((A, N)))
    first_logprobs = jax.lax.cond(
        jnp.any(logprobs_A), lambda: token_logprobs(last_AV, first_A, vocab_size), lambda: no_logprobs
    )
    drawn_A = max_tokens_A > 0
    done_A = ~drawn_A | (first_A == eos_id) | (max_tokens_A <= 1)
    put = lambda x, new: x.at[slot_A].set(new, mode="drop")  # noqa: E731
    state = SlotState(
        cache._replace(length_B=put(cache.length_B, length_A)),
        put(state.next_B, first_A),
        put(state.count_B, drawn_A.astype(jnp.int32)),
        put(state.done_B, done_A),
        put(state.key_B2, key_A2),
        put(state.temperature_B, temperature_A),
        put(state.top_k_B, top_k_A),
        put(state.top_p_B, top_p_A),
        put(state.max_tokens_B, max_tokens_A),
        put(state.logprobs_B, logprobs_A),
    )
    first = Sampled(jnp.where(drawn_A, first_A, -1), first_logprobs)
    return _pin(state, mesh), first, done_A, scores


def _take_rows(state: SlotState, rows_R: jax.Array) -> SlotState:
    """The slots `rows_R` of the state; an index past the batch is a filler row (done, greedy, unfiltered)."""
    fill = dict(done_B=True, top_p_B=1.0)
    take = lambda x, name: x.at[rows_R].get(mode="fill", fill_value=fill.get(name, 0))  # noqa: E731
    cache = state.cache
    return SlotState(
        KVCache(
            tuple(take(k, "k") for k in cache.k_BHKS),
            tuple(take(v, "v") for v in cache.v_BHSK),
            take(cache.length_B, "length_B"),
        ),
        **{name: take(getattr(state, name), name) for name in SlotState._fields[1:]},
    )


def _put_rows(state: SlotState, rows_R: jax.Array, rows: SlotState) -> SlotState:
    """`state` with the slots `rows_R` replaced by `rows` (filler indices past the batch are dropped)."""
    return jax.tree.map(lambda x, new: x.at[rows_R].set(new, mode="drop"), state, rows)


@functools.partial(
    jax.jit, static_argnames=("shape", "mesh", "vocab_size", "eos_id", "steps"), donate_argnums=1
)
def _decode(
    params,
    state: SlotState,
    rows_R,
    release_B,
    stop_at,
    *,
    shape: Model,
    mesh: Mesh,
    vocab_size: int,
    eos_id: int,
    steps: int,
) -> tuple[SlotState, Sampled, jax.Array]:
    """Up to `steps` ids of every live row among the slots `rows_R` (R of the batch's B; every
    slot, in order, when R == B), after marking the `release_B` rows done: the decoded rows are taken out of
    the state once per call, so that a step computes R rows, not B. Stops early once at most `stop_at`
    rows are live (the host picks it: fewer rows fit a smaller program, or a waiting request can take the
    freed slot). Entry r of the ids is slot rows_R[r]'s, and so is entry r of the rows' done flags."""
    model = build(shape)
    B, R = state.done_B.shape[0], rows_R.shape[0]
    state = state._replace(done_B=state.done_B | release_B)
    rows = state if R == B else _pin(_take_rows(state, rows_R), mesh)
    zeros = lambda dtype, *shape_: jnp.zeros((R, *shape_), dtype)  # noqa: E731
    N = MAX_LOGPROBS
    no_logprobs = Logprobs(zeros(jnp.float32), zeros(jnp.int32, N), zeros(jnp.float32, N))

    def step(carry):
        i, s, out = carry
        with sharding.activation_sharding(mesh):
            logits_R1V, cache = model.apply(params, None, s.next_B[:, None], s.cache)
        logits_RV = logits_R1V[:, 0]
        next_R = sample_next(
            logits_RV, s.key_B2, s.count_B, s.temperature_B, s.top_k_B, s.top_p_B, vocab_size
        )
        live_R = ~s.done_B
        logprobs = jax.lax.cond(
            jnp.any(live_R & s.logprobs_B),
            lambda: token_logprobs(logits_RV, next_R, vocab_size),
            lambda: no_logprobs,
        )
        drawn = Sampled(jnp.where(live_R, next_R, -1), logprobs)
        out = jax.tree.map(lambda o, x: o.at[:, i].set(x), out, drawn)
        count_R = s.count_B + live_R
        done_R = s.done_B | (next_R == eos_id) | (count_R >= s.max_tokens_B)
        return i + 1, s._replace(cache=cache, next_B=next_R, count_B=count_R, done_B=done_R), out

    def more(carry):
        i, s, _ = carry
        return (i < steps) & (jnp.sum(~s.done_B) > stop_at)

    out = Sampled(
        jnp.full((R, steps), -1, jnp.int32),
        Logprobs(zeros(jnp.float32, steps), zeros(jnp.int32, steps, N), zeros(jnp.float32, steps, N)),
    )
    _, rows, out = jax.lax.while_loop(more, step, (0, rows, out))
    state = rows if R == B else _put_rows(state, rows_R, rows)
    return _pin(state, mesh), out, rows.done_B


# ----- the host side -----


class Listener(Protocol):
    """How an engine reports one row back."""

    def on_text(self, delta: str) -> None:
        """More of the row's text, as it becomes safe to show."""

    def on_done(self, completion: Completion) -> None:
        """The row is finished (or cancelled)."""

    def on_error(self, error: Exception) -> None:
        """Generating the row failed; nothing more comes."""

    def cancelled(self) -> bool:
        """Whether the row should stop (checked between device calls)."""


@dataclasses.dataclass
class _Live:
    row: Row
    listener: Listener
    tracker: TextTracker
    prompt_logprobs: list[TokenLogprob | None] | None


class Engine:
    """Continuous batching of rows over `batch` slots of a KV cache of `slots` positions; `step()` admits
    waiting rows into free slots and then decodes one chunk of every live row. Not thread-safe: one thread
    drives it (the server's worker, or `Generator.generate`).

    Arrivals are prefilled by one call per prompt bucket, their prompts padded to a power of two P, and
    the live rows decoded R at a time, R one of the generator's `batch_sizes`: each P and R is one program,
    compiled ahead of time when first used, or all of them by `warm_up()` (a server's start), after which
    traffic compiles nothing.

    A device call that fails fails the rows it was for (a failed decode: every live row) and the engine goes
    on with the others; a listener that raises fails its own row only."""

    def __init__(
        self,
        generator: Generator,
        *,
        batch: int,
        slots: int,
        prefill_tokens: int = PREFILL_TOKENS,
        subsets: bool = True,
    ):
        """Without `subsets`, every decode call computes all `batch` rows: one decode program, for an engine
        too short-lived to repay the compilation of the others (`Generator.generate`)."""
        assert batch % generator.mesh.shape[sharding.DP] == 0, "rows are split evenly over dp"
        self.generator, self.batch, self.slots = generator, batch, slots
        self.prefill_tokens = max(prefill_tokens, slots)
        smaller = {b for b in generator.batch_sizes if b < batch} if subsets else set()
        self.sizes = sorted(smaller | {batch})
        self.chunk_tokens = generator.chunk_tokens
        self.compiles = 0  # programs this engine compiled (none on the request path after `warm_up`)
        self._state: SlotState | None = None
        self._free = list(range(batch))  # a heap: new rows take the lowest free slot
        self._live: dict[int, _Live] = {}
        self._waiting: collections.deque[tuple[Row, Listener]] = collections.deque()
        self._release = np.zeros(batch, bool)  # slots the host finished since the last decode call
        self.device_calls = 0

    def add(self, row: Row, listener: Listener) -> None:
        """Queue a row (checked with `Generator.check`) to be admitted at a later `step`."""
        if len(row.prompt_ids) + row.params.max_tokens > self.slots:
            raise SamplingError(
                f"prompt ({len(row.prompt_ids)} tokens) + max_tokens ({row.params.max_tokens}) exceed this "
                f"engine's {self.slots} positions"
            )
        self._waiting.append((row, listener))

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._live)

    @property
    def waiting(self) -> list[Listener]:
        return [listener for _, listener in self._waiting]

    @property
    def live(self) -> int:
        return len(self._live)

    def listeners(self) -> list[Listener]:
        """Every row's listener, waiting or live."""
        return [listener for _, listener in self._waiting] + [live.listener for live in self._live.values()]

    def step(self) -> None:
        for slot in [s for s, live in self._live.items() if live.listener.cancelled()]:
            self._live[slot].tracker.finish = "cancelled"
            self._finish(slot)
        if self._waiting and self._free:
            self._admit()
        if self._live:
            self._decode_chunk()

    # ----- programs -----

    def program_sizes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every program this engine can run: its empty state, ("insert", (P,)) for each prompt length
        bucket, and ("decode", (R,)) for each number of decoded rows."""
        prompts = sorted({bucket(n, MIN_PROMPT_BUCKET, self.slots) for n in range(1, self.slots + 1)})
        inserts = [("insert", (P,)) for P in prompts]
        return [("empty", ()), *inserts, *(("decode", (R,)) for R in self.sizes)]

    def warm_up(self, threads: int | None = None) -> int:
        """Compile every program this engine can run (`threads` at a time; default: one per CPU core), so
        that no request waits for a compilation; returns how many were compiled (engines of the same model
        and sizes share programs: a second warm-up compiles nothing)."""
        before = self.compiles
        sizes = self.program_sizes()
        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(lambda kind_size: self._program(*kind_size), sizes))
        return self.compiles - before

    def _program(self, kind: str, size: tuple[int, ...]) -> Any:
        """The compiled program `kind` of `size`, compiled now if no engine has compiled it yet."""
        key = (kind, size, self.batch, self.slots, self.chunk_tokens, self.generator.signature)
        compiled = _COMPILED.get(key)
        if compiled is None:
            compiled = self._lower(kind, size).compile(self.generator.compiler_options)
            with _COMPILING:
                if key not in _COMPILED:
                    _COMPILED[key] = compiled
                    self.compiles += 1
        return _COMPILED[key]

    def _lower(self, kind: str, size: tuple[int, ...]) -> jax.stages.Lowered:
        g = self.generator
        programs = dict(shape=g.shape, mesh=g.mesh)
        if kind == "empty":
            return _empty_state.lower(batch=self.batch, slots=self.slots, **programs)
        empty = self._program("empty", ())
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            empty.out_info,
            empty.output_shardings,
        )
        rows = lambda *shape_and_dtype: g.abstract_rows(*shape_and_dtype)  # noqa: E731
        i32 = jnp.int32
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
        if kind == "insert":
            (P,) = size
            A = self.batch
            settings = tuple(rows((A,), dtype) for dtype in _SETTINGS_DTYPES)
            arrivals = (rows((A, P), i32), rows((A,), i32), rows((A,), i32))
            seeds = (rows((A, 2), jnp.uint32), rows((A,), jnp.uint32))
            return _insert.lower(
                g.abstract_params,
                state,
                scalar(i32),
                *arrivals,
                *seeds,
                settings,
                vocab_size=g.vocab_size,
                eos_id=g.eos_id_or_none,
                **programs,
            )
        (R,) = size
        return _decode.lower(
            g.abstract_params,
            state,
            rows((R,), i32),
            rows((self.batch,), bool),
            scalar(i32),
            vocab_size=g.vocab_size,
            eos_id=g.eos_id_or_none,
            steps=self.chunk_tokens,
            **programs,
        )

    def _run_insert(self, size: tuple[int], *args) -> tuple[SlotState, Sampled, jax.Array, Logprobs]:
        return self._program("insert", size)(self.generator.params, *args)

    def _run_decode(self, rows: int, *args) -> tuple[SlotState, Sampled, jax.Array]:
        return self._program("decode", (rows,))(self.generator.params, *args)

    # ----- admitting rows -----

    def _take_arrivals(self) -> list[tuple[Row, Listener]]:
        """The waiting rows (oldest first) that fit the free slots and an admission's prefill token budget."""
        taken: list[tuple[Row, Listener]] = []
        tokens = 0
        while self._waiting and len(taken) < len(self._free):
            row, listener = self._waiting[0]
            if listener.cancelled():
                self._waiting.popleft()
                self.report(listener.on_done, Completion([], "", "cancelled", 0))
                continue
            tokens += bucket(len(row.prompt_ids), MIN_PROMPT_BUCKET, self.slots)
            if taken and tokens > self.prefill_tokens:
                break
            taken.append(self._waiting.popleft())
        return taken

    def _admit(self) -> None:
        """Prefill the arrivals that fit, one call per prompt bucket (shortest first), so that a short prompt
        is not padded to a long one's bucket."""
        by_bucket: dict[int, list[tuple[Row, Listener]]] = {}
        for row, listener in self._take_arrivals():
            P = bucket(len(row.prompt_ids), MIN_PROMPT_BUCKET, self.slots)
            by_bucket.setdefault(P, []).append((row, listener))
        for P in sorted(by_bucket):
            self._insert_rows(P, by_bucket[P])

    def _insert_rows(self, P: int, taken: list[tuple[Row, Listener]]) -> None:
        """Prefill rows of prompts of at most P tokens into free slots by one call."""
        A = self.batch  # rows past the taken ones are fillers, which the program skips
        tokens_AP = np.zeros((A, P), np.int32)
        length_A = np.ones(A, np.int32)  # filler rows: one token, nothing to generate
        slot_A = np.full(A, self.batch, np.int32)  # past the batch: dropped
        seed_A2, choice_A = np.zeros((A, 2), np.uint32), np.zeros(A, np.uint32)
        settings = [np.zeros(A, dtype) for dtype in _SETTINGS_DTYPES]
        temperature_A, top_k_A, top_p_A, max_tokens_A, logprobs_A, prompt_logprobs_A = settings
        top_p_A[:] = 1
        slots = [heapq.heappop(self._free) for _ in taken]
        for a, ((row, _), slot) in enumerate(zip(taken, slots, strict=True)):
            p = row.params
            tokens_AP[a, : len(row.prompt_ids)] = row.prompt_ids
            length_A[a], slot_A[a] = len(row.prompt_ids), slot
            seed_A2[a], choice_A[a] = seed_key(p.seed), row.choice & UINT32
            # Beyond these bounds nothing changes (a uniform draw; every token kept), and they fit the dtypes.
            temperature_A[a] = min(p.temperature, MAX_TEMPERATURE)
            top_k_A[a] = min(p.top_k, self.generator.vocab_size)
            top_p_A[a], max_tokens_A[a], logprobs_A[a] = p.top_p, p.max_tokens, p.logprobs is not None
            prompt_logprobs_A[a] = p.prompt_logprobs
        put = self.generator.put_rows
        try:
            state, first, done_A, prompt = self._run_insert(
                (P,),
                self._state if self._state is not None else self._empty(),
                np.int32(len(taken)),
                *(put(x) for x in (tokens_AP, length_A, slot_A, seed_A2, choice_A)),
                tuple(put(x) for x in settings),
            )
            wanted = (
                first.logprobs if logprobs_A.any() else None,
                prompt if prompt_logprobs_A.any() else None,
            )
            first_A, done_A, (first_logprobs, prompt) = jax.device_get((first.ids, done_A, wanted))
        except Exception as error:  # noqa: BLE001 - the rows are answered with it; the engine goes on
            for slot in slots:
                heapq.heappush(self._free, slot)
            for _, listener in taken:
                self.report(listener.on_error, error)
            if self._state is not None and self._state.done_B.is_deleted():  # donated, then failed
                self._reset(error)
            return
        self._state = state
        self.device_calls += 1
        for a, ((row, listener), slot) in enumerate(zip(taken, slots, strict=True)):
            self._release[slot] = False
            prompt_logprobs = None
            if row.params.prompt_logprobs:
                prompt_logprobs = [None] + [
                    _token_logprob(prompt, (a, t - 1), row.prompt_ids[t], row.params.logprobs)
                    for t in range(1, len(row.prompt_ids))
                ]
            tracker = TextTracker(row, self.generator.detokenize, self.generator.eos_id)
            self._live[slot] = _Live(row, listener, tracker, prompt_logprobs)
            ids = [int(first_A[a])] if first_A[a] >= 0 else []  # none for max_tokens 0 (scoring only)
            logprobs = []
            if ids and row.params.logprobs is not None:
                logprobs = [_token_logprob(first_logprobs, (a,), ids[0], row.params.logprobs)]
            self._deliver(slot, ids, logprobs, bool(done_A[a]))

    def _empty(self) -> SlotState:
        return self._program("empty", ())()

    # ----- decoding -----

    def _decode_chunk(self) -> None:
        """Decode up to a chunk of the live slots: R of them (the smallest size that holds them; all, in
        order, at R = B)."""
        live = sorted(self._live)
        R = next(b for b in self.sizes if b >= len(live))
        slots = list(range(self.batch)) if R == self.batch else live
        rows_R = np.full(R, self.batch, np.int32)  # past the batch: a filler row
        rows_R[: len(slots)] = slots
        # Stop once the rows left fit a smaller program, or (a request waits for a slot) once a row finishes.
        stop_at = max([b for b in self.sizes if b < R] + [0])
        if self._waiting and not self._free:
            stop_at = max(stop_at, len(live) - 1)
        put = self.generator.put_rows
        try:
            state, out, done_R = self._run_decode(
                R,
                self._state,
                put(rows_R),
                put(self._release.copy()),
                np.int32(stop_at),
            )
            out, done_R = jax.device_get((out, done_R))
        except Exception as error:  # noqa: BLE001 - every live row is answered with it
            self._reset(error)
            return
        self._state = state
        self._release[:] = False
        self.device_calls += 1
        for r, slot in enumerate(slots):
            if slot not in self._live:
                continue
            live = self._live[slot]
            drawn = out.ids[r] >= 0
            ids = out.ids[r][drawn].tolist()
            logprobs = []
            if live.row.params.logprobs is not None:
                steps = np.flatnonzero(drawn)
                logprobs = [
                    _token_logprob(out.logprobs, (r, c), t, live.row.params.logprobs)
                    for c, t in zip(steps, ids, strict=True)
                ]
            self._deliver(slot, ids, logprobs, bool(done_R[r]))

    def _deliver(self, slot: int, ids: list[int], logprobs: list[TokenLogprob], device_done: bool) -> None:
        live = self._live[slot]
        try:
            live.tracker.extend(ids, logprobs, device_done)
            delta = live.tracker.pending()
            if delta:
                live.listener.on_text(delta)
        except Exception as error:  # noqa: BLE001 - this row fails; the others go on
            del self._live[slot]
            self._free_slot(slot)
            self.report(live.listener.on_error, error)
            return
        if live.tracker.finish is not None:
            self._finish(slot)

    def _finish(self, slot: int) -> None:
        live = self._live.pop(slot)
        self._free_slot(slot)
        completion = live.tracker.completion(live.prompt_logprobs)
        self.report(live.listener.on_done, completion)

    def _free_slot(self, slot: int) -> None:
        self._release[slot] = True  # the device may still count it live (a stop string, a cancellation)
        heapq.heappush(self._free, slot)

    def _reset(self, error: Exception) -> None:
        """After a failed device call whose state is lost: every live row fails, every slot is free."""
        live, self._live = self._live, {}
        self._state, self._free = None, list(range(self.batch))
        self._release[:] = False
        for row in live.values():
            self.report(row.listener.on_error, error)

    @staticmethod
    def report(callback: Callable[[Any], None], result: Any) -> None:
        """A listener that fails to take its result loses it, nothing else."""
        try:
            callback(result)
        except Exception:  # noqa: BLE001, S110 - nobody is left to tell
            pass


def _token_logprob(logprobs: Logprobs, index: tuple, token: int, alternatives: int | None) -> TokenLogprob:
    top_ids, top_logprobs = logprobs.top_ids[index], logprobs.top_logprobs[index]
    top = [
        (int(i), float(lp))
        for i, lp in zip(top_ids[: alternatives or 0], top_logprobs, strict=False)
        if np.isfinite(lp)
    ]
    return TokenLogprob(int(token), float(logprobs.logprob[index]), top)


# ----- a model on a mesh with its tokenizer -----


def sampling_mesh(mp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (1, mp) mesh on the first mp devices: the model split like training, the batch not split."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < mp:
        raise SamplingError(
            f"the model is split over {mp} devices (cores_per_replica) but {len(devices)} exist"
        )
    return sharding.make_mesh(1, mp, devices[:mp])


class Generator:
    """One model on one mesh, with its tokenizer: `generate` completes a list of rows; `engine()` makes a
    long-lived `Engine` for a server."""

    def __init__(
        self,
        shape: Model,
        params: Any,
        *,
        seq: int,
        vocab_size: int | None = None,
        tokenizer: Any = None,
        eos_id: int | None = None,
        mesh: Mesh | None = None,
        max_batch: int = 16,
        chunk_tokens: int = 32,
        batch_sizes: Sequence[int] | None = None,
        tokenizer_path: str | None = None,
    ):
        """`tokenizer` (a `tokenizers.Tokenizer`) gives text, stop strings, the vocabulary size and EOS;
        without it pass `vocab_size` (and `eos_id`), and completions hold ids only. An engine of n slots
        prefills arrivals in batches of `batch_sizes` (default: powers of two up to `max_batch`) and decodes
        up to `chunk_tokens` tokens per device call. `tokenizer_path` says where the tokenizer was read from
        (a chat template may sit beside it)."""
        if tokenizer is not None:
            vocab_size = vocab_size or tokenizer.get_vocab_size()
            if eos_id is None:
                eos_id = next(
                    (i for t in EOS_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None), None
                )
        if vocab_size is None:
            raise ValueError("give a tokenizer or vocab_size")
        self.shape, self.seq, self.tokenizer, self.tokenizer_path = shape, seq, tokenizer, tokenizer_path
        self.vocab_size, self.eos_id = min(vocab_size, shape.n_vocab), eos_id
        self.eos_id_or_none = -1 if eos_id is None else eos_id
        self.detokenize = None if tokenizer is None else tokenizer.decode
        if mesh is None:  # one device: the one `jax.default_device` names, if any
            device = jax.config.jax_default_device or jax.devices()[0]
            mesh = sharding.make_mesh(1, 1, [jax.devices(device)[0] if isinstance(device, str) else device])
        self.mesh = mesh
        self.compiler_options = CPU_COMPILER_OPTIONS if sharding.on_cpu(mesh) else {}
        self.max_batch, self.chunk_tokens = max_batch, chunk_tokens
        dp = self.mesh.shape[sharding.DP]
        sizes = batch_sizes or [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [
            max_batch
        ]
        self.batch_sizes = sorted({-(-b // dp) * dp for b in sizes})  # rows split evenly over dp
        assert self.batch_sizes[-1] >= max_batch, (
            f"batch_sizes {batch_sizes} must reach max_batch {max_batch}"
        )
        self.params = place_params(params, shape, self.mesh)
        self.abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params
        )
        # What a compiled program depends on besides its sizes: engines of equal signatures share programs.
        leaves, tree = jax.tree.flatten(self.abstract_params)
        self.signature = (shape, self.mesh, self.vocab_size, self.eos_id_or_none, tree, tuple(leaves))

    def put_rows(self, x: np.ndarray) -> jax.Array:
        """A per-row host array on the mesh, rows split over dp."""
        return jax.device_put(x, sharding.row_sharding(self.mesh, x.ndim))

    def abstract_rows(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """What `put_rows` makes of a host array of this shape and dtype, for compiling ahead of time."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.row_sharding(self.mesh, len(shape)))

    def check(self, row: Row) -> None:
        """Raise a `SamplingError` naming what is wrong with a row this model cannot complete."""
        row.params.check()
        n = len(row.prompt_ids)
        if n == 0:
            raise SamplingError("the prompt is empty: at least one token is needed")
        if n + row.params.max_tokens > self.seq:
            raise SamplingError(
                f"prompt ({n} tokens) + max_tokens ({row.params.max_tokens}) exceed the model's context "
                f"of {self.seq} tokens"
            )
        if row.params.stop and self.tokenizer is None:
            raise SamplingError("stop sequences need a tokenizer")
        if any(not 0 <= t < self.vocab_size for t in row.prompt_ids):
            raise SamplingError(f"prompt ids must be in [0, {self.vocab_size})")

    def engine(self, batch: int | None = None) -> Engine:
        """An engine of `batch` (default `max_batch`) slots, each as long as the model's context."""
        return Engine(self, batch=batch or self.max_batch, slots=self.seq)

    def generate(
        self,
        rows: Sequence[Row],
        *,
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Completion]:
        """Complete every row, at most `max_batch` at a time (a finished row's slot takes the next one).
        `on_text(i, delta)` receives row i's text as it grows (between device calls); a row i with
        `cancelled(i)` true stops at the next one. The first error of any row is raised at the end."""
        for row in rows:
            self.check(row)
        if not rows:
            return []
        batch = next(b for b in self.batch_sizes if b >= min(len(rows), self.max_batch))
        prompt = bucket(max(len(r.prompt_ids) for r in rows), MIN_PROMPT_BUCKET, self.seq)
        output = bucket(max(r.params.max_tokens for r in rows), MIN_OUTPUT_BUCKET, self.seq)
        engine = Engine(self, batch=batch, slots=min(self.seq, prompt + output), subsets=False)
        results: list[Completion | Exception | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            engine.add(row, _Collect(i, results, on_text, cancelled))
        while engine.busy:
            engine.step()
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]


@dataclasses.dataclass
class _Collect:
    """`Generator.generate`'s listener of row i."""

    i: int
    results: list
    text_callback: Callable[[int, str], None] | None
    cancel_callback: Callable[[int], bool] | None

    def on_text(self, delta: str) -> None:
        if self.text_callback is not None:
            self.text_callback(self.i, delta)

    def on_done(self, completion: Completion) -> None:
        self.results[self.i] = completion

    def on_error(self, error: Exception) -> None:
        self.results[self.i] = error

    def cancelled(self) -> bool:
        return self.cancel_callback is not None and self.cancel_callback(self.i)


# ----- params as generation reads them -----


def inference_params_target(shape: Model, abstract_params: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs (with shardings) of the params as generation keeps them: matmul kernels in the
    compute dtype (halving decode's memory traffic in bfloat16), embeddings, biases and norms in float32."""
    specs = sharding.param_specs(abstract_params, sharding.logical_rules())
    shardings = sharding.tree_shardings(mesh, specs)
    dtypes = _inference_dtypes(abstract_params, shape.compute_dtype)
    return jax.tree_util.tree_map(
        lambda p, s, d: jax.ShapeDtypeStruct(p.shape, d, sharding=s), abstract_params, shardings, dtypes
    )


def _inference_dtypes(params: Any, compute_dtype: str) -> Any:
    return {
        module: {name: jnp.dtype(compute_dtype) if name == "w" else jnp.dtype(jnp.float32) for name in leaves}
        for module, leaves in params.items()
    }


def place_params(params: Any, shape: Model, mesh: Mesh) -> Any:
    """`params` (host or device arrays, layers stacked as trained) split over `mesh`, cast as
    `inference_params_target` says, and in the model's decoding layout (`Model.decode_layout`): what decoding
    reads."""
    target = inference_params_target(shape, params, mesh)
    placed = jax.device_put(params, jax.tree_util.tree_map(lambda t: t.sharding, target))
    unstacked = jax.eval_shape(shape.decode_layout, target)
    shardings = sharding.tree_shardings(mesh, sharding.param_specs(unstacked, sharding.logical_rules()))
    cast = lambda p: jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype), p, target)  # noqa: E731
    return jax.jit(lambda p: shape.decode_layout(cast(p)), out_shardings=shardings)(placed)


def load_generator(
    config: Config, ckpt: str, *, tokenizer_path: str | None = None, mesh: Mesh | None = None, **options: Any
) -> Generator:
    """A generator for the params of checkpoint `ckpt` (full, slim, or a model_dir's newest; a LoRA
    fine-tune with its adapters merged: read by `hf.load_pretrained_params`, like training's starting params),
    split over `mesh` (default: `sampling_mesh(config.mp)`), with the run's tokenizer: `tokenizer_path` (a
    tokenizer.json or dataset dir), else the dataset next to the checkpoint, else the config's `tokenizer`."""
    from mesh_transformer.data import find_tokenizer
    from mesh_transformer.hf import load_pretrained_params
    from mesh_transformer.memory import abstract_params
    from mesh_transformer.prepare import read_tokenizer_file

    path = find_tokenizer(ckpt, config, tokenizer_path)
    if path is None:
        raise SamplingError(
            f"no tokenizer found for {ckpt}: pass --tokenizer path/to/tokenizer.json (or a dataset dir)"
        )
    tokenizer = read_tokenizer_file(path)[0]
    mesh = mesh if mesh is not None else sampling_mesh(config.mp)
    shape = model_for(config)
    target = inference_params_target(shape, abstract_params(config), mesh)
    params = load_pretrained_params(ckpt, config, target)
    return Generator(
        shape, params, seq=config.seq, tokenizer=tokenizer, mesh=mesh, tokenizer_path=path, **options
    )


def generate(
    shape: Model,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    seq: int,
    vocab_size: int,
    temperature: float = 1.0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` ids (greedy when temperature == 0); a prompt too long for
    the context keeps its newest tokens."""
    if not prompt_ids:
        raise SamplingError("the prompt must hold at least one token")
    max_new_tokens = min(max_new_tokens, seq - 1)
    if max_new_tokens <= 0:
        return []
    prompt_ids = list(prompt_ids)[-(seq - max_new_tokens) :]
    generator = Generator(shape, params, seq=seq, vocab_size=vocab_size, mesh=mesh)
    settings = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return generator.generate([Row(prompt_ids, settings)])[0].token_ids
