"""Write a slim checkpoint: the params of a full checkpoint only, cast to bfloat16 (or float16).

Usage: python slim_checkpoint.py SRC DST [--dtype bfloat16|float16|float32]
SRC is a checkpoint directory or a model_dir (its newest committed step); either may be gs://bucket/path.
"""

import argparse

from mesh_transformer.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="full checkpoint directory, or a model_dir to take its newest step")
    parser.add_argument("dst", help="new directory (local or gs://) for the slim checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    from mesh_transformer.checkpoint import slim_checkpoint

    written = slim_checkpoint(args.src, args.dst, args.dtype)
    print(f"wrote {args.dst}: params only, {args.dtype}, {written / 2**20:.1f} MiB")


if __name__ == "__main__":
    run_cli(main)
