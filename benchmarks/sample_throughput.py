"""Generation throughput of this project against Hugging Face `transformers` GPT-J, same machine, same run;
and the HTTP server under 16 concurrent clients against offline batched generation.

Two small GPT-Js in float32 - the demo config's shape (4 layers, d_model 256, vocab 4096) and a wider one
(4 layers, d_model 512, vocab 8192) - with the same weights on both sides (converted with `hf.hf_tensors`)
generate 128 new tokens greedily after a 32-token prompt at batch 1 and 8: our jitted prefill + KV-cache
while_loop against `GPTJForCausalLM.generate` (KV cache on, torch CPU), timed alternately so that a busy
machine slows both alike. A third column times the model's weight matmuls alone for as many dependent
steps (no attention, norms or sampling): the memory-bandwidth floor of a decode step. Then
16 clients send requests (prompt 32, 128 new tokens, greedy) to the server on 127.0.0.1 at the same time,
each sending its next request as soon as the last one is answered; their aggregate new tokens/s is compared
with one offline `generate` call over 16 rows.

    python benchmarks/sample_throughput.py [--reps 5] [--rounds 3] [--threads N]
"""

import argparse
import asyncio
import os
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mesh_transformer.engine import Generator  # noqa: E402
from mesh_transformer.hf import hf_tensors  # noqa: E402
from mesh_transformer.models import Model, build  # noqa: E402
from mesh_transformer.models.gptj import GPTJ  # noqa: E402
from mesh_transformer.sampling import Row, SamplingParams  # noqa: E402

SHAPES = {
    "demo": GPTJ(layers=4, d_model=256, n_heads=4, n_vocab=4096, d_ff=1024, rotary_dims=32),
    "wide": GPTJ(layers=4, d_model=512, n_heads=8, n_vocab=8192, d_ff=2048, rotary_dims=32),
}
SHAPE = SHAPES["wide"]  # the server measurement's model
LAYER_MATRICES = ("qkv_proj", "out_proj", "fc_in", "fc_out")  # as generation keeps them
SEQ, PROMPT, NEW, CLIENTS = 256, 32, 128, 16
PAUSE = 0.5  # seconds between timed calls


def call_times(fns: list, reps: int) -> list[list[float]]:
    """Seconds of each function's calls, called in turn `reps` times after an untimed warm-up call each.
    Each call starts after a pause, so that the other side's worker threads (OpenMP's and XLA's spin a while
    after their work) have gone idle and do not take a core from it."""
    for fn in fns:
        fn()  # compilation / allocator warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times, strict=True):
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return times


def median_seconds(fns: list, reps: int) -> list[float]:
    """Median seconds of each function, timed by `call_times`."""
    return [float(np.median(t)) for t in call_times(fns, reps)]


def prompts(batch: int, n_vocab: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, n_vocab, (batch, PROMPT))


def ours(generator: Generator, batch: int, out: dict):
    """A function generating for `batch` prompts with our generator; it leaves the ids in out["ours"]."""
    rows = [
        Row(p.tolist(), SamplingParams(max_tokens=NEW, temperature=0))
        for p in prompts(batch, generator.shape.n_vocab)
    ]

    def run():
        out["ours"] = [c.token_ids for c in generator.generate(rows)]

    return run


def weights_only(generator: Generator, batch: int):
    """A function running just the model's weight matmuls for NEW decode steps, each step's input depending
    on the last one's output: the floor a decode step cannot go below (it reads every weight once)."""
    params, shape = generator.params, generator.shape
    layers = [params[f"gptj/layer_{i}/{m}"]["w"] for i in range(shape.layers) for m in LAYER_MATRICES]
    head = params["gptj/lm_head"]["w"]

    def step(_, x_BD):
        for i in range(0, len(layers), len(LAYER_MATRICES)):
            qkv, out, fc_in, fc_out = layers[i : i + len(LAYER_MATRICES)]
            attn_BD = jnp.tanh(jnp.einsum("bd,dce->be", x_BD, qkv)) @ out
            x_BD = x_BD + 1e-3 * (attn_BD + jnp.tanh(x_BD @ fc_in) @ fc_out)
        return x_BD + 1e-3 * (x_BD @ head)[:, : x_BD.shape[1]]

    x_BD = jnp.full((batch, shape.d_model), 0.01, jnp.float32)
    loop = jax.jit(lambda x_BD: jax.lax.fori_loop(0, NEW, step, x_BD))
    run = loop.lower(x_BD).compile(generator.compiler_options)  # the dot kernels the engine's programs use
    return lambda: run(x_BD).block_until_ready()


