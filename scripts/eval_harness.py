"""Score a checkpoint (full or slim, or a model_dir's newest) or a Hugging Face folder of the family (GPT-J,
GPT-NeoX, GPT-Neo) on lm-evaluation-harness tasks, sharded over the config's mesh; prints the harness's
table, writes its JSON.

python scripts/eval_harness.py --config configs/demo.json --ckpt runs/demo --tasks lambada_openai,piqa
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh_transformer.errors import UserError, run_cli  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config of the model (see configs/)")
    p.add_argument(
        "--ckpt", required=True, help="checkpoint dir, model_dir, or Hugging Face folder of the family"
    )
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--output", help="write the harness's results JSON here (local or gs://)")
    p.add_argument("--include-path", help="a directory of your own task YAML files")
    p.add_argument(
        "--tokenizer", help="tokenizer.json or prepared dataset dir (default: found beside the model)"
    )
    p.add_argument(
        "--batch-size", type=int, help="rows per forward pass (default: the config's global batch)"
    )
    p.add_argument("--tpu-size", type=int, help="override the config's device count")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from mesh_transformer import evaluation
    from mesh_transformer.config import check_device_count, load_config

    config = load_config(args.config, tpu_size=args.tpu_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    evaluation.check_model_path(args.ckpt)
    tokenizer = evaluation.find_tokenizer(args.tokenizer, args.ckpt, config)
    evaluation.check_tasks(tasks, args.include_path)

    import jax

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", config.tpu_size)  # emulate the mesh on a CPU-only host
    check_device_count(config, jax.device_count())

    from lm_eval.utils import handle_non_serializable, make_table

    from mesh_transformer import sharding
    from mesh_transformer.train import Trainer

    trainer = Trainer(config, sharding.mesh_for(config))
    params = evaluation.load_params(trainer, args.ckpt)
    model = evaluation.HarnessModel(trainer, params, tokenizer, batch_size=args.batch_size)
    results = evaluation.run_harness(model, tasks, limit=args.limit, include_path=args.include_path)

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:  # local or gs://, written whole: an earlier results file is never left half-overwritten
        from mesh_transformer import storage

        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        storage.write_text(args.output, text)
        print(f"results written to {args.output}")


if __name__ == "__main__":
    run_cli(main)
