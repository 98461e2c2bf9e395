"""Text generation: a jitted prefill and a KV-cache decode loop (`lax.while_loop`, no Python per token) over
a batch of requests, each with its own temperature, top-k, top-p, token budget, stop strings, EOS and seed.

Batch, prompt and output lengths round up to powers of two, so varied traffic compiles a handful of programs.
Ids at or above the tokenizer's vocabulary are never emitted; each row draws its noise from its own seed and
token index, so a request's output does not depend on what else shares its batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mesh_transformer import sharding
from mesh_transformer.config import Config
from mesh_transformer.errors import UserError
from mesh_transformer.model import KVCache, ModelShape, build, unstack_layers
from mesh_transformer.prepare import EOS_CANDIDATES

MIN_PROMPT_BUCKET = 16
MIN_OUTPUT_BUCKET = 16
UINT32 = 0xFFFFFFFF
MAX_TEMPERATURE = 1e6


class SamplingError(UserError):
    """A generation request that cannot be served (empty prompt, too long, bad sampling value)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings
    seed: int = 0  # any integer; taken modulo 2**64

    def check(self) -> None:
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise SamplingError("stop sequences must be non-empty strings")


@dataclass(frozen=True)
class Row:
    """One completion to generate: a prompt, its settings, and which of a request's n choices it is."""

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    choice: int = 0  # folded into the seed, so n choices of one request differ


@dataclass
class Completion:
    token_ids: list[int]  # the completion's ids, without EOS and cut at a stop string
    text: str  # "" when the generator has no tokenizer
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), or "cancelled"
    generated_tokens: int  # ids the model produced for it, EOS included (the usage count)


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The power of two >= n (at least `minimum`, at most `maximum` if given)."""
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return size if maximum is None else min(size, maximum)


def sampling_mesh(mp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (1, mp) mesh on the first mp devices: the model split like training, the batch not split."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < mp:
        raise SamplingError(
            f"the model is split over {mp} devices (cores_per_replica) but {len(devices)} exist"
        )
    return sharding.make_mesh(1, mp, devices[:mp])


def seed_key(seed: int) -> np.ndarray:
    """A raw uint32[2] threefry key from any integer seed (the same words `jax.random.PRNGKey` makes)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & UINT32], np.uint32)


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
    top-k and top-p filtered distribution with noise from (the row's key, the token's index)."""
    V = logits_BV.shape[-1]
    logits_BV = jnp.where(jnp.arange(V) < vocab_size, logits_BV.astype(jnp.float32), -jnp.inf)
    greedy_B = first_argmax(logits_BV)

    def draw() -> jax.Array:
        scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
        # Sorting the vocabulary costs more than a decode step of a small model: only when a row needs it.
        needs_filter = jnp.any((top_k_B > 0) | (top_p_B < 1))
        scaled_BV = jax.lax.cond(
            needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled_BV, top_k_B, top_p_B
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


def _filter_top_k_top_p(scaled_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    V = scaled_BV.shape[-1]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
    kth_B = jnp.take_along_axis(sorted_BV, jnp.clip(top_k_B - 1, 0, V - 1)[:, None], axis=-1)[:, 0]
    min_k_B = jnp.where(top_k_B > 0, kth_B, -jnp.inf)
    # Keep the smallest prefix of the sorted tokens whose mass reaches top_p (always the first token).
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.maximum(jnp.sum(mass_before_BV < top_p_B[:, None], axis=-1), 1)
    min_p_B = jnp.take_along_axis(sorted_BV, (kept_B - 1)[:, None], axis=-1)[:, 0]
    threshold_B = jnp.maximum(min_k_B, min_p_B)
    return jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)


class _State(NamedTuple):
    """Everything the decode loop carries between device calls."""

    cache: KVCache
    logits_BV: jax.Array  # next-token logits of every row, sampled at the next step
    count_B: jax.Array  # ids generated so far
    done_B: jax.Array
    key_B2: jax.Array
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    max_tokens_B: jax.Array


# The compiled functions are module-level, keyed by their static arguments, so that every generator of one
# model shape on one mesh shares them (a test suite or a restarted server compiles each shape once).
@functools.partial(jax.jit, static_argnames=("shape", "mesh", "slots"))
def _prefill(
    params, tokens_BP, pad_B, seed_B2, choice_B, settings, *, shape: ModelShape, mesh: Mesh, slots: int
):
    """The prompts (left-padded to P) into a fresh cache of `slots` slots; the decode loop's first state."""
    temperature_B, top_k_B, top_p_B, max_tokens_B = settings
    key_B2 = jax.vmap(jax.random.fold_in)(seed_B2, choice_B)
    with sharding.activation_sharding(mesh):
        cache = KVCache.empty(shape, pad_B, slots)
        k, v = jax.lax.with_sharding_constraint(
            (cache.k_BHKS, cache.v_BHSK), sharding.kv_cache_sharding(mesh)
        )
        cache = cache._replace(k_BHKS=k, v_BHSK=v)
        logits_BV, cache = build(shape).apply(params, None, tokens_BP, cache)
    count_B = jnp.zeros_like(pad_B)
    done_B = count_B >= max_tokens_B  # batch filler rows ask for no tokens
    return _State(cache, logits_BV, count_B, done_B, key_B2, temperature_B, top_k_B, top_p_B, max_tokens_B)


