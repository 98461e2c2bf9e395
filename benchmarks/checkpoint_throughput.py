"""Checkpoint throughput: save and restore GB/s of a >= 1 GB sharded state against one plain file, and how
long an asynchronous save blocks the training loop compared with a synchronous one.

Usage: python benchmarks/checkpoint_throughput.py [--gib 1.0] [--dir DIR] [--repeats 3]
Both sides write with fsync and read back from the page cache; figures are medians over the repeats.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mesh_transformer.checkpoint import CheckpointManager  # noqa: E402

LEAF_SHAPE = (8, 1024, 2048)  # a stacked per-layer kernel: (layers, d_model, 2 * d_model), 64 MiB in float32


def build_state(gib: float, mesh: Mesh) -> dict:
    """Leaves alternate between mp-sharded (replicated over dp) and dp x mp sharded, like params and ZeRO
    optimizer moments."""
    n_leaves = max(1, round(gib * 2**30 / (np.prod(LEAF_SHAPE) * 4)))
    rng = np.random.default_rng(0)
    state = {}
    for i in range(n_leaves):
        spec = P(None, None, "mp") if i % 2 == 0 else P("dp", None, "mp")
        host = rng.standard_normal(LEAF_SHAPE, dtype=np.float32)
        state[f"layer_{i}"] = {"w": jax.device_put(host, NamedSharding(mesh, spec))}
    return state


def plain_write(path: str, arrays: list[np.ndarray]) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def plain_read(path: str, into: np.ndarray | None) -> float:
    """Read into fresh memory (what any load pays), or into a buffer mapped beforehand (the upper bound)."""
    started = time.perf_counter()
    with open(path, "rb") as f:
        if into is None:
            data = f.read()
            del data
        else:
            f.readinto(memoryview(into))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "mp"))
    state = build_state(args.gib, mesh)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    gb = nbytes / 1e9
    host = [np.asarray(x) for x in jax.tree.leaves(state)]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    other_mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("dp", "mp"))
    other = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other_mesh, x.sharding.spec)),
        state,
    )
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    print(f"state: {len(host)} leaves, {gb:.2f} GB, mesh (dp=2, mp=4); writing under {root}")
    times: dict[str, list[float]] = {
        k: [] for k in ("plain_w", "plain_r", "plain_fresh", "sync", "blocked", "async", "restore", "reshard")
    }
    # Long-lived managers, as in training: the first save of each maps its host buffers (reported apart).
    sync = CheckpointManager(os.path.join(root, "sync"), keep_n=1)
    background = CheckpointManager(os.path.join(root, "async"), keep_n=1)
    background.prepare(state)  # as the training loop does when it starts
    first_blocked = 0.0
    read_buffer = np.ones(nbytes, np.uint8)
    try:
        for r in range(args.repeats + 1):  # round 0 warms up every path and is not counted
            record = (lambda key, value: times[key].append(value)) if r else (lambda key, value: None)
            plain = os.path.join(root, "plain.bin")
            record("plain_w", plain_write(plain, host))
            record("plain_r", plain_read(plain, read_buffer))
            record("plain_fresh", plain_read(plain, None))
            os.remove(plain)

            started = time.perf_counter()
            sync.save(r + 1, state, {})
            sync.wait()
            record("sync", time.perf_counter() - started)

            started = time.perf_counter()
            background.save(r + 1, state, {})
            blocked = time.perf_counter() - started
            first_blocked = first_blocked or blocked
            record("blocked", blocked)
            background.wait()
            record("async", time.perf_counter() - started)

            for key, tgt in (("restore", target), ("reshard", other)):
                started = time.perf_counter()
                restored, _ = sync.restore(tgt)
                jax.block_until_ready(restored)
                record(key, time.perf_counter() - started)
                del restored
    finally:
        shutil.rmtree(root, ignore_errors=True)

    t = {k: statistics.median(v) for k, v in times.items()}

    def rate(key: str, peer: str) -> str:
        return f"{gb / t[key]:6.2f} GB/s ({t[key]:.2f} s)  ratio {t[peer] / t[key]:.2f}x"

    print(f"plain file write+fsync : {gb / t['plain_w']:6.2f} GB/s ({t['plain_w']:.2f} s)")
    print(f"checkpoint save (sync) : {rate('sync', 'plain_w')}")
    print(f"plain read, fresh mem  : {gb / t['plain_fresh']:6.2f} GB/s ({t['plain_fresh']:.2f} s)")
    print(f"plain read, mapped mem : {gb / t['plain_r']:6.2f} GB/s ({t['plain_r']:.2f} s)")
    for key, label in (("restore", "restore, same mesh     "), ("reshard", "restore, (2,4)->(4,2)  ")):
        print(f"{label}: {rate(key, 'plain_fresh')} vs fresh, {t['plain_r'] / t[key]:.2f}x vs mapped")
    print(
        f"async save blocks loop : {t['blocked']:.3f} s of {t['sync']:.2f} s synchronous "
        f"= {100 * t['blocked'] / t['sync']:.1f}% (async save total {t['async']:.2f} s)"
    )
    print(f"first async save       : {first_blocked:.3f} s blocked (buffers mapped by prepare() before)")
    print("targets: save and restore >= 0.5x plain file; async blocking < 10% of a synchronous save")


if __name__ == "__main__":
    main()
