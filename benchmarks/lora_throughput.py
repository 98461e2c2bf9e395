"""LoRA training step against full fine-tuning of the same model, and against `peft` + `transformers` training
the same adapters, same machine, same run.

A small GPT-J (4 layers, d_model 512, 8 heads, rotary 32, vocab 8192; batch 8 x seq 256, float32) with rank-16
adapters on q, k, v, out, fc_in and fc_out (alpha 32): our LoRA step (`lora.LoraTrainer`), our full
fine-tuning step (`train.Trainer`), and a `peft.get_peft_model` GPT-J trained by torch AdamW. Tokens/s: the
three sides take turns for `--rounds` rounds of `--steps` steps (sides alternated, compile and warm-up
untimed); the median over rounds is reported with the spread (min - max) of the rounds. Peak memory: each
side in its own process, its peak resident set minus its resident set after imports (model, optimizer state
and a step's temporaries; XLA's and torch's allocators both count). `--rounds 0` prints the memory only.

    python benchmarks/lora_throughput.py [--rounds 5] [--steps 3] [--threads N]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peers import hf_gptj, torch_step  # noqa: E402

from mesh_transformer.config import from_dict  # noqa: E402
from mesh_transformer.sharding import make_mesh  # noqa: E402
from mesh_transformer.train import make_trainer  # noqa: E402

SHAPE = dict(layers=4, d_model=512, n_heads=8, pe_rotary_dims=32, n_vocab=8192, seq=256)
BATCH = 8
RANK, ALPHA = 16, 32.0
TARGETS = ["q", "k", "v", "out", "fc_in", "fc_out"]
SIDES = ("ours LoRA", "ours full fine-tune", "peft + transformers LoRA")


def ours(lora_on: bool, base_dir: str):
    """A step function of our trainer (LoRA over the base in `base_dir`, or full fine-tuning of it)."""
    config = from_dict(
        {
            **SHAPE,
            "per_replica_batch": BATCH,
            "compute_dtype": "float32",
            "remat": "none",
            "lr": 1e-4,
            "warmup_steps": 0,
            "anneal_steps": 100,
            "total_steps": 100,
            **({"lora_rank": RANK, "lora_alpha": ALPHA, "lora_targets": TARGETS} if lora_on else {}),
        }
    )
    trainer = make_trainer(config, make_mesh(1, 1, jax.devices()[:1]))
    state = {"s": trainer.tuned_state(base_dir)}
    tokens = np.random.default_rng(0).integers(0, SHAPE["n_vocab"], (1, BATCH, SHAPE["seq"] + 1), np.int32)
    batch = trainer.global_batch(tokens)

    def step():
        state["s"], metrics = trainer.step(state["s"], batch)
        jax.block_until_ready(metrics)

    return step


def peft_side(base_dir: str):
    import peft
    from transformers import GPTJForCausalLM

    model = GPTJForCausalLM.from_pretrained(base_dir)
    peft_config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
        task_type="CAUSAL_LM",
    )
    return torch_step(peft.get_peft_model(model, peft_config), BATCH, SHAPE["seq"], weight_decay=0.01)


def make_side(name: str, base_dir: str):
    if name == "ours LoRA":
        return ours(True, base_dir)
    if name == "ours full fine-tune":
        return ours(False, base_dir)
    return peft_side(base_dir)


def peak_memory(name: str, base_dir: str) -> int:
    """Bytes the side's peak resident set grows by over its process's after imports (its own process)."""
    code = (  # VmRSS now (KiB) against the peak after the side's work (ru_maxrss, KiB on Linux)
        "import json, resource, sys; import benchmarks.lora_throughput as b; "
        "before = int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]); "
        f"step = b.make_side({name!r}, {base_dir!r}); step(); step(); "
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)  # the project, and the benchmarks it imports (peers)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])) * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--base-dir", default="/tmp/lora_throughput_base")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.base_dir, "config.json")):
        hf_gptj(SHAPE).save_pretrained(args.base_dir)

    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}")
    print(f"model: GPT-J {SHAPE}, batch {BATCH}; LoRA rank {RANK}, alpha {ALPHA}, targets {TARGETS}")
    if args.rounds == 0:
        for name in SIDES:
            print(f"{name:28s} peak RSS growth {peak_memory(name, args.base_dir) / 2**20:8.0f} MiB")
        return
    steps = {name: make_side(name, args.base_dir) for name in SIDES}
    for step in steps.values():  # compile and warm up, untimed
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    tokens_per_step = BATCH * SHAPE["seq"]
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(tokens_per_step * args.steps / (time.perf_counter() - t0))
    del steps
    memory = {name: peak_memory(name, args.base_dir) for name in SIDES}

    lora_median = float(np.median(rates["ours LoRA"]))
    print(
        f"{'side':28s} {'tokens/s median':>16s} {'spread (min-max)':>20s} "
        f"{'ours LoRA is':>13s} {'peak RSS':>10s}"
    )
    for name in SIDES:
        median = float(np.median(rates[name]))
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        print(
            f"{name:28s} {median:16,.0f} {spread:>20s} {lora_median / median:12.2f}x "
            f"{memory[name] / 2**20:8.0f} MiB"
        )
    print(f"({args.rounds} rounds x {args.steps} steps per side, sides alternated)")


if __name__ == "__main__":
    main()