@functools.partial(
    jax.jit, static_argnames=("shape", "mesh", "vocab_size", "eos_id", "steps"), donate_argnums=1
)
def _decode(
    params, state: _State, *, shape: ModelShape, mesh: Mesh, vocab_size: int, eos_id: int, steps: int
):
    """Up to `steps` tokens of every live row; returns the state and the ids (B, steps), -1 where none."""
    model = build(shape)
    B = state.count_B.shape[0]

    def step(carry):
        i, s, out_BC = carry
        next_B = sample_next(
            s.logits_BV, s.key_B2, s.count_B, s.temperature_B, s.top_k_B, s.top_p_B, vocab_size
        )
        live_B = ~s.done_B
        out_BC = out_BC.at[:, i].set(jnp.where(live_B, next_B, -1))
        count_B = s.count_B + live_B
        done_B = s.done_B | (next_B == eos_id) | (count_B >= s.max_tokens_B)
        with sharding.activation_sharding(mesh):
            logits_BV, cache = model.apply(params, None, next_B[:, None], s.cache)
        return i + 1, s._replace(cache=cache, logits_BV=logits_BV, count_B=count_B, done_B=done_B), out_BC

    def more(carry):
        i, s, _ = carry
        return (i < steps) & ~jnp.all(s.done_B)

    out_BC = jnp.full((B, steps), -1, jnp.int32)
    _, state, out_BC = jax.lax.while_loop(more, step, (0, state, out_BC))
    return state, out_BC


class _Progress:
    """Host-side text of one row: EOS, stop strings, and the part of the text that is safe to stream."""

    def __init__(self, row: Row, detokenize: Callable[[list[int]], str] | None, eos_id: int | None):
        self.stop = row.params.stop
        self.detokenize, self.eos_id = detokenize, eos_id
        self.ids: list[int] = []
        self.generated = 0
        self.text = ""
        self.emitted = 0  # characters of `text` already handed to the stream callback
        self.finish: str | None = None

    def extend(self, new_ids: Sequence[int], device_done: bool) -> None:
        if self.finish is not None:
            return
        checked = len(self.text)
        for token in new_ids:
            self.generated += 1
            if token == self.eos_id:
                self.finish = "stop"
                break
            self.ids.append(int(token))
        if self.detokenize is not None:
            self.text = self.detokenize(self.ids)
            self._cut_at_stop(max(0, checked - max((len(s) for s in self.stop), default=0)))
        if self.finish is None and device_done:
            self.finish = "length"

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text, self.finish = self.text[:cut], "stop"
        # Ids and usage count end with the id that completed the stop string.
        for n in range(len(self.ids) + 1):
            if any(s in self.detokenize(self.ids[:n]) for s in self.stop):
                self.ids, self.generated = self.ids[:n], n
                break

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


