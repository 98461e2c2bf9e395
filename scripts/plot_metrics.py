"""Plot a training run's metrics.jsonl: loss (train and validation), throughput and MFU, learning rate and
gradient norm, and evaluation scores, to one PNG.

python scripts/plot_metrics.py runs/demo --output docs/demo_metrics.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh_transformer.errors import run_cli  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a run's model_dir (local or gs://), or a metrics.jsonl file")
    p.add_argument("--output", help="PNG to write, local or gs:// (default: {model_dir}/metrics.png)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from mesh_transformer import storage
    from mesh_transformer.metrics import plot_metrics

    run_dir = storage.parent(args.model_dir) if args.model_dir.endswith(".jsonl") else args.model_dir
    output = args.output or storage.join(run_dir, "metrics.png")
    plot_metrics(args.model_dir, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(main)