def hf_model(shape: Model, params, positions: int = SEQ):
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        vocab_size=shape.n_vocab,
        n_positions=positions,
        n_embd=shape.d_model,
        n_layer=shape.layers,
        n_head=shape.n_heads,
        rotary_dim=shape.rotary_dims,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,  # never reached: every generation is forced to NEW tokens
    )
    model = GPTJForCausalLM(config).eval()
    state = {name: torch.from_numpy(np.array(v)) for name, v in hf_tensors(params, shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), (
        missing,
        unexpected,
    )
    return model


def theirs(model, batch: int, out: dict):
    """A function generating for the same prompts with transformers; it leaves the ids in out["theirs"]."""
    input_ids = torch.from_numpy(prompts(batch, model.config.vocab_size)).long()

    def run():
        with torch.inference_mode():
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
            )
        out["theirs"] = generated[:, PROMPT:].tolist()

    return run


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose greedy tokens agree up to the first difference, averaged (float ties aside)."""
    fractions = []
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        fractions.append(same / len(x))
    return float(np.mean(fractions))


def word_tokenizer():
    """One word per id ("t0" .. "t8191"), so that prompts of exactly 32 tokens can be sent as text too."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SHAPE.n_vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def server_vs_offline(params, rounds: int) -> tuple[float, float, float]:
    import uvicorn

    from mesh_transformer.serving import ServerOptions, build_app

    generator = Generator(
        SHAPE, params, seq=SEQ, tokenizer=word_tokenizer(), max_batch=CLIENTS, chunk_tokens=32
    )
    (offline_seconds,) = median_seconds([ours(generator, CLIENTS, {})], reps=2)
    offline_rate = CLIENTS * NEW / offline_seconds

    app = build_app(generator, ServerOptions(model_name="bench", max_batch=CLIENTS, warm_up=True))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    bodies = [
        {"prompt": p.tolist(), "max_tokens": NEW, "temperature": 0} for p in prompts(CLIENTS, SHAPE.n_vocab)
    ]

    async def client(http: httpx.AsyncClient, body: dict, n: int) -> int:
        tokens = 0
        for _ in range(n):
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    async def load(n: int) -> int:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as http:
            return sum(await asyncio.gather(*(client(http, b, n) for b in bodies)))

    asyncio.run(load(1))  # untimed: the connections open, the caches fill
    calls_before = app.state.worker.engine.device_calls
    t0 = time.perf_counter()
    tokens = asyncio.run(load(rounds))
    served_rate = tokens / (time.perf_counter() - t0)
    calls_per_token = (app.state.worker.engine.device_calls - calls_before) / tokens
    server.should_exit = True
    thread.join(timeout=60)
    return served_rate, offline_rate, calls_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed generate calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="requests each server client sends, timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"prompt {PROMPT}, {NEW} new tokens, greedy, float32; "
        f"{jax.devices()[0].platform}, torch threads {args.threads}"
    )
    print(
        f"{'model':>26} {'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} "
        f"{'ratio':>6} {'same ids':>9} {'weights-only floor tok/s':>25}"
    )
    for name, shape in SHAPES.items():
        params = jax.jit(build(shape).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        params = jax.tree_util.tree_map(np.asarray, params)
        generator = Generator(shape, params, seq=SEQ, vocab_size=shape.n_vocab, max_batch=8, chunk_tokens=NEW)
        model = hf_model(shape, params)
        label = f"{name} (d {shape.d_model}, V {shape.n_vocab})"
        for batch in (1, 8):
            out: dict = {}
            ours_s, their_s, floor_s = median_seconds(
                [ours(generator, batch, out), theirs(model, batch, out), weights_only(generator, batch)],
                args.reps,
            )
            print(
                f"{label:>26} {batch:>5} {batch * NEW / ours_s:>11,.0f} {batch * NEW / their_s:>19,.0f} "
                f"{their_s / ours_s:>5.2f}x {agreement(out['ours'], out['theirs']):>9.0%} "
                f"{batch * NEW / floor_s:>25,.0f}"
            )

    served, offline, calls_per_token = server_vs_offline(params, args.rounds)
    print(
        f"server, {CLIENTS} concurrent clients: {served:,.0f} tok/s; offline batch of {CLIENTS}: "
        f"{offline:,.0f} tok/s; ratio {served / offline:.2f}x ({calls_per_token:.3f} device calls per token)"
    )


if __name__ == "__main__":
    main()
