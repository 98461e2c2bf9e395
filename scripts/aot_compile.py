"""Compile the exact training step of a config for a TPU pod from this machine, and report its memory.

python scripts/aot_compile.py --config configs/6B_roto_256.json --topology v3:8x16
Needs libtpu (pip install -e '.[tpu]'), not a TPU. Exits 1 when the step does not fit the device.
"""

import argparse
import os

from mesh_transformer.errors import run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config (see configs/)")
    p.add_argument(
        "--topology", required=True, help="TPU topology, e.g. v3:8x16 (v3-256), v4:4x4x8, v5e:16x16"
    )
    p.add_argument("--tpu-size", type=int, help="override the config's device count")
    p.add_argument(
        "--write-shardings",
        metavar="PATH",
        help="write the compiled step's train-state shardings (golden file)",
    )
    args = p.parse_args()
    # Compile only: keep JAX off any local accelerator; the TPU devices come from the topology.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from mesh_transformer import aot
    from mesh_transformer.config import load_config

    result = aot.check(load_config(args.config, tpu_size=args.tpu_size), args.topology)
    if args.write_shardings:
        with open(args.write_shardings, "w") as f:
            f.write(aot.dump_shardings(aot.state_shardings(result.compiled)))
        print(f"wrote {args.write_shardings}")


if __name__ == "__main__":
    run_cli(main)
