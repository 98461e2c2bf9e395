"""Serving under open-loop load: requests arrive as a Poisson process at a few rates, with mixed prompt and
output lengths, and three servers of the same weights answer them in turn:

- continuous: this project's engine (16 slots) driven by the server's worker thread, as `--serve` runs it,
  its programs compiled before the first run as the server does at its start (the run fails if the timed
  runs compile anything);
- static: the server's batching before it (a batch closes 20 ms after the last arrival or 200 ms after its
  first, at most 16 rows, and runs to completion through `Generator.generate` before the next one starts);
- transformers: `GPTJForCausalLM`'s continuous batching manager (`init_continuous_batching`, the engine of
  `generate_batch`), its paged cache sized like our engine's, fed the same requests as they arrive.

A 4-layer GPT-J (d_model 512, vocab 8192, float32) generates greedily with no EOS, so every request runs to
its max_tokens. Each system prints throughput (generated tokens per second from the first arrival to the last
answer), requests per second, and the p50/p99 time to first token and total latency; each figure is the median
over `--reps` runs, the systems taking turns in an order that alternates, with the range in brackets. Below
each rate's table: the ceiling no server can pass on that traffic (its tokens over the span of its
arrivals), and each system's share of it: a system at a load it keeps up with is near its ceiling.

    python benchmarks/serve_load.py [--rates 2,6,12] [--requests 48] [--reps 2] [--threads N]
"""

import argparse
import os
import queue
import resource
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sample_throughput import hf_model, word_tokenizer  # noqa: E402

from mesh_transformer.engine import PREFILL_TOKENS, Generator  # noqa: E402
from mesh_transformer.models import build  # noqa: E402
from mesh_transformer.models.gptj import GPTJ  # noqa: E402
from mesh_transformer.sampling import Row, SamplingParams  # noqa: E402
from mesh_transformer.serving.worker import Worker  # noqa: E402

SHAPE = GPTJ(layers=4, d_model=512, n_heads=8, n_vocab=8192, d_ff=2048, rotary_dims=32)
SEQ = 320
SLOTS = 16
PROMPT_LENGTHS = (8, 48)  # uniform
OUTPUT_LENGTHS, OUTPUT_WEIGHTS = (8, 16, 32, 64, 128, 256), (0.3, 0.25, 0.2, 0.12, 0.08, 0.05)
QUIET_S, MAX_WAIT_S = 0.02, 0.2  # the static batcher's window


def workload(n: int, rate: float, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival time, prompt ids, max_tokens) of n requests arriving at `rate` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts = [
        rng.integers(1, SHAPE.n_vocab, rng.integers(*PROMPT_LENGTHS, endpoint=True)).tolist()
        for _ in range(n)
    ]
    outputs = rng.choice(OUTPUT_LENGTHS, n, p=OUTPUT_WEIGHTS)
    return [(float(t), p, int(m)) for t, p, m in zip(arrivals, prompts, outputs, strict=True)]


class Clock:
    """When each request arrived, drew its first token and finished."""

    def __init__(self, n: int):
        self.arrived, self.first, self.done = [np.nan] * n, [np.nan] * n, [np.nan] * n

    def token(self, i: int) -> None:
        if np.isnan(self.first[i]):
            self.first[i] = time.perf_counter()

    def finish(self, i: int) -> None:
        self.done[i] = time.perf_counter()


def drive(requests, submit, clock: Clock) -> None:
    """Submit each request at its arrival time (open loop: nobody waits for an answer), then wait for all."""
    start = time.perf_counter()
    for i, (at, prompt, max_tokens) in enumerate(requests):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        clock.arrived[i] = time.perf_counter()
        submit(i, prompt, max_tokens)
    while any(np.isnan(clock.done)):
        time.sleep(0.005)


class _BenchJob:
    """What the server's worker needs of a request (see `serving.worker.Job`), recording times instead."""

    def __init__(self, i: int, row: Row, clock: Clock):
        self.i, self.rows, self.clock, self.cancelled = i, [row], clock, False

    def send(self, kind: str, *payload) -> None:
        if kind == "text":
            self.clock.token(self.i)
        elif kind == "done":
            self.clock.token(self.i)
            self.clock.finish(self.i)

    def fail(self, message: str) -> None:
        print(f"request {self.i} failed: {message}")
        self.clock.token(self.i)
        self.clock.finish(self.i)


def continuous(generator: Generator):
    engine = generator.engine(SLOTS)
    t0 = time.perf_counter()
    programs = engine.warm_up()  # as the server does at its start
    print(f"continuous engine: warm-up compiled {programs} programs in {time.perf_counter() - t0:.1f} s")
    worker = Worker(engine, max_queue=10_000)

    def run(requests, clock: Clock) -> None:
        drive(requests, lambda i, p, n: worker.submit(_BenchJob(i, greedy(p, n), clock)), clock)

    run.compiles = lambda: engine.compiles
    return run


def static(generator: Generator):
    def run(requests, clock: Clock) -> None:
        arrivals: queue.Queue = queue.Queue()

        def batcher() -> None:
            served = 0
            while served < len(requests):
                batch = [arrivals.get()]
                first = last = time.monotonic()
                while len(batch) < SLOTS:
                    deadline = min(last + QUIET_S, first + MAX_WAIT_S)
                    try:
                        batch.append(arrivals.get(timeout=max(0.0, deadline - time.monotonic())))
                        last = time.monotonic()
                    except queue.Empty:
                        break
                rows = [greedy(p, n) for _, p, n in batch]
                generator.generate(rows, on_text=lambda k, _, b=batch: clock.token(b[k][0]))
                for i, _, _ in batch:
                    clock.token(i)
                    clock.finish(i)
                served += len(batch)

        thread = threading.Thread(target=batcher, daemon=True)
        thread.start()
        drive(requests, lambda i, p, n: arrivals.put((i, p, n)), clock)
        thread.join()

    return run


