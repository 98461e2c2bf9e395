"""Train a GPT-J-class model on this machine's devices (or, with --hosts, on a Ray cluster).

python device_train.py --config configs/demo.json
python device_train.py --config configs/6B_roto_256.json --dry-run
"""

import argparse
import os

from mesh_transformer.errors import run_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config (see configs/)")
    p.add_argument("--model-dir", help="where checkpoints and metrics go (default: from the config)")
    p.add_argument("--steps", type=int, help="train until this step (default: the config's total_steps)")
    p.add_argument(
        "--data", nargs="+", help="a prepared dataset dir, or text/jsonl files (default: demo corpus)"
    )
    p.add_argument("--tokenizer", help="tokenizer.json for raw text given with --data")
    p.add_argument("--tpu-size", type=int, help="override the config's device count")
    p.add_argument(
        "--dry-run", action="store_true", help="print config, mesh, parameters, memory; build nothing"
    )
    p.add_argument(
        "--aot", metavar="TOPOLOGY", help="compile the step for a TPU topology (v3:8x16 ...), report memory"
    )
    p.add_argument("--sample-prompt", default="", help="prompt of the sample printed after training")
    p.add_argument("--sample-tokens", type=int, default=64, help="length of that sample (0: no sample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--tune-model-path",
        help="fine-tune from these params (our full or slim checkpoint, a Hugging Face folder of the family, "
        "or an original Mesh-Transformer-JAX checkpoint): fresh optimizer, LR schedule from step 0 "
        "(a checkpoint already in the model dir is resumed instead)",
    )
    ray = p.add_argument_group("multi-host training with Ray (see README)")
    ray.add_argument("--hosts", type=int, help="train on this many Ray actors, one per host (default: here)")
    ray.add_argument(
        "--ray-address", help="HOST:PORT of a running Ray head, or auto (default: a private local Ray)"
    )
    ray.add_argument("--actor-resources", default="", help="custom Ray resources per actor, e.g. tpu=1")
    ray.add_argument(
        "--step-timeout", type=float, default=900.0, help="seconds without a step before restarting the hosts"
    )
    ray.add_argument(
        "--max-restarts", type=int, default=5, help="consecutive restarts without a new checkpoint"
    )
    ray.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="seconds to wait before the first restart; doubles with each consecutive failure",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from mesh_transformer.config import check_device_count, load_config

    config = load_config(args.config, tpu_size=args.tpu_size)
    if args.steps is not None and args.steps < 0:
        raise_user_error(f"--steps must be >= 0, got {args.steps}")
    if args.dry_run:
        from mesh_transformer.run import describe

        print(describe(config))
        return
    if args.aot:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only; the TPU devices come from the topology
        from mesh_transformer.aot import check

        check(config, args.aot)
        return

    if args.hosts is None and (args.ray_address or args.actor_resources):
        raise_user_error("--ray-address and --actor-resources need --hosts N (the number of hosts)")

    from mesh_transformer.run import RunOptions, model_dir_for, train

    options = RunOptions(
        model_dir=model_dir_for(config, args.model_dir),
        steps=args.steps,
        data=args.data,
        tokenizer=args.tokenizer,
        progress=not args.no_progress,
        sample_prompt=args.sample_prompt if args.sample_tokens > 0 else None,
        sample_tokens=args.sample_tokens,
        tune_model_path=args.tune_model_path,
    )
    if args.hosts is not None:  # this process only drives: the actors own the devices
        from mesh_transformer import cluster

        cluster_options = cluster.ClusterOptions(
            hosts=args.hosts,
            ray_address=args.ray_address,
            actor_resources=cluster.parse_resources(args.actor_resources),
            step_timeout_s=args.step_timeout,
            max_restarts=args.max_restarts,
            backoff_s=args.restart_backoff,
        )
        cluster.train(config, options, cluster_options)
        return

    import jax

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", config.tpu_size)  # emulate the mesh on a CPU-only host
    check_device_count(config, jax.device_count())
    train(config, options)


def raise_user_error(message: str) -> None:
    from mesh_transformer.errors import UserError

    raise UserError(message)


if __name__ == "__main__":
    run_cli(main)
