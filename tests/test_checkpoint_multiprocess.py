"""Checkpoints across processes: two jax processes (4 CPU devices each) save one state together, each
writing only its own replica-0 pieces; it restores in both layouts and in this single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
from test_checkpoint import assert_trees_equal, host_state, make_mesh, target_for

from mesh_transformer.checkpoint import CheckpointManager

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent

CHILD = r"""
import json, os, sys
process_id, port, model_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[4])
from test_checkpoint import host_state, state_specs
from mesh_transformer.checkpoint import CheckpointManager

# The mp axis spans both processes, so each process holds replica-0 pieces of the mp-sharded leaves.
mesh = Mesh(np.array(jax.devices()).reshape(4, 2).T, ("dp", "mp"))
host = host_state(7)
is_spec = lambda x: isinstance(x, P)
def put(spec, x):
    return jax.make_array_from_callback(np.shape(x), NamedSharding(mesh, spec), lambda i: np.asarray(x)[i])
state = jax.tree.map(put, state_specs(), host, is_leaf=is_spec)
mine = sum(s.replica_id == 0 for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards)
manager = CheckpointManager(model_dir)
manager.save(7, state, {"processes": 2})
manager.wait()

# Restore in this two-process job onto the other device order and check every local shard.
other = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "mp"))
target = jax.tree.map(lambda spec, x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                      sharding=NamedSharding(other, spec)), state_specs(), host, is_leaf=is_spec)
restored, extra = manager.restore(target)
assert extra == {"processes": 2}, extra
for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host), strict=True):
    for shard in leaf.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
print(json.dumps({"pieces_written": int(mine)}))
"""


def test_two_processes_save_their_own_pieces_and_any_mesh_restores(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    model_dir = tmp_path / "run"
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, str(model_dir), str(TESTS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for pid in (0, 1)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    written = [json.loads(out.strip().splitlines()[-1])["pieces_written"] for out, _ in outputs]
    files = list((model_dir / "step_7").glob("*.safetensors"))
    assert min(written) > 0 and sum(written) == len(files), (written, len(files))
    manager = CheckpointManager(str(model_dir))
    assert manager.latest_step() == 7
    for dp, mp in [(4, 2), (1, 1)]:
        state, extra = manager.restore(target_for(make_mesh(dp, mp)))
        assert extra == {"processes": 2}
        assert_trees_equal(state, host_state(7))
