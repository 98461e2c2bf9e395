"""Training and greedy generation of a Pythia-shaped GPT-NeoX against Hugging Face `GPTNeoXForCausalLM`,
same machine, same run, same weights.

The model has Pythia-70M's block (6 layers, d_model 512, 8 heads, rotary on 25% of each head in the
rotate-half layout, parallel residual, two LayerNorms, biases, untied `embed_out`) and a vocabulary of 8192.
Training: batch 8 x seq 256 with AdamW, our jitted step (float32 and bfloat16 compute) against torch (float32
and bf16 autocast). Generation: 128 new tokens greedily after a 32-token prompt at batch 1 and 8, our prefill
+ KV-cache loop against `generate` (KV cache on). The sides are timed in turn, one call each per round, so
that a busy machine slows all alike; each figure is the median of the rounds, with the min-max of the
rounds' tokens/s in brackets.

    python benchmarks/pythia_throughput.py [--reps 5] [--threads N]
    taskset -c 1 python benchmarks/pythia_throughput.py --threads 1   # one core a side, on a shared machine
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peers import torch_step  # noqa: E402
from sample_throughput import NEW, SEQ, agreement, call_times, ours, theirs  # noqa: E402

from mesh_transformer import sharding  # noqa: E402
from mesh_transformer.config import from_dict  # noqa: E402
from mesh_transformer.engine import Generator  # noqa: E402
from mesh_transformer.hf import hf_tensors  # noqa: E402
from mesh_transformer.metrics import flops_per_token, measure_matmul_flops  # noqa: E402
from mesh_transformer.models import model_for, param_count  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402

SHAPE = dict(
    architecture="gpt_neox", layers=6, d_model=512, n_heads=8, n_vocab=8192, seq=SEQ, rotary_pct=0.25
)
BATCH = 8


def rate(work: float, seconds: list[float]) -> str:
    """work / median seconds, and the rounds' min-max."""
    rates = [work / s for s in seconds]
    return f"{work / np.median(seconds):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def config(compute_dtype: str = "float32"):
    return from_dict(
        {
            **SHAPE,
            "per_replica_batch": BATCH,
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


def our_step(compute_dtype: str):
    trainer = Trainer(config(compute_dtype), sharding.make_mesh(1, 1, jax.devices()[:1]))
    state = {"s": trainer.init_state(0)}
    tokens = np.random.default_rng(0).integers(0, SHAPE["n_vocab"], (1, BATCH, SEQ + 1), dtype=np.int32)
    batch = trainer.global_batch(tokens)

    def step():
        state["s"], metrics = trainer.step(state["s"], batch)
        jax.block_until_ready(metrics)

    return step


def hf_model(params):
    """GPTNeoXForCausalLM of SHAPE holding `params` (our layout, converted by `hf.hf_tensors`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = model_for(config())
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**model.hf_config(SEQ, 0, 0), attn_implementation="eager"))
    state = {name: torch.from_numpy(np.array(v)) for name, v in hf_tensors(params, model)}
    state["lm_head.weight"] = state.pop("embed_out.weight")  # transformers 5's name for it once loaded
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def training(reps: int) -> None:
    peak = {"float32": measure_matmul_flops("float32"), "bfloat16": measure_matmul_flops("bfloat16")}
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    params = jax.device_get(Trainer(config(), mesh).init_state(0).params)
    sides = {
        "mesh_transformer float32": (our_step("float32"), "float32"),
        "mesh_transformer bfloat16": (our_step("bfloat16"), "bfloat16"),
        "transformers float32": (torch_step(hf_model(params), BATCH, SEQ), "float32"),
        "transformers bf16 autocast": (torch_step(hf_model(params), BATCH, SEQ, True), "bfloat16"),
    }
    times = dict(zip(sides, call_times([fn for fn, _ in sides.values()], reps), strict=True))
    fpt, tokens = flops_per_token(config()), BATCH * SEQ
    print(f"training: {param_count(params):,} params, {fpt / 1e6:.1f} MFLOP per token, batch {BATCH} x {SEQ}")
    f32, bf16 = peak["float32"] / 1e9, peak["bfloat16"] / 1e9
    print(f"  matmul peak measured here: f32 {f32:.0f} GFLOP/s, bf16 {bf16:.0f}")
    best_torch = min(np.median(times["transformers float32"]), np.median(times["transformers bf16 autocast"]))
    print(f"  {'run':28s} {'tokens/s (min-max)':>24s} {'vs best torch':>14s} {'MFU':>7s}")
    for name, (_, dtype) in sides.items():
        seconds = float(np.median(times[name]))
        mfu = fpt * tokens / seconds / peak[dtype]
        print(f"  {name:28s} {rate(tokens, times[name]):>24s} {best_torch / seconds:13.2f}x {mfu:7.1%}")


def generation(reps: int) -> None:
    model = model_for(config())
    params = jax.tree.map(
        np.asarray, jax.jit(model.transformed().init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    )
    generator = Generator(model, params, seq=SEQ, vocab_size=model.n_vocab, max_batch=8, chunk_tokens=NEW)
    hf = hf_model(params).eval()
    print(f"generation: 32-token prompt, {NEW} new tokens, greedy, float32")
    print(
        f"  {'batch':>5} {'ours tok/s (min-max)':>24} {'transformers tok/s (min-max)':>30} {'ratio':>6} "
        f"{'same ids':>9}"
    )
    for batch in (1, 8):
        out: dict = {}
        mine, others = call_times([ours(generator, batch, out), theirs(hf, batch, out)], reps)
        ratio = np.median(others) / np.median(mine)
        print(
            f"  {batch:>5} {rate(batch * NEW, mine):>24} {rate(batch * NEW, others):>30} {ratio:5.2f}x "
            f"{agreement(out['ours'], out['theirs']):>9.0%}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed rounds per measurement (median, min-max)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}")
    training(args.reps)
    generation(args.reps)


if __name__ == "__main__":
    main()
