"""Peak memory of `to_hf_weights.py` on a ~1B-parameter model, against the size of what it writes and
against a naive export (load every param on the host, then write one safetensors file)
measured in the same run.

Usage: python benchmarks/export_memory.py [--layers 16] [--d-model 2048] [--n-vocab 50400] [--dir DIR]
A slim bfloat16 checkpoint of random weights saved on an 8-way model-parallel mesh is exported to bfloat16.
Each stage runs in its own process; peak memory is that process's max resident set (wait4 rusage).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def run_measured(argv: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process; a failing child stops the benchmark."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"stage failed: {' '.join(argv)}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def stage_save(config_path: str, ckpt: str) -> None:
    """Random bfloat16 params placed on a (1, 8) mesh, saved as a slim (params-only) checkpoint."""
    import jax
    import ml_dtypes
    import numpy as np

    from mesh_transformer import sharding
    from mesh_transformer.checkpoint import save_params
    from mesh_transformer.config import load_config
    from mesh_transformer.hf import expected_shapes

    config = load_config(config_path)
    mesh = sharding.make_mesh(1, 8)
    shapes = expected_shapes(config)
    abstract = {
        m: {n: jax.ShapeDtypeStruct(s, np.float32) for n, s in ls.items()} for m, ls in shapes.items()
    }
    specs = sharding.param_specs(abstract, sharding.TENSOR_PARALLEL_RULES)
    rng = np.random.default_rng(0)
    params = {}
    for module, leaves in shapes.items():
        for name, shape in leaves.items():
            host = (rng.random(shape, dtype=np.float32) - 0.5).astype(ml_dtypes.bfloat16)
            spec = specs[module][name]
            params.setdefault(module, {})[name] = jax.device_put(host, jax.NamedSharding(mesh, spec))
            del host
    save_params(ckpt, params)


def stage_naive(config_path: str, ckpt: str, output: str) -> None:
    """The peer: every param loaded on the host in float32, then all tensors written in one call."""
    import jax
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from mesh_transformer.checkpoint import load_params
    from mesh_transformer.config import load_config
    from mesh_transformer.hf import expected_shapes, hf_tensors
    from mesh_transformer.models import model_for

    config = load_config(config_path)
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32),
        expected_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    params = jax.device_get(load_params(ckpt, target))
    # safetensors' numpy API knows no bfloat16: write the bits as uint16 (same bytes; only the label differs).
    tensors = {
        name: np.ascontiguousarray(value.astype(ml_dtypes.bfloat16)).view(np.uint16)
        for name, value in hf_tensors(params, model_for(config))
    }
    os.makedirs(output)
    save_file(tensors, os.path.join(output, "model.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-vocab", type=int, default=50400)
    p.add_argument("--dir", help="scratch directory (default: a new temporary one, removed afterwards)")
    p.add_argument("--stage", choices=["save", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "save":
        return stage_save(args.config, args.ckpt)
    if args.stage == "naive":
        return stage_naive(args.config, args.ckpt, args.output)

    scratch = args.dir or tempfile.mkdtemp(prefix="export_memory_")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    try:
        config = {
            "layers": args.layers,
            "d_model": args.d_model,
            "n_heads": max(8, args.d_model // 128),
            "n_vocab": args.n_vocab,
            "seq": 2048,
            "pe_rotary_dims": 64,
            "cores_per_replica": 8,
            "tpu_size": 8,
        }
        config_path = os.path.join(scratch, "config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        ckpt = os.path.join(scratch, "ckpt")
        me = [sys.executable, os.path.abspath(__file__), "--config", config_path, "--ckpt", ckpt]

        save_rss, save_s = run_measured([*me, "--stage", "save"], env)
        streamed = os.path.join(scratch, "hf_streamed")
        export = [sys.executable, "to_hf_weights.py", "--config", config_path, "--ckpt", ckpt]
        stream_rss, stream_s = run_measured([*export, "--output-path", streamed, "--dtype", "bfloat16"], env)
        naive_rss, naive_s = run_measured(
            [*me, "--stage", "naive", "--output", os.path.join(scratch, "naive")], env
        )
        baseline_rss, _ = run_measured(
            [sys.executable, "-c", "import jax, numpy, mesh_transformer.hf, mesh_transformer.checkpoint"], env
        )

        def size(directory: str) -> float:
            return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / MiB

        ckpt_mib, out_mib = size(ckpt), size(streamed)
        n_params = sum(
            math.prod(entry["shape"])
            for f in os.listdir(streamed)
            if f.endswith(".safetensors")
            for entry in _header(os.path.join(streamed, f)).values()
        )
        print(
            f"model: {args.layers} layers, d_model {args.d_model}, n_vocab {args.n_vocab}: "
            f"{n_params:,} params"
        )
        print(f"slim bf16 checkpoint on a (1, 8) mesh: {ckpt_mib:,.0f} MiB (saved in {save_s:.0f} s)")
        print(f"export output (bfloat16 safetensors):  {out_mib:,.0f} MiB")
        print(f"python + jax + project imports alone:  peak RSS {baseline_rss:,.0f} MiB")
        print(
            f"to_hf_weights.py (streamed):           peak RSS {stream_rss:,.0f} MiB in {stream_s:.0f} s = "
            f"{stream_rss / out_mib:.2f} x output"
        )
        print(
            f"naive (all params on host, then save): peak RSS {naive_rss:,.0f} MiB in {naive_s:.0f} s = "
            f"{naive_rss / out_mib:.2f} x output"
        )
        print(f"streamed / naive peak: {stream_rss / naive_rss:.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


def _header(path: str) -> dict:
    """Tensor entries of a safetensors file (shape only is used here)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


if __name__ == "__main__":
    main()
