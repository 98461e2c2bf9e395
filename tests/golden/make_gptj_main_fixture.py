"""Writes tests/golden/gptj_main/: a GPT-J train state saved by the code of main at b8ddf82 (before the model
family), with what that code computed from it, so that tests/test_models.py can check that checkpoints of
that code restore bit-identically and train on exactly as they did.

Run once with that commit's code (it imports the modules of that time, `mesh_transformer.model` included):
    git archive b8ddf82 | tar -x -C /tmp/main_b8ddf82
    cd /tmp/main_b8ddf82 && PYTHONPATH=$PWD python /path/to/tests/golden/make_gptj_main_fixture.py OUT_DIR
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mesh_transformer import sharding  # noqa: E402
from mesh_transformer.checkpoint import CheckpointManager  # noqa: E402
from mesh_transformer.config import from_dict  # noqa: E402
from mesh_transformer.train import Trainer  # noqa: E402

CONFIG = dict(
    layers=2, d_model=16, n_heads=2, n_vocab=32, seq=8, pe_rotary_dims=4, tpu_size=8, cores_per_replica=2,
    per_replica_batch=1, warmup_steps=1, anneal_steps=4, lr=1e-2, end_lr=1e-3, weight_decay=0.1,
    total_steps=4, compute_dtype="float32", remat="layer",
)  # fmt: skip


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def main(out: str) -> None:
    config = from_dict(CONFIG)
    trainer = Trainer(config, sharding.make_mesh(4, 2))
    rng = np.random.default_rng(0)
    batches = rng.integers(0, 32, (2, 1, 4, 9)).astype(np.int32)
    tokens_BT = rng.integers(0, 32, (2, 8)).astype(np.int32)
    state = trainer.init_state(0)
    np.savez(os.path.join(out, "init_params.npz"), **flat(jax.device_get(state.params)))
    state, metrics_1 = trainer.step(state, trainer.global_batch(batches[0]))
    manager = CheckpointManager(os.path.join(out, "run"))
    manager.save(1, state, {"loader": {"seed": 0, "epoch": 0, "position": 4}})
    manager.wait()
    logits = trainer.model.apply(jax.device_get(state.params), None, tokens_BT)
    state, metrics_2 = trainer.step(state, trainer.global_batch(batches[1]))
    np.savez(
        os.path.join(out, "computed.npz"),
        batches=batches,
        tokens_BT=tokens_BT,
        logits_step_1=np.asarray(logits),
        loss_step_1=np.asarray(metrics_1["loss"]),
        loss_step_2=np.asarray(metrics_2["loss"]),
        grad_norm_step_2=np.asarray(metrics_2["grad_norm"]),
    )
    np.savez(os.path.join(out, "params_step_2.npz"), **flat(jax.device_get(state.params)))


if __name__ == "__main__":
    main(sys.argv[1])
