"""Per-device memory of the GPT-J-6B fine-tuning step, LoRA against full fine-tuning, on one TPU v5e chip and
on a TPU v3-8, by ahead-of-time compilation with libtpu (no TPU needed; see mesh_transformer/aot.py).

The LoRA configs are configs/6B_lora_v5e_1.json and configs/6B_lora_v3_8.json (rank 16 on q, k, v, out,
fc_in and fc_out; seq 2048, batch 1, 16 accumulated micro-batches; bfloat16 compute, remat per layer); full
fine-tuning is the same config with lora_rank 0 (float32 params and Adam moments, as the original trained).
Prints one markdown row per (chip, method): the compiler's arguments (train state and batch), temporaries
and total per device, and whether it fits.

    python benchmarks/lora_memory.py [--only v5e|v3-8]
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mesh_transformer import aot  # noqa: E402
from mesh_transformer.config import load_config  # noqa: E402
from mesh_transformer.memory import GiB  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHIPS = {"v5e": ("configs/6B_lora_v5e_1.json", "v5e:1x1"), "v3-8": ("configs/6B_lora_v3_8.json", "v3:2x2")}


def row(chip: str, method: str, result: aot.AotResult) -> str:
    gib = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    m = result.memory
    verdict = "fits" if result.fits else "does not fit"
    if m is None:
        return f"| {chip} | {method} | - | - | {gib(result.required)} (out of memory) | {verdict} |"
    headroom = f"{gib(result.device_memory - m.total)} GiB spare" if result.fits else verdict
    return (
        f"| {chip} | {method} | {gib(m.arguments)} | {gib(m.temporaries)} | {gib(m.total)} of "
        f"{result.device_memory / GiB:.0f} | {headroom} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(CHIPS), help="one chip only")
    args = p.parse_args()
    print("| chip | step | arguments GiB | temporaries GiB | total GiB per device | verdict |")
    print("|---|---|---|---|---|---|")
    for chip, (config_path, topology) in CHIPS.items():
        if args.only and chip != args.only:
            continue
        lora_config = load_config(os.path.join(ROOT, config_path))
        full_config = lora_config.replace(lora_rank=0, lora_targets=None)
        for method, config in (("LoRA r16", lora_config), ("full fine-tune", full_config)):
            print(row(chip, method, aot.compile_step(config, topology)), flush=True)


if __name__ == "__main__":
    main()
