"""Sharded training equals an oracle written here without the project's train step or optimizer: a plain
single-device loss and gradient, and a numpy clip -> Adam -> decoupled weight decay -> learning rate update.
The schedule and decay mask are the original's; remat shows in the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_MODEL
from jax.extend.core import jaxprs_in_params

from mesh_transformer import sharding
from mesh_transformer.config import from_dict
from mesh_transformer.models import build, model_for
from mesh_transformer.optimizer import decay_mask, gpt3_schedule, make_optimizer
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


# ----- the oracle: no Trainer, no make_optimizer -----

ORACLE = tiny_config(1, 1)
ORACLE_MODEL = build(model_for(ORACLE))


@jax.jit
def oracle_loss_and_grads(params, tokens_BT1):
    """Cross-entropy (the aux) and gradients of cross-entropy + z_loss * mean(log Z ** 2), one device."""

    def loss(p):
        logits_BTV = ORACLE_MODEL.apply(p, None, tokens_BT1[:, :-1])
        log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logits_BTV, tokens_BT1[:, 1:, None], axis=-1)[..., 0]
        ce = jnp.mean(log_z_BT - target_BT)
        return ce + ORACLE.z_loss * jnp.mean(log_z_BT**2), ce

    (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return ce, grads


def oracle_lr(step: int, c=ORACLE) -> float:
    """The original's gpt3_schedule, written out: linear warmup, then cosine to end_lr."""
    if step < c.warmup_steps:
        return c.lr * step / c.warmup_steps
    done = min(step - c.warmup_steps, c.anneal_steps) / c.anneal_steps
    return c.end_lr + (c.lr - c.end_lr) * (1 + np.cos(np.pi * done)) / 2


def decays(module: str, name: str) -> bool:
    """Weight decay on weight matrices and the embedding, never on biases or LayerNorm scales/offsets."""
    return name in ("w", "embeddings")


class NumpyAdamW:
    """REFERENCE section 3 in float64: clip the global norm to 1, Adam (b1 0.9, b2 0.999, eps 1e-8, bias
    corrected), add weight_decay * param on the decayed leaves, times -lr(step)."""

    def __init__(self, params, weight_decay: float, lr=oracle_lr):
        self.params = {m: {n: np.asarray(v, np.float64) for n, v in ls.items()} for m, ls in params.items()}
        self.mu = {m: {n: np.zeros_like(v) for n, v in ls.items()} for m, ls in self.params.items()}
        self.nu = {m: {n: np.zeros_like(v) for n, v in ls.items()} for m, ls in self.params.items()}
        self.weight_decay, self.lr, self.step = weight_decay, lr, 0

    def update(self, grads) -> float:
        """Apply one step; returns the gradient's global norm before clipping."""
        grads = {m: {n: np.asarray(v, np.float64) for n, v in ls.items()} for m, ls in grads.items()}
        norm = float(np.sqrt(sum(np.sum(g**2) for ls in grads.values() for g in ls.values())))
        scale = min(1.0, 1.0 / norm)
        t = self.step + 1
        for m, leaves in grads.items():
            for n, g in leaves.items():
                g = g * scale
                self.mu[m][n] = 0.9 * self.mu[m][n] + 0.1 * g
                self.nu[m][n] = 0.999 * self.nu[m][n] + 0.001 * g**2
                mu_hat, nu_hat = self.mu[m][n] / (1 - 0.9**t), self.nu[m][n] / (1 - 0.999**t)
                update = mu_hat / (np.sqrt(nu_hat) + 1e-8)
                if decays(m, n):
                    update = update + self.weight_decay * self.params[m][n]
                self.params[m][n] = self.params[m][n] - self.lr(self.step) * update
        self.step += 1
        return norm


@pytest.fixture(scope="module")
def reference():
    """Initial params, loss and grads of one batch, and the params and gradient norms of three optimizer
    steps, all computed by the oracle."""
    dummy_BT = jnp.zeros((1, ORACLE.seq), jnp.int32)
    params = jax.device_get(jax.jit(ORACLE_MODEL.init)(jax.random.PRNGKey(0), dummy_BT))
    batch = tokens((8, 17))
    loss, grads = jax.device_get(oracle_loss_and_grads(params, batch))
    optimizer = NumpyAdamW(params, ORACLE.weight_decay)
    norms = [optimizer.update(oracle_loss_and_grads(params_of(optimizer), b)[1]) for b in three_batches()]
    return params, batch, float(loss), grads, optimizer.params, norms


def params_of(optimizer: NumpyAdamW):
    return jax.tree_util.tree_map(lambda x: x.astype(np.float32), optimizer.params)


def three_batches():
    return [tokens((8, 17), seed=10 + i) for i in range(3)]


