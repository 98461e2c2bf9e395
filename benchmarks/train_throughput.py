"""Training throughput of this project against Hugging Face `transformers` GPT-J, same machine, same run.

The same GPT-J is trained by our jitted step (float32 and bfloat16 compute) and by torch (float32 and bf16
autocast), each with AdamW, at two shapes: "small" (4 layers, d_model 512, 8 heads, rotary 32, vocab 8192;
batch 8 x seq 256) and "large" (8 layers, d_model 1024, 16 heads, seq 512, batch 2). The runs take turns in
rounds, the order reversed every round, so that a change of the machine's load falls on every side; the
figure is the median over rounds, with the spread (max - min) / median of the rounds. Prints tokens/s,
ratios to the best torch run and to torch float32, and MFU against the f32 and bf16 matmul peaks measured
here, under both attention conventions (6*L*D*T, ours; 12*L*D*T, PaLM's and nanoGPT's: metrics.py).

    python benchmarks/train_throughput.py [--shapes small,large] [--rounds 4] [--steps 3] [--threads N]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peers import hf_gptj, torch_step  # noqa: E402

from mesh_transformer import sharding  # noqa: E402
from mesh_transformer.config import from_dict  # noqa: E402
from mesh_transformer.metrics import flops_per_token, measure_matmul_flops  # noqa: E402
from mesh_transformer.models import param_count  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402


def time_steps(step, n_steps: int) -> list[float]:
    """Seconds of each of `n_steps` steps."""
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


# small: the shape of the figures in README; large: a second one, so that a ratio is not one shape's accident
SHAPES = {
    "small": dict(layers=4, d_model=512, n_heads=8, pe_rotary_dims=32, n_vocab=8192, seq=256, batch=8),
    "large": dict(layers=8, d_model=1024, n_heads=16, pe_rotary_dims=32, n_vocab=8192, seq=512, batch=2),
}


def make_trainer(shape: dict, compute_dtype: str):
    """A Trainer on one device for `shape`, its initial state and one batch of random tokens."""
    model_keys = {k: v for k, v in shape.items() if k != "batch"}
    config = from_dict(
        {
            **model_keys,
            "per_replica_batch": shape["batch"],
            "tpu_size": 1,
            "cores_per_replica": 1,
            "compute_dtype": compute_dtype,
            "remat": "none",
            "lr": 1e-4,
            "end_lr": 1e-5,
            "weight_decay": 0.1,
            "warmup_steps": 10,
            "anneal_steps": 100,
            "total_steps": 100,
        }
    )
    trainer = Trainer(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.n_vocab, (1, shape["batch"], config.seq + 1), dtype=np.int32)
    return trainer, trainer.init_state(0), trainer.global_batch(tokens)


def ours(shape: dict, compute_dtype: str):
    """One train step of ours (a closure over its state), and the parameter count."""
    trainer, state, batch = make_trainer(shape, compute_dtype)
    holder = {"s": state}
    n_params = param_count(state.params)

    def step():
        holder["s"], metrics = trainer.step(holder["s"], batch)
        jax.block_until_ready(metrics)

    return step, n_params


def measure(
    shape_name: str, runs_wanted: list[str], rounds: int, steps: int, warmup: int
) -> dict[str, float]:
    """Tokens/s of each run at one shape. Every run is timed `rounds` times, in alternating order (forward,
    then reversed) so that a change of the machine's load falls on all sides: per run the median of its
    rounds' median steps, and the spread (max - min) / median of those round medians."""
    shape = SHAPES[shape_name]
    builders = {
        "mesh_transformer float32": lambda: ours(shape, "float32")[0],
        "mesh_transformer bfloat16": lambda: ours(shape, "bfloat16")[0],
        "transformers float32": lambda: torch_step(hf_gptj(shape), shape["batch"], shape["seq"]),
        "transformers bf16 autocast": lambda: torch_step(hf_gptj(shape), shape["batch"], shape["seq"], True),
    }
    runs = {name: builders[name]() for name in runs_wanted}
    for step in runs.values():  # compile, allocator warm-up
        time_steps(step, warmup)
    round_medians: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            round_medians[name].append(float(np.median(time_steps(runs[name], steps))))

    tokens_per_step = shape["batch"] * shape["seq"]
    seconds = {name: float(np.median(m)) for name, m in round_medians.items()}
    spread = {name: (max(m) - min(m)) / np.median(m) for name, m in round_medians.items()}
    print(f"\n{shape_name} shape {shape}: {rounds} rounds x {steps} steps")
    best_torch = min((s for n, s in seconds.items() if n.startswith("transformers")), default=float("nan"))
    torch_f32 = seconds.get("transformers float32", float("nan"))
    print(f"{'run':30s} {'tokens/s':>10s} {'spread':>7s} {'vs best torch':>14s} {'vs torch f32':>13s}")
    for name, s in seconds.items():
        print(
            f"{name:30s} {tokens_per_step / s:10,.0f} {spread[name]:7.1%} {best_torch / s:13.2f}x "
            f"{torch_f32 / s:12.2f}x"
        )
    return {name: tokens_per_step / s for name, s in seconds.items()}


def print_mfu(shape_name: str, tokens_per_sec: dict[str, float], peak: dict[str, float]) -> None:
    """MFU of each run under both attention conventions (see mesh_transformer/metrics.py)."""
    shape = SHAPES[shape_name]
    config = from_dict({k: v for k, v in shape.items() if k != "batch"})
    fpt = flops_per_token(config)
    fpt_12 = fpt + 6 * config.layers * config.d_model * config.seq  # PaLM / nanoGPT: 12 * L * D * T
    print(f"model FLOPs per token: {fpt / 1e6:.1f} M (6*L*D*T attention), {fpt_12 / 1e6:.1f} M (12*L*D*T)")
    print(f"{'MFU':30s} {'6*L*D*T':>10s} {'12*L*D*T':>9s}")
    for name, tps in tokens_per_sec.items():
        dtype = "bfloat16" if "bf" in name else "float32"
        print(f"{name:30s} {fpt * tps / peak[dtype]:10.1%} {fpt_12 * tps / peak[dtype]:9.1%}")


RUNS = (
    "mesh_transformer float32",
    "mesh_transformer bfloat16",
    "transformers float32",
    "transformers bf16 autocast",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run first (compilation)")
    p.add_argument("--shapes", default="small,large", help="comma-separated, of: " + ",".join(SHAPES))
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of: " + ",".join(RUNS))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each shape's table shows as soon as it is measured
    torch.set_num_threads(args.threads)
    peak = {"float32": measure_matmul_flops("float32"), "bfloat16": measure_matmul_flops("bfloat16")}
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}")
    print(
        f"measured matmul peak: f32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s (MFU divides by the run's dtype's)"
    )
    for shape_name in args.shapes.split(","):
        tokens_per_sec = measure(shape_name, args.runs.split(","), args.rounds, args.steps, args.warmup)
        print_mfu(shape_name, tokens_per_sec, peak)


if __name__ == "__main__":
    main()
