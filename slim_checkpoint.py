"""Write a slim checkpoint: the params of a full checkpoint only, cast to bfloat16 (or float16).

Usage: python slim_checkpoint.py SRC DST [--dtype bfloat16|float16|float32]
SRC is a checkpoint directory or a model_dir (its newest committed step); either may be gs://bucket/path.
"""

import argparse
import sys

from mesh_transformer.checkpoint import CheckpointError, slim_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="full checkpoint directory, or a model_dir to take its newest step")
    parser.add_argument("dst", help="new directory (local or gs://) for the slim checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    try:
        written = slim_checkpoint(args.src, args.dst, args.dtype)
    except CheckpointError as e:
        print(f"slim_checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: params only, {args.dtype}, {written / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
