"""Generation on the device: continuous batching over the slots of one KV cache.

An `Engine` keeps B rows ("slots") of a KV cache of S positions on the mesh, each holding one completion at
its own position. Between decode chunks, waiting rows are prefilled together into free slots (batch and
prompt length rounded up to a few sizes, so traffic compiles a handful of programs) and draw their first
token at once; a decode chunk (a jitted `lax.while_loop`, no Python per token) then advances every live row.
A row that finishes (EOS, max_tokens, a stop string, a cancelled request) frees its slot for the next
arrival. The engine calls the model's `apply` with a `KVCache` and knows nothing else of the architecture.

`Generator` is a model on a mesh with its tokenizer: `generate(rows)` runs rows through an engine sized for
them (offline), `engine()` makes the long-lived one a server drives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
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
PREFILL_TOKENS = 2048  # padded prompt tokens prefilled in one call at most (unless one prompt is longer)


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


# The compiled functions are module-level, keyed by their static arguments, so that every engine of one
# model shape on one mesh shares them (a test suite or a restarted server compiles each shape once).
@functools.partial(
    jax.jit,
    static_argnames=("shape", "mesh", "vocab_size", "eos_id", "prompt_logprobs"),
    donate_argnums=1,
)
def _insert(
    params,
    state: SlotState,
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
    prompt_logprobs: bool,
) -> tuple[SlotState, Sampled, Logprobs | None]:
    """Prefill A prompts (right-padded to P) into a fresh cache, copy it into the slots `slot_A` (a slot past
    the batch is a filler row, dropped), and draw each row's first id; with `prompt_logprobs`, also score
    every prompt token after the first (entry t - 1 is token t's)."""
    temperature_A, top_k_A, top_p_A, max_tokens_A, logprobs_A = settings
    A, P = tokens_AP.shape
    key_A2 = jax.vmap(jax.random.fold_in)(seed_A2, choice_A)
    with sharding.activation_sharding(mesh):
        fresh = KVCache.empty(shape, A, P)
        k, v = jax.lax.with_sharding_constraint(
            (fresh.k_BHKS, fresh.v_BHSK), sharding.kv_cache_sharding(mesh)
        )
        logits_APV, fresh = build(shape).apply(params, None, tokens_AP, fresh._replace(k_BHKS=k, v_BHSK=v))
    last_AV = jnp.take_along_axis(logits_APV, (length_A - 1)[:, None, None], axis=1)[:, 0]
    first_A = sample_next(
        last_AV, key_A2, jnp.zeros_like(length_A), temperature_A, top_k_A, top_p_A, vocab_size
    )
    wanted_A = max_tokens_A > 0
    first_A = jnp.where(wanted_A, first_A, -1)
    count_A = wanted_A.astype(jnp.int32)
    done_A = (count_A >= max_tokens_A) | (first_A == eos_id)

    put = lambda x, new: x.at[slot_A].set(new, mode="drop")  # noqa: E731
    cache = KVCache(
        tuple(
            k.at[slot_A, :, :, :P].set(f, mode="drop")
            for k, f in zip(state.cache.k_BHKS, fresh.k_BHKS, strict=True)
        ),
        tuple(
            v.at[slot_A, :, :P].set(f, mode="drop")
            for v, f in zip(state.cache.v_BHSK, fresh.v_BHSK, strict=True)
        ),
        put(state.cache.length_B, length_A),
    )
    state = SlotState(
        cache,
        put(state.next_B, first_A),
        put(state.count_B, count_A),
        put(state.done_B, done_A),
        put(state.key_B2, key_A2),
        put(state.temperature_B, temperature_A),
        put(state.top_k_B, top_k_A),
        put(state.top_p_B, top_p_A),
        put(state.max_tokens_B, max_tokens_A),
        put(state.logprobs_B, logprobs_A),
    )
    first = Sampled(first_A, token_logprobs(last_AV, first_A, vocab_size))
    prompt = token_logprobs(logits_APV[:, :-1], tokens_AP[:, 1:], vocab_size) if prompt_logprobs else None
    return _pin(state, mesh), first, prompt


@functools.partial(
    jax.jit, static_argnames=("shape", "mesh", "vocab_size", "eos_id", "steps"), donate_argnums=1
)
def _decode(
    params,
    state: SlotState,
    release_B,
    limit,
    stop_early,
    *,
    shape: Model,
    mesh: Mesh,
    vocab_size: int,
    eos_id: int,
    steps: int,
) -> tuple[SlotState, Sampled]:
    """Up to `limit` (<= `steps`) ids of every live row, after marking the `release_B` rows done. Stops
    early once no row is live, or with `stop_early` (a request waits for a slot) once a row finishes."""
    model = build(shape)
    B = state.done_B.shape[0]
    state = state._replace(done_B=state.done_B | release_B)
    done_before_B = state.done_B
    zeros = lambda dtype, *shape_: jnp.zeros((B, *shape_), dtype)  # noqa: E731
    N = MAX_LOGPROBS
    no_logprobs = Logprobs(zeros(jnp.float32), zeros(jnp.int32, N), zeros(jnp.float32, N))

    def step(carry):
        i, s, out = carry
        with sharding.activation_sharding(mesh):
            logits_B1V, cache = model.apply(params, None, s.next_B[:, None], s.cache)
        logits_BV = logits_B1V[:, 0]
        next_B = sample_next(
            logits_BV, s.key_B2, s.count_B, s.temperature_B, s.top_k_B, s.top_p_B, vocab_size
        )
        live_B = ~s.done_B
        logprobs = jax.lax.cond(
            jnp.any(live_B & s.logprobs_B),
            lambda: token_logprobs(logits_BV, next_B, vocab_size),
            lambda: no_logprobs,
        )
        drawn = Sampled(jnp.where(live_B, next_B, -1), logprobs)
        out = jax.tree.map(lambda o, x: o.at[:, i].set(x), out, drawn)
        count_B = s.count_B + live_B
        done_B = s.done_B | (next_B == eos_id) | (count_B >= s.max_tokens_B)
        return i + 1, s._replace(cache=cache, next_B=next_B, count_B=count_B, done_B=done_B), out

    def more(carry):
        i, s, _ = carry
        finished = jnp.any(s.done_B & ~done_before_B)
        return (i < limit) & ~jnp.all(s.done_B) & ~(stop_early & finished)

    out = Sampled(
        jnp.full((B, steps), -1, jnp.int32),
        Logprobs(zeros(jnp.float32, steps), zeros(jnp.int32, steps, N), zeros(jnp.float32, steps, N)),
    )
    _, state, out = jax.lax.while_loop(more, step, (0, state, out))
    return _pin(state, mesh), out


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

    A device call that fails fails the rows it was for (a failed decode: every live row) and the engine goes
    on with the others; a listener that raises fails its own row only."""

    def __init__(self, generator: Generator, *, batch: int, slots: int, prefill_tokens: int = PREFILL_TOKENS):
        assert batch % generator.mesh.shape[sharding.DP] == 0, "rows are split evenly over dp"
        self.generator, self.batch, self.slots = generator, batch, slots
        self.prefill_tokens = max(prefill_tokens, slots)
        self.insert_sizes = sorted({b for b in generator.batch_sizes if b < batch} | {batch})
        self.chunk_tokens = generator.chunk_tokens
        g = generator
        self._programs = dict(shape=g.shape, mesh=g.mesh, vocab_size=g.vocab_size, eos_id=g.eos_id_or_none)
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

    # ----- admitting rows -----

    def _take_arrivals(self) -> list[tuple[Row, Listener]]:
        """The waiting rows (oldest first) that fit the free slots and one prefill call's token budget."""
        taken: list[tuple[Row, Listener]] = []
        longest = 0
        while self._waiting and len(taken) < len(self._free):
            row, listener = self._waiting[0]
            if listener.cancelled():
                self._waiting.popleft()
                self.report(listener.on_done, Completion([], "", "cancelled", 0))
                continue
            n = max(longest, len(row.prompt_ids))
            rows = next(b for b in self.insert_sizes if b > len(taken))
            if taken and rows * bucket(n, MIN_PROMPT_BUCKET, self.slots) > self.prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            longest = n
        return taken

    def _admit(self) -> None:
        taken = self._take_arrivals()
        if not taken:
            return
        A = next(b for b in self.insert_sizes if b >= len(taken))
        P = bucket(max(len(row.prompt_ids) for row, _ in taken), MIN_PROMPT_BUCKET, self.slots)
        tokens_AP = np.zeros((A, P), np.int32)
        length_A = np.ones(A, np.int32)  # filler rows: one token, nothing to generate
        slot_A = np.full(A, self.batch, np.int32)  # past the batch: dropped
        seed_A2, choice_A = np.zeros((A, 2), np.uint32), np.zeros(A, np.uint32)
        temperature_A, top_p_A = np.zeros(A, np.float32), np.ones(A, np.float32)
        top_k_A, max_tokens_A = np.zeros(A, np.int32), np.zeros(A, np.int32)
        logprobs_A = np.zeros(A, bool)
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
        put = self.generator.put_rows
        settings = tuple(put(x) for x in (temperature_A, top_k_A, top_p_A, max_tokens_A, logprobs_A))
        with_prompt = any(row.params.prompt_logprobs for row, _ in taken)
        try:
            state, first, prompt = _insert(
                self.generator.params,
                self._state if self._state is not None else self._empty(),
                *(put(x) for x in (tokens_AP, length_A, slot_A, seed_A2, choice_A)),
                settings,
                prompt_logprobs=with_prompt,
                **self._programs,
            )
            first, prompt = jax.device_get((first, prompt))
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
            ids = [int(first.ids[a])] if first.ids[a] >= 0 else []
            logprobs = [_token_logprob(first.logprobs, (a,), t, row.params.logprobs) for t in ids]
            self._deliver(slot, ids, logprobs, device_done=len(ids) >= row.params.max_tokens)

    def _empty(self) -> SlotState:
        g = self.generator
        return _empty_state(shape=g.shape, mesh=g.mesh, batch=self.batch, slots=self.slots)

    # ----- decoding -----

    def _decode_chunk(self) -> None:
        stop_early = bool(self._waiting) and not self._free  # a waiting row needs a slot
        put = self.generator.put_rows
        try:
            state, out = _decode(
                self.generator.params,
                self._state,
                put(self._release.copy()),
                np.int32(self.chunk_tokens),
                np.bool_(stop_early),
                steps=self.chunk_tokens,
                **self._programs,
            )
            out, done_B = jax.device_get((out, state.done_B))
        except Exception as error:  # noqa: BLE001 - every live row is answered with it
            self._reset(error)
            return
        self._state = state
        self._release[:] = False
        self.device_calls += 1
        for slot, live in list(self._live.items()):
            drawn = out.ids[slot] >= 0
            ids = out.ids[slot][drawn].tolist()
            logprobs = []
            if live.row.params.logprobs is not None:
                steps = np.flatnonzero(drawn)
                logprobs = [
                    _token_logprob(out.logprobs, (slot, c), t, live.row.params.logprobs)
                    for c, t in zip(steps, ids, strict=True)
                ]
            self._deliver(slot, ids, logprobs, bool(done_B[slot]))

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

    def put_rows(self, x: np.ndarray) -> jax.Array:
        """A per-row host array on the mesh, rows split over dp."""
        return jax.device_put(x, sharding.row_sharding(self.mesh, x.ndim))

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
        engine = Engine(self, batch=batch, slots=min(self.seq, prompt + output))
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
    """A generator for the params of checkpoint `ckpt` (full, slim, or a model_dir's newest), split over
    `mesh` (default: `sampling_mesh(config.mp)`), with the run's tokenizer: `tokenizer_path` (a
    tokenizer.json or dataset dir), else the dataset next to the checkpoint, else the config's `tokenizer`."""
    from mesh_transformer import lora
    from mesh_transformer.checkpoint import load_params
    from mesh_transformer.data import find_tokenizer
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
    if lora.is_peft_folder(ckpt) or lora.lora_info(ckpt) is not None:
        params = lora.load_merged(ckpt, config)  # adapters merged at load: decoding is the base model's
    else:
        params = load_params(ckpt, inference_params_target(shape, abstract_params(config), mesh))
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
