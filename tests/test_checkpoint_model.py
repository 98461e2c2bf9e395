"""Checkpoints of the real GPT-J train state: saved on mesh (2, 4), restored on (4, 2), (8, 1) and one device
with identical values and identical logits; a slim checkpoint gives the bf16-rounded params' logits."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from helpers import TINY_MODEL

from mesh_transformer import sharding
from mesh_transformer.checkpoint import CheckpointManager, load_params, slim_checkpoint
from mesh_transformer.config import from_dict
from mesh_transformer.train import Trainer

TINY = dict(
    TINY_MODEL,
    tpu_size=8,
    cores_per_replica=4,
    per_replica_batch=1,
    total_steps=4,
    compute_dtype="float32",
    remat="none",
)


def trainer_on(dp: int, mp: int) -> Trainer:
    config = from_dict(dict(TINY, tpu_size=dp * mp, cores_per_replica=mp))
    return Trainer(config, sharding.make_mesh(dp, mp, jax.devices()[: dp * mp]))


def logits(trainer: Trainer, params, tokens: np.ndarray) -> np.ndarray:
    with sharding.activation_sharding(trainer.mesh):
        return np.asarray(jax.jit(lambda p, t: trainer.model.apply(p, None, t))(params, tokens))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    """A train state after two real steps on mesh (2, 4), saved as step 2; returns (model_dir, host copy)."""
    model_dir = tmp_path_factory.mktemp("model_ckpt")
    trainer = trainer_on(2, 4)
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = rng.integers(0, TINY["n_vocab"], (1, 2, TINY["seq"] + 1)).astype(np.int32)
        state, _ = trainer.step(state, trainer.global_batch(batch))
    host = jax.device_get(state)
    manager = CheckpointManager(str(model_dir))
    manager.save(2, state, {"loader": {"seed": 0, "epoch": 0, "position": 4}})
    manager.wait()
    return model_dir, host


TOKENS = np.random.default_rng(1).integers(0, TINY["n_vocab"], (2, TINY["seq"])).astype(np.int32)


@pytest.mark.parametrize("dp,mp", [(4, 2), (8, 1), (1, 1)])
def test_real_state_restores_on_other_meshes_with_identical_logits(saved, dp: int, mp: int) -> None:
    model_dir, host = saved
    trainer = trainer_on(dp, mp)
    state, _ = CheckpointManager(str(model_dir)).restore(trainer.abstract_state)
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree_util.tree_leaves(host), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
    # The same params placed directly on this mesh compute the very same logits as the restored ones.
    direct = jax.device_put(host.params, trainer.state_shardings.params)
    np.testing.assert_array_equal(logits(trainer, state.params, TOKENS), logits(trainer, direct, TOKENS))


def test_slim_params_give_the_logits_of_bfloat16_rounded_weights(saved, tmp_path: Path) -> None:
    model_dir, host = saved
    slim_checkpoint(str(model_dir), str(tmp_path / "slim"))
    trainer = trainer_on(1, 1)
    params = load_params(str(tmp_path / "slim"), trainer.abstract_state.params)
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), host.params)
    np.testing.assert_array_equal(logits(trainer, params, TOKENS), logits(trainer, rounded, TOKENS))
    full = logits(trainer, load_params(str(model_dir), trainer.abstract_state.params), TOKENS)
    np.testing.assert_allclose(logits(trainer, params, TOKENS), full, atol=0.05)
