"""The training step and train state: loss, gradient accumulation, optimizer update, all jitted over the
mesh with `NamedSharding` in/out shardings and the state donated.

`Trainer` owns the compiled functions; `device_train.py` (single process) and the Ray actors (multi-host)
both drive it the same way: `state = trainer.init_state(seed)`, then
`state, metrics = trainer.step(state, batch)`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer import sharding
from mesh_transformer.config import Config
from mesh_transformer.model import ModelShape, build
from mesh_transformer.optimizer import make_optimizer, schedule_for


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # Haiku params, float32
    opt_state: Any  # optax state, float32 moments


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy and mean log(Z)^2 (the z-loss term), both in float32.

    The target logit is picked with a one-hot product rather than a gather, so that a vocab split over
    `mp` stays split (a gather across a sharded axis would all-gather the logits)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.sum(logits_BTV * jax.nn.one_hot(targets_BT, logits_BTV.shape[-1]), axis=-1)
    return jnp.mean(log_z_BT - target_logit_BT), jnp.mean(jnp.square(log_z_BT))


class Trainer:
    """Compiled init / train step / loss for one config on one mesh."""

    def __init__(self, config: Config, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.model = build(ModelShape.from_config(config))
        self.optimizer = make_optimizer(config)
        self.schedule = schedule_for(config)

        abstract = jax.eval_shape(self._init, jax.ShapeDtypeStruct((2,), jnp.uint32))
        self.state_shardings = self._state_shardings(abstract)
        # gradients: accumulated split over dp, then handed to the optimizer in its moments' sharding
        grad_rules = sharding.gradient_rules(config)
        optimizer_rules = sharding.logical_rules(config, for_optimizer=True)
        self.grad_shardings, self.optimizer_param_shardings = (
            sharding.tree_shardings(mesh, sharding.param_specs(abstract.params, rules))
            for rules in (grad_rules, optimizer_rules)
        )
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
        )

        self._jit_init = jax.jit(self._init, out_shardings=self.state_shardings)
        self._jit_from_params = jax.jit(self._from_params, out_shardings=self.state_shardings)
        self.step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_batch_sharding = NamedSharding(mesh, PartitionSpec(sharding.DP, None))
        self.eval_loss = jax.jit(
            self._eval_loss,
            in_shardings=(self.state_shardings.params, self.eval_batch_sharding),
            out_shardings=replicated,
        )

    # ----- shardings -----
    def _state_shardings(self, abstract: TrainState) -> TrainState:
        rules = sharding.logical_rules(self.config)
        param_specs = sharding.param_specs(abstract.params, rules)
        opt_specs = sharding.param_specs(
            abstract.params, sharding.logical_rules(self.config, for_optimizer=True)
        )
        opt_state_specs = optax.tree_map_params(
            self.optimizer,
            lambda _, spec: spec,
            abstract.opt_state,
            opt_specs,
            transform_non_params=lambda _: PartitionSpec(),
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        specs = TrainState(PartitionSpec(), param_specs, opt_state_specs)
        return sharding.tree_shardings(self.mesh, specs)

    # ----- traced functions -----
    def _init(self, key: jax.Array) -> TrainState:
        """key: a raw uint32[2] PRNG key."""
        dummy_BT = jnp.zeros((1, self.config.seq), jnp.int32)
        return self._from_params(self.model.init(key, dummy_BT))

    def _from_params(self, params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params))

    def _loss(self, params, tokens_BT1: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits_BTV = self.model.apply(params, None, tokens_BT1[:, :-1])
        ce, log_z_sq = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
        return ce + self.config.z_loss * log_z_sq, ce

    def _step(self, state: TrainState, tokens_ABT1: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        with sharding.activation_sharding(self.mesh):
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)

            def micro_step(grad_sum, tokens_BT1):
                (_, ce), grads = grad_fn(state.params, tokens_BT1)
                return jax.tree_util.tree_map(jnp.add, grad_sum, grads), ce

            # float32 accumulator (never bf16: see REFERENCE section 3)
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, self.grad_shardings)
            grad_sum, ce_A = jax.lax.scan(micro_step, zeros, tokens_ABT1)
            grads = jax.tree_util.tree_map(lambda g: g / tokens_ABT1.shape[0], grad_sum)
            grads = jax.lax.with_sharding_constraint(grads, self.optimizer_param_shardings)

            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {
                "loss": jnp.mean(ce_A),
                "grad_norm": optax.tree.norm(grads),
                "lr": self.schedule(state.step),
            }
            return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_loss(self, params, tokens_BT1: jax.Array) -> jax.Array:
        with sharding.activation_sharding(self.mesh):
            return self._loss(params, tokens_BT1)[1]

    # ----- host-side helpers -----
    def init_state(self, seed: int) -> TrainState:
        return self._jit_init(jax.random.PRNGKey(seed))

    def state_from_params(self, params) -> TrainState:
        """Step 0 with a fresh optimizer around `params`: where fine-tuning starts (schedule from step 0)."""
        return self._jit_from_params(params)

    def global_batch(self, local_tokens: np.ndarray) -> jax.Array:
        """This process's rows (A, B / processes, T + 1) -> one global array split over `dp`."""
        return sharding.global_array(local_tokens, self.batch_sharding)
