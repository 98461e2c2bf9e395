"""Sharded training equals single-device training; the optimizer and schedule are the original's."""

import jax
import numpy as np
import pytest
from helpers import TINY_MODEL

from mesh_transformer import sharding
from mesh_transformer.config import from_dict
from mesh_transformer.optimizer import decay_mask, gpt3_schedule
from mesh_transformer.train import Trainer

TINY = dict(
    TINY_MODEL,
    n_vocab=128,
    per_replica_batch=1,
    warmup_steps=2,
    anneal_steps=10,
    lr=1e-2,
    end_lr=1e-3,
    weight_decay=0.1,
    total_steps=12,
    compute_dtype="float32",
    remat="layer",
)
MESHES = [(1, 1), (2, 4), (4, 2), (8, 1)]


def tiny_config(dp, mp, **changes):
    # the same global batch (8 sequences) on every mesh
    return from_dict(
        {**TINY, "tpu_size": dp * mp, "cores_per_replica": mp, "per_replica_batch": 8 // dp, **changes}
    )


def trainer_for(dp, mp, **changes) -> Trainer:
    config = tiny_config(dp, mp, **changes)
    return Trainer(config, sharding.make_mesh(dp, mp, jax.devices()[: dp * mp]))


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 128, shape, dtype=np.int32)


@pytest.fixture(scope="module")
def reference():
    """Params and loss/grads/three-step results on one device."""
    trainer = trainer_for(1, 1)
    state = trainer.init_state(0)
    host_state = jax.device_get(state)
    batch = tokens((8, 17))
    loss, grads = loss_and_grads(trainer, host_state.params, batch)
    params_after = three_steps(trainer, host_state)
    return host_state, batch, loss, grads, params_after


def loss_and_grads(trainer: Trainer, host_params, batch_BT1):
    params = jax.device_put(host_params, trainer.state_shardings.params)
    batch = jax.device_put(batch_BT1, trainer.eval_batch_sharding)

    def f(p, b):
        with sharding.activation_sharding(trainer.mesh):
            return jax.value_and_grad(trainer._loss, has_aux=True)(p, b)

    (total, ce), grads = jax.jit(f)(params, batch)
    return float(ce), jax.device_get(grads)


def three_steps(trainer: Trainer, host_state):
    state = jax.device_put(host_state, trainer.state_shardings)
    for i in range(3):
        state, _ = trainer.step(state, trainer.global_batch(tokens((1, 8, 17), seed=10 + i)))
    return jax.device_get(state.params)


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dp,mp", MESHES)
def test_sharded_loss_and_grads_match_single_device(reference, dp, mp):
    host_state, batch, loss, grads, _ = reference
    trainer = trainer_for(dp, mp)
    sharded_loss, sharded_grads = loss_and_grads(trainer, host_state.params, batch)
    assert abs(sharded_loss - loss) < 1e-5  # float32 rounding of differently-ordered sums
    assert_trees_close(sharded_grads, grads, atol=1e-6)


@pytest.mark.parametrize("dp,mp", MESHES)
def test_three_sharded_optimizer_steps_match_single_device(reference, dp, mp):
    host_state, _, _, _, params_after = reference
    trainer = trainer_for(dp, mp)
    assert_trees_close(three_steps(trainer, host_state), params_after, atol=2e-5)


def test_params_are_split_as_the_original():
    trainer = trainer_for(2, 4)
    specs = jax.tree_util.tree_map(lambda s: tuple(s.spec), trainer.state_shardings.params)
    assert specs["gptj/layers/block/q_proj"]["w"] == (None, None, "mp")  # output dim
    assert specs["gptj/layers/block/out_proj"]["w"] == (None, "mp", None)  # input dim
    assert specs["gptj/layers/block/fc_in"]["b"] == (None, "mp")
    assert specs["gptj/layers/block/fc_out"]["w"] == (None, "mp", None)
    assert specs["gptj"]["embeddings"] == ("mp", None)  # vocab
    assert specs["gptj/lm_head"]["w"] == (None, "mp")
    assert specs["gptj/ln_f"]["scale"] == (None,)
    mu = trainer.state_shardings.opt_state[1].mu  # Adam moments follow their params
    assert tuple(mu["gptj/layers/block/fc_in"]["w"].spec) == (None, None, "mp")


def test_gradient_accumulation_equals_one_big_batch():
    big = trainer_for(2, 4)
    accumulated = Trainer(tiny_config(2, 4, gradient_accumulation_steps=2, per_replica_batch=2), big.mesh)
    host_state = jax.device_get(big.init_state(0))
    batch = tokens((1, 8, 17), seed=5)
    state_big, m_big = big.step(jax.device_put(host_state, big.state_shardings), big.global_batch(batch))
    state_acc, m_acc = accumulated.step(
        jax.device_put(host_state, accumulated.state_shardings),
        accumulated.global_batch(batch.reshape(2, 4, 17)),
    )
    assert abs(float(m_big["loss"]) - float(m_acc["loss"])) < 1e-5
    assert abs(float(m_big["grad_norm"]) - float(m_acc["grad_norm"])) < 1e-5
    assert_trees_close(jax.device_get(state_acc.params), jax.device_get(state_big.params), atol=1e-6)


def test_gpt3_schedule_at_known_steps():
    schedule = gpt3_schedule(warmup_steps=100, anneal_steps=1000, lr=1e-3, end_lr=1e-4)
    expected = {0: 0.0, 50: 5e-4, 100: 1e-3, 600: (1e-3 + 1e-4) / 2, 1100: 1e-4, 5000: 1e-4}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


def test_weight_decay_only_on_matrices():
    trainer = trainer_for(1, 1)
    mask = decay_mask(trainer.abstract_state.params)
    assert mask["gptj/layers/block/q_proj"]["w"] and mask["gptj/lm_head"]["w"] and mask["gptj"]["embeddings"]
    assert not mask["gptj/layers/block/ln_1"]["scale"]  # stacked (layers, d): 2-D but a norm
    assert not mask["gptj/layers/block/fc_in"]["b"] and not mask["gptj/lm_head"]["b"]
    assert not mask["gptj/ln_f"]["offset"]


def test_tiny_model_overfits_one_batch():
    trainer = trainer_for(2, 4, lr=3e-3, end_lr=3e-3, warmup_steps=0, weight_decay=0.0)
    state = trainer.init_state(0)
    batch = trainer.global_batch(tokens((1, 8, 17), seed=7))
    losses = []
    for _ in range(30):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        trainer = trainer_for(2, 4)
        state = trainer.init_state(3)
        state, metrics = trainer.step(state, trainer.global_batch(tokens((1, 8, 17))))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == results[1][0]
    assert_trees_close(results[0][1], results[1][1], atol=0)