def loss_and_grads(trainer: Trainer, host_params, batch_BT1):
    params = jax.device_put(host_params, trainer.state_shardings.params)
    batch = jax.device_put(batch_BT1, trainer.eval_batch_sharding)

    def f(p, b):
        with sharding.activation_sharding(trainer.mesh):
            return jax.value_and_grad(trainer._loss, has_aux=True)(p, b)

    (total, ce), grads = jax.jit(f)(params, batch)
    return float(ce), jax.device_get(grads)


def three_steps(trainer: Trainer, host_params):
    """Params and gradient norms after three train steps from `host_params` with a fresh optimizer."""
    state = trainer.state_from_params(jax.device_put(host_params, trainer.state_shardings.params))
    norms = []
    for batch in three_batches():
        state, metrics = trainer.step(state, trainer.global_batch(batch[None]))
        norms.append(float(metrics["grad_norm"]))
    return jax.device_get(state.params), norms


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dp,mp", MESHES)
def test_sharded_loss_and_grads_match_the_oracle(reference, dp, mp):
    params, batch, loss, grads, _, _ = reference
    trainer = trainer_for(dp, mp)
    sharded_loss, sharded_grads = loss_and_grads(trainer, params, batch)
    assert abs(sharded_loss - loss) < 1e-5  # float32 rounding of differently-ordered sums
    assert_trees_close(sharded_grads, grads, atol=1e-6)


@pytest.mark.parametrize("dp,mp", MESHES)
def test_three_sharded_optimizer_steps_match_the_numpy_oracle(reference, dp, mp):
    params, _, _, _, params_after, norms = reference
    assert max(norms) > 1.5, norms  # the clip is active: a missing clip would change the steps
    trainer = trainer_for(dp, mp)
    got, got_norms = three_steps(trainer, params)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
    assert_trees_close(got, params_after, atol=2e-5)


def random_tree(abstract, rng, norm=None):
    """Standard normal leaves shaped like `abstract`; with `norm`, scaled to about that global norm."""
    size = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    scale = 1.0 if norm is None else norm / np.sqrt(size)
    return jax.tree_util.tree_map(lambda x: (rng.normal(size=x.shape) * scale).astype(np.float32), abstract)


def test_optimizer_update_equals_the_numpy_oracle_with_clipped_and_unclipped_gradients():
    """Five updates of make_optimizer from random params, with gradients of global norm 30, 0.3, 4, 0.5, 2:
    clipped and not, so neither a missing clip nor Adam's scale invariance can hide."""
    abstract = jax.eval_shape(ORACLE_MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    rng = np.random.default_rng(0)
    params = random_tree(abstract, rng)
    optimizer = make_optimizer(ORACLE)
    opt_state = optimizer.init(params)
    oracle = NumpyAdamW(params, ORACLE.weight_decay)
    update = jax.jit(optimizer.update)
    ours = params
    for norm in (30.0, 0.3, 4.0, 0.5, 2.0):
        grads = random_tree(abstract, rng, norm)
        assert oracle.update(grads) == pytest.approx(norm, rel=0.02)
        updates, opt_state = update(grads, opt_state, ours)
        ours = jax.device_get(jax.tree_util.tree_map(jnp.add, ours, updates))
        assert_trees_close(ours, oracle.params, atol=1e-6)
    moved = np.abs(ours["gptj/layers/block/fc_in"]["w"] - params["gptj/layers/block/fc_in"]["w"]).max()
    assert moved > 1e-2  # the steps were not negligible next to the tolerance


def primitive_names(jaxpr) -> set[str]:
    """Every primitive of a jaxpr and of the jaxprs nested in its equations (scan, jit, remat ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for inner in jaxprs_in_params(eqn.params):
            names |= primitive_names(inner)
    return names


def test_remat_recomputes_layers_in_the_compiled_train_step():
    """With remat="layer" the step's backward pass holds a remat of the layer (and compiles to far fewer
    temporaries, the activations of each layer being recomputed rather than kept); with "none" it does not."""
    found, temporaries = {}, {}
    for remat in ("layer", "none"):
        trainer = trainer_for(1, 1, remat=remat)
        batch = jax.ShapeDtypeStruct((1, 8, 17), jnp.int32, sharding=trainer.batch_sharding)
        traced = trainer.step.trace(trainer.abstract_state, batch)
        found[remat] = any(n.startswith(("remat", "checkpoint")) for n in primitive_names(traced.jaxpr.jaxpr))
        temporaries[remat] = traced.lower().compile().memory_analysis().temp_size_in_bytes
    assert found == {"layer": True, "none": False}
    assert temporaries["layer"] < 0.7 * temporaries["none"], temporaries


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
    results, trainer = [], trainer_for(2, 4)  # one compile: it is the init and the step that must repeat
    for _ in range(2):
        state = trainer.init_state(3)
        state, metrics = trainer.step(state, trainer.global_batch(tokens((1, 8, 17))))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == results[1][0]
    assert_trees_close(results[0][1], results[1][1], atol=0)
