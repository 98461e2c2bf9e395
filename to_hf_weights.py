"""Export a checkpoint to a Hugging Face folder (config.json, safetensors, tokenizer): `GPTJForCausalLM`,
`GPTNeoXForCausalLM` or `GPTNeoForCausalLM`, as the config's architecture says.

python to_hf_weights.py --config CONFIG --ckpt PATH --output-path DIR [--dtype float32|bfloat16|float16]
python to_hf_weights.py --config CONFIG --ckpt LORA_PATH --output-path DIR --peft
PATH is a full or slim checkpoint saved on any mesh, or a model_dir (its newest step); local or gs://.
Runs on the CPU one checkpoint piece at a time; the folder then loads with `from_pretrained(DIR)`.
A LoRA run's checkpoint exports merged (its adapters added into its base), or with --peft as a PEFT adapter
folder that `peft.PeftModel.from_pretrained(base_model, DIR)` loads over its base.
"""

import argparse
import os

from mesh_transformer.errors import run_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the JSON config the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or model_dir (local or gs://)")
    p.add_argument("--output-path", required=True, help="new local directory for the Hugging Face model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    p.add_argument(
        "--peft",
        action="store_true",
        help="write a LoRA checkpoint's adapters as a PEFT folder (adapter_config.json, "
        "adapter_model.safetensors) instead of merged weights",
    )
    p.add_argument("--tokenizer", help="tokenizer.json or dataset dir (default: the run's dataset/tokenizer)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes are traced only; never claim an accelerator
    from mesh_transformer import lora
    from mesh_transformer.config import load_config
    from mesh_transformer.hf import export_checkpoint, parse_size

    config = load_config(args.config)
    if args.peft:
        base = lora.export_peft(args.ckpt, config, args.output_path)
        print(f"wrote {args.output_path}: PEFT LoRA adapters over the base {base}")
        return
    export = lora.export_merged if lora.lora_info(args.ckpt) is not None else export_checkpoint
    result = export(
        args.ckpt,
        config,
        args.output_path,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        tokenizer=args.tokenizer,
    )
    tokenizer = (
        f"tokenizer from {result.tokenizer}" if result.tokenizer else "no tokenizer found (pass --tokenizer)"
    )
    print(
        f"wrote {result.output_dir}: {len(result.weight_files)} safetensors file(s), "
        f"{result.weight_bytes / 2**20:.1f} MiB, {args.dtype}; {tokenizer}"
    )


if __name__ == "__main__":
    run_cli(main)