def transformers_cb(model):
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    config = GenerationConfig(
        max_new_tokens=max(OUTPUT_LENGTHS), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    # Sized like our engine: SLOTS rows of SEQ positions, PREFILL_TOKENS tokens per forward at most. Left to
    # itself it sizes its cache to 90% of the host's free memory (on CPU, psutil's), 9 GB of RSS here.
    page = 256
    batching = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=SLOTS * -(-SEQ // page),
        max_batch_tokens=PREFILL_TOKENS,
        max_requests_per_batch=SLOTS,
    )
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=batching)
    manager.warmup()
    manager.start()

    def run(requests, clock: Clock) -> None:
        ids: dict[str, int] = {}

        def reader() -> None:
            while len([i for i in clock.done if not np.isnan(i)]) < len(requests):
                result = manager.get_result(timeout=0.05)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError(
                            f"transformers' manager stopped: {manager.background_thread_status}"
                        )
                    continue
                i = ids[result.request_id]
                if result.generated_tokens:
                    clock.token(i)
                if result.is_finished():
                    clock.finish(i)

        def submit(i, prompt, max_tokens):
            request_id = f"r{time.perf_counter_ns()}-{i}"
            ids[request_id] = i
            manager.add_request(prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        drive(requests, submit, clock)
        thread.join()

    run.stop = lambda: manager.stop(block=True, timeout=10)
    return run


def greedy(prompt: list[int], max_tokens: int) -> Row:
    return Row(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))


def figures(requests, clock: Clock) -> dict[str, float]:
    arrived, first, done = map(np.asarray, (clock.arrived, clock.first, clock.done))
    span = done.max() - arrived.min()
    tokens = sum(n for _, _, n in requests)
    ttft, latency = first - arrived, done - arrived
    return {
        "tok/s": tokens / span,
        "req/s": len(requests) / span,
        "TTFT p50": np.percentile(ttft, 50),
        "TTFT p99": np.percentile(ttft, 99),
        "latency p50": np.percentile(latency, 50),
        "latency p99": np.percentile(latency, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,6,12", help="request rates (per second), comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--reps", type=int, default=2, help="runs of each system at each rate (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]

    params = jax.jit(build(SHAPE).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree_util.tree_map(np.asarray, params)
    tokenizer = word_tokenizer()
    ours = Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, max_batch=SLOTS, chunk_tokens=16)
    old = Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, max_batch=SLOTS, batch_sizes=(4, SLOTS))
    systems = {
        "continuous": continuous(ours),
        "static": static(old),
        "transformers": transformers_cb(hf_model(SHAPE, params, positions=SEQ)),
    }

    print(
        f"GPT-J d_model {SHAPE.d_model}, {SHAPE.layers} layers, vocab {SHAPE.n_vocab}, float32, greedy; "
        f"{args.requests} requests per run, prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, outputs "
        f"{'/'.join(map(str, OUTPUT_LENGTHS))} tokens; {SLOTS} slots; {jax.devices()[0].platform}, "
        f"torch threads {args.threads}; median of {args.reps} [range]; load average {os.getloadavg()[0]:.1f}"
    )
    columns = ["tok/s", "req/s", "TTFT p50", "TTFT p99", "latency p50", "latency p99"]
    print(f"{'rate/s':>6} {'system':>12} " + " ".join(f"{c:>17}" for c in columns))
    for rate in rates:
        requests = workload(args.requests, rate, seed=int(rate * 100))
        for run in systems.values():  # untimed: the static batcher compiles the shapes this traffic forms
            run(requests, Clock(len(requests)))
        compiles = systems["continuous"].compiles()
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for rep in range(args.reps):
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for name in order:
                clock = Clock(len(requests))
                systems[name](requests, clock)
                results[name].append(figures(requests, clock))
        report(rate, results, columns, ceiling(requests))
        assert systems["continuous"].compiles() == compiles, "the warmed-up engine compiled during the runs"
    systems["transformers"].stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process {peak:.1f} GiB; load average {os.getloadavg()[0]:.1f} at the end")


def ceiling(requests) -> float:
    """The throughput no server can pass on these requests: their tokens over the time their arrivals span
    (the throughput's span runs from the first arrival to the last answer)."""
    arrivals = [at for at, _, _ in requests]
    return sum(n for _, _, n in requests) / (max(arrivals) - min(arrivals))


def report(rate: float, results: dict[str, list[dict]], columns: list[str], most: float) -> None:
    median = lambda name, column: float(np.median([r[column] for r in results[name]]))  # noqa: E731
    for name, runs in results.items():
        cells = []
        for column in columns:
            values = [r[column] * (1 if "/s" in column else 1000) for r in runs]
            unit = "" if "/s" in column else " ms"
            cells.append(f"{np.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]{unit}")
        print(f"{rate:>6g} {name:>12} " + " ".join(f"{c:>17}" for c in cells))
    throughput = {name: median("continuous", "tok/s") / median(name, "tok/s") for name in results}
    ttft = median("static", "TTFT p99") / median("continuous", "TTFT p99")
    print(
        f"{'':>6} continuous: {throughput['static']:.2f}x the static batcher's throughput with a {ttft:.1f}x "
        f"lower p99 TTFT; {throughput['transformers']:.2f}x transformers' throughput",
    )
    shares = ", ".join(f"{name} {median(name, 'tok/s') / most:.0%}" for name in results)
    print(f"{'':>6} ceiling (tokens over the arrivals' span) {most:,.0f} tok/s: {shares} of it", flush=True)


if __name__ == "__main__":
    main()
