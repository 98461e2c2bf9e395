"""Write a training config for fine-tuning a GPT-J, GPT-NeoX (Pythia) or GPT-Neo Hugging Face checkpoint.

python scripts/hf_config.py HF_FOLDER [--tpu-size N] [--cores-per-replica M] [--seq S] --output CONFIG.json
python device_train.py --config CONFIG.json --tune-model-path HF_FOLDER --data DATASET
The architecture and shapes come from the folder's config.json (the vocabulary padded to a multiple of M),
the optimizer gets fine-tuning defaults (edit them in the written file). Another model type is one clear line.
"""

import argparse
import json
import os

from mesh_transformer.errors import UserError, run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="Hugging Face model folder (config.json), local or gs://")
    p.add_argument("--tpu-size", type=int, default=8, help="devices to train on (default 8)")
    p.add_argument("--cores-per-replica", type=int, default=8, help="model-parallel degree mp (default 8)")
    p.add_argument("--seq", type=int, help="training sequence length (default: the model's context)")
    p.add_argument("--output", required=True, help="the config file to write")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only; never claim an accelerator
    from mesh_transformer import storage
    from mesh_transformer.hf import training_config_from_hf

    for flag in ("tpu_size", "cores_per_replica", "seq"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    config = training_config_from_hf(
        args.folder, tpu_size=args.tpu_size, cores_per_replica=args.cores_per_replica, seq=args.seq
    )
    storage.write_text(args.output, json.dumps(config, indent=2) + "\n")
    c = config
    dp, mp = args.tpu_size // args.cores_per_replica, args.cores_per_replica
    print(
        f"wrote {args.output}: {c['architecture']}, {c['layers']} layers, d_model {c['d_model']}, "
        f"n_vocab {c['n_vocab']}, seq {c['seq']}, dp {dp} x mp {mp}"
    )


if __name__ == "__main__":
    run_cli(main)
