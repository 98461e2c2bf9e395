"""Training throughput of this project against Hugging Face `transformers` GPT-J, same machine, same run.

The same small GPT-J (4 layers, d_model 512, 8 heads, rotary 32, vocab 8192; batch 8 x seq 256) is trained
for a few steps by our jitted step (float32 and bfloat16 compute) and by torch (float32 and bf16 autocast),
each with AdamW. Prints tokens/s, ratios to torch, and MFU against the f32 and bf16 matmul peaks measured
here.
MFU uses model FLOPs per token = 6N + 6*L*D*T (see mesh_transformer/metrics.py).

    python benchmarks/train_throughput.py [--steps 5] [--threads N]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mesh_transformer import sharding  # noqa: E402
from mesh_transformer.config import from_dict  # noqa: E402
from mesh_transformer.metrics import flops_per_token, measure_matmul_flops  # noqa: E402
from mesh_transformer.models import param_count  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402

SHAPE = dict(layers=4, d_model=512, n_heads=8, pe_rotary_dims=32, n_vocab=8192, seq=256)
BATCH = 8


def time_steps(step, n_steps: int, warmup: int = 2) -> float:
    """Median seconds of one step after `warmup` untimed steps (compilation, allocator warm-up)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ours(compute_dtype: str, n_steps: int) -> tuple[float, int]:
    config = from_dict(
        {
            **SHAPE,
            "per_replica_batch": BATCH,
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
    state = {"s": trainer.init_state(0)}
    tokens = np.random.default_rng(0).integers(0, config.n_vocab, (1, BATCH, config.seq + 1), dtype=np.int32)
    batch = trainer.global_batch(tokens)

    def step():
        state["s"], metrics = trainer.step(state["s"], batch)
        jax.block_until_ready(metrics)

    return time_steps(step, n_steps), param_count(state["s"].params)


def torch_gptj(autocast_bf16: bool, n_steps: int) -> float:
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(
        vocab_size=SHAPE["n_vocab"],
        n_positions=SHAPE["seq"],
        n_embd=SHAPE["d_model"],
        n_layer=SHAPE["layers"],
        n_head=SHAPE["n_heads"],
        rotary_dim=SHAPE["pe_rotary_dims"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPTJForCausalLM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, SHAPE["n_vocab"], (BATCH, SHAPE["seq"] + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, n_steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tokens_per_step = BATCH * SHAPE["seq"]
    peak = {"float32": measure_matmul_flops("float32"), "bfloat16": measure_matmul_flops("bfloat16")}
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}")
    print(
        f"measured matmul peak: f32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s"
    )

    results = {}
    n_params = None
    for dtype in ("float32", "bfloat16"):
        seconds, n_params = ours(dtype, args.steps)
        results[f"mesh_transformer {dtype}"] = (seconds, dtype)
    results["transformers float32"] = (torch_gptj(False, args.steps), "float32")
    results["transformers bf16 autocast"] = (torch_gptj(True, args.steps), "bfloat16")

    config = from_dict({**SHAPE, "per_replica_batch": BATCH})
    fpt = flops_per_token(config)
    print(f"model: {n_params:,} params, {fpt / 1e6:.1f} MFLOP per token, batch {BATCH} x {SHAPE['seq']}")
    torch_best = min(results["transformers float32"][0], results["transformers bf16 autocast"][0])
    print(f"{'run':30s} {'tokens/s':>10s} {'vs best torch':>14s} {'MFU':>7s}")
    for name, (seconds, dtype) in results.items():
        tps = tokens_per_step / seconds
        print(f"{name:30s} {tps:10,.0f} {torch_best / seconds:13.2f}x {fpt * tps / peak[dtype]:7.1%}")


if __name__ == "__main__":
    main()