class Generator:
    """Compiled prefill/decode of one model on one mesh; `generate` runs a list of rows in batches."""

    def __init__(
        self,
        shape: ModelShape,
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
    ):
        """`tokenizer` (a `tokenizers.Tokenizer`) gives text, stop strings, the vocabulary size and EOS;
        without it pass `vocab_size` (and `eos_id`), and completions hold ids only. A batch of n rows runs
        padded to the smallest of `batch_sizes` >= n (default: powers of two up to `max_batch`); tokens
        reach `generate`'s caller every `chunk_tokens` tokens."""
        if tokenizer is not None:
            vocab_size = vocab_size or tokenizer.get_vocab_size()
            if eos_id is None:
                eos_id = next(
                    (i for t in EOS_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None), None
                )
        if vocab_size is None:
            raise ValueError("give a tokenizer or vocab_size")
        self.shape, self.seq, self.tokenizer = shape, seq, tokenizer
        self.vocab_size, self.eos_id = min(vocab_size, shape.n_vocab), eos_id
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

    # ----- host side -----
    def generate(
        self,
        rows: Sequence[Row],
        *,
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Completion]:
        """Complete every row (in batches of at most `max_batch`). `on_text(i, delta)` receives row i's text
        as it grows (between device calls); a row i with `cancelled(i)` true stops at the next one."""
        for row in rows:
            self.check(row)
        results: list[Completion] = []
        for start in range(0, len(rows), self.max_batch):
            batch = rows[start : start + self.max_batch]
            shift = lambda f, s=start: None if f is None else (lambda i, *a: f(i + s, *a))  # noqa: E731
            results += self._generate_batch(batch, shift(on_text), shift(cancelled))
        return results

    def check(self, row: Row) -> None:
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

    def _batch_shapes(self, rows: Sequence[Row]) -> tuple[int, int, int]:
        batch = next(b for b in self.batch_sizes if b >= len(rows))
        prompt = bucket(max(len(r.prompt_ids) for r in rows), MIN_PROMPT_BUCKET, self.seq)
        output = bucket(max(r.params.max_tokens for r in rows), MIN_OUTPUT_BUCKET, self.seq)
        return batch, prompt, output

    def _generate_batch(self, rows, on_text, cancelled) -> list[Completion]:
        B, P, N = self._batch_shapes(rows)
        tokens_BP = np.zeros((B, P), np.int32)
        pad_B = np.full(B, P - 1, np.int32)
        seed_B2 = np.zeros((B, 2), np.uint32)
        choice_B = np.zeros(B, np.uint32)
        temperature_B = np.zeros(B, np.float32)
        top_k_B = np.zeros(B, np.int32)
        top_p_B = np.ones(B, np.float32)
        max_tokens_B = np.zeros(B, np.int32)  # filler rows up to the batch bucket: nothing to generate
        for b, row in enumerate(rows):
            ids, p = row.prompt_ids, row.params
            tokens_BP[b, P - len(ids) :] = ids
            pad_B[b] = P - len(ids)
            seed_B2[b] = seed_key(p.seed)
            choice_B[b] = row.choice & UINT32
            # Beyond these bounds nothing changes (a uniform draw; every token kept), and they fit the dtypes.
            temperature_B[b] = min(p.temperature, MAX_TEMPERATURE)
            top_k_B[b] = min(p.top_k, self.vocab_size)
            top_p_B[b], max_tokens_B[b] = p.top_p, p.max_tokens
        put = lambda x: jax.device_put(x, sharding.row_sharding(self.mesh, x.ndim))  # noqa: E731
        settings = tuple(put(x) for x in (temperature_B, top_k_B, top_p_B, max_tokens_B))
        state = _prefill(
            self.params,
            put(tokens_BP),
            put(pad_B),
            put(seed_B2),
            put(choice_B),
            settings,
            shape=self.shape,
            mesh=self.mesh,
            slots=P + N,
        )
        detokenize = None if self.tokenizer is None else self.tokenizer.decode
        progress = [_Progress(row, detokenize, self.eos_id) for row in rows]
        device_done = np.zeros(B, bool)
        device_done[len(rows) :] = True
        steps = bucket(min(self.chunk_tokens, N), 1)
        decode = functools.partial(
            _decode,
            shape=self.shape,
            mesh=self.mesh,
            vocab_size=self.vocab_size,
            eos_id=-1 if self.eos_id is None else self.eos_id,
            steps=steps,
        )
        while True:
            self._report(progress, on_text)
            stopped = device_done.copy()
            for b, p in enumerate(progress):
                if p.finish is None and cancelled is not None and cancelled(b):
                    p.finish = "cancelled"
                stopped[b] |= p.finish is not None
            if stopped[: len(rows)].all():
                break
            if (stopped != device_done).any():
                state = state._replace(done_B=put(stopped))
            state, out_BC = decode(self.params, state)
            out_BC, device_done = np.asarray(out_BC), np.asarray(state.done_B)
            for b, p in enumerate(progress):
                p.extend(out_BC[b][out_BC[b] >= 0], bool(device_done[b]))
        return [Completion(p.ids, p.text, p.finish or "length", p.generated) for p in progress]

    @staticmethod
    def _report(progress: list[_Progress], on_text) -> None:
        if on_text is None:
            return
        for b, p in enumerate(progress):
            if p.finish != "cancelled":
                delta = p.pending()
                if delta:
                    on_text(b, delta)


def inference_params_target(shape: ModelShape, abstract_params: Any, mesh: Mesh) -> Any:
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


def place_params(params: Any, shape: ModelShape, mesh: Mesh) -> Any:
    """`params` (host or device arrays, layers stacked as trained) split over `mesh`, cast as
    `inference_params_target` says, and one array per layer (`model.unstack_layers`): what decoding reads."""
    target = inference_params_target(shape, params, mesh)
    placed = jax.device_put(params, jax.tree_util.tree_map(lambda t: t.sharding, target))
    unstacked = jax.eval_shape(lambda p: unstack_layers(p, shape.layers), target)
    shardings = sharding.tree_shardings(mesh, sharding.param_specs(unstacked, sharding.logical_rules()))
    cast = lambda p: jax.tree_util.tree_map(lambda x, t: x.astype(t.dtype), p, target)  # noqa: E731
    return jax.jit(lambda p: unstack_layers(cast(p), shape.layers), out_shardings=shardings)(placed)


def load_generator(
    config: Config, ckpt: str, *, tokenizer_path: str | None = None, mesh: Mesh | None = None, **options: Any
) -> Generator:
    """A generator for the params of checkpoint `ckpt` (full, slim, or a model_dir's newest), split over
    `mesh` (default: `sampling_mesh(config.mp)`), with the run's tokenizer: `tokenizer_path` (a
    tokenizer.json or dataset dir), else the dataset next to the checkpoint, else the config's `tokenizer`."""
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
    shape = ModelShape.from_config(config)
    params = load_params(ckpt, inference_params_target(shape, abstract_params(config), mesh))
    return Generator(shape, params, seq=config.seq, tokenizer=tokenizer, mesh=mesh, **options)


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
