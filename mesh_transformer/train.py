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
from mesh_transformer.data import Batch
from mesh_transformer.models import build, model_for
from mesh_transformer.models import layers as L
from mesh_transformer.optimizer import make_optimizer, schedule_for


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # Haiku params, float32
    opt_state: Any  # optax state, float32 moments


def cross_entropy(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array | None = None,
    n_targets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy and mean log(Z)^2 (the z-loss term), both in float32.

    With `mask_BT` only the targets it marks count: both are sums over them divided by `n_targets` (by
    default the marked count, at least 1; a step passes its whole count so that micro-batches add up).
    The target logit is picked with a one-hot product rather than a gather, so that a vocab split over
    `mp` stays split (a gather across a sharded axis would all-gather the logits)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.sum(logits_BTV * jax.nn.one_hot(targets_BT, logits_BTV.shape[-1]), axis=-1)
    if mask_BT is None:
        return jnp.mean(log_z_BT - target_logit_BT), jnp.mean(jnp.square(log_z_BT))
    weight_BT = mask_BT.astype(jnp.float32)
    if n_targets is None:
        n_targets = jnp.maximum(jnp.sum(weight_BT), 1.0)
    ce = jnp.sum(jnp.where(mask_BT, log_z_BT - target_logit_BT, 0.0)) / n_targets
    return ce, jnp.sum(jnp.where(mask_BT, jnp.square(log_z_BT), 0.0)) / n_targets


def make_trainer(config: Config, mesh: Mesh) -> Trainer:
    """The Trainer of a config: a `lora.LoraTrainer` when it sets lora_rank."""
    if config.lora_rank:
        from mesh_transformer.lora import LoraTrainer

        return LoraTrainer(config, mesh)
    return Trainer(config, mesh)


def as_batch(tokens_or_batch: jax.Array | Batch) -> Batch:
    """A step's or evaluation's input: a token array (every token a target, no document mask) or a Batch."""
    return tokens_or_batch if isinstance(tokens_or_batch, Batch) else Batch(tokens_or_batch)


class Trainer:
    """Compiled init / train step / loss for one config on one mesh."""

    def __init__(self, config: Config, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.on_cpu = sharding.on_cpu(mesh)  # layers.weight_gradients_transposed_first; lora.py's layout pin
        self.model = self._transformed()
        self.optimizer = make_optimizer(config)
        self.schedule = schedule_for(config)

        abstract = jax.eval_shape(self._init, jax.ShapeDtypeStruct((2,), jnp.uint32))
        self.state_shardings = self._state_shardings(abstract)
        # gradients (of the trained params): accumulated split over dp, then handed to the optimizer in its
        # moments' sharding
        grad_rules = sharding.gradient_rules(config)
        optimizer_rules = sharding.logical_rules(config, for_optimizer=True)
        self.grad_shardings, self.optimizer_param_shardings = (
            sharding.tree_shardings(mesh, sharding.param_specs(self.split(abstract.params)[0], rules))
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
            self.split(abstract.params)[0], sharding.logical_rules(self.config, for_optimizer=True)
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

    # ----- what is trained (a LoRA run trains adapters over a frozen base: lora.LoraTrainer) -----
    def _transformed(self):
        return build(model_for(self.config))

    def split(self, params) -> tuple[Any, Any]:
        """(the params the optimizer trains, the frozen rest): here all of them are trained."""
        return params, {}

    def join(self, trained, frozen):
        return trained

    # ----- traced functions -----
    def _init(self, key: jax.Array) -> TrainState:
        """key: a raw uint32[2] PRNG key."""
        dummy_BT = jnp.zeros((1, self.config.seq), jnp.int32)
        return self._from_params(self.model.init(key, dummy_BT))

    def _from_params(self, params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(self.split(params)[0]))

    def _loss(
        self, params, batch_BT1: jax.Array | Batch, n_targets: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(loss with the z-loss term, cross-entropy) of a (B, T + 1) token array or Batch; a loss mask
        restricts both to the targets it marks (see `cross_entropy` for `n_targets`), segment ids keep
        attention inside documents."""
        batch = as_batch(batch_BT1)
        segments_BT = None if batch.segment_ids is None else batch.segment_ids[:, :-1]
        logits_BTV = self.model.apply(params, None, batch.tokens[:, :-1], None, segments_BT)
        mask_BT = None if batch.loss_mask is None else batch.loss_mask[:, 1:] > 0
        ce, log_z_sq = cross_entropy(logits_BTV, batch.tokens[:, 1:], mask_BT, n_targets)
        return ce + self.config.z_loss * log_z_sq, ce

    def _step(
        self, state: TrainState, batch_ABT1: jax.Array | Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = as_batch(batch_ABT1)
        accumulation = batch.tokens.shape[0]
        # With a loss mask each micro-batch's loss is a sum over its targets divided by the whole step's
        # count, so that summed gradients are the gradient of the step's mean over the targets it counts.
        n_targets = None
        if batch.loss_mask is not None:
            n_targets = jnp.maximum(jnp.sum(batch.loss_mask[..., 1:] > 0).astype(jnp.float32), 1.0)
        trained, frozen = self.split(state.params)
        with sharding.activation_sharding(self.mesh), L.weight_gradients_transposed_first(self.on_cpu):
            grad_fn = jax.value_and_grad(
                lambda t, micro_BT1: self._loss(self.join(t, frozen), micro_BT1, n_targets), has_aux=True
            )

            def micro_step(grad_sum, micro_BT1):
                (_, ce), grads = grad_fn(trained, micro_BT1)
                return jax.tree_util.tree_map(jnp.add, grad_sum, grads), ce

            # float32 accumulator (never bf16: see REFERENCE section 3)
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
            zeros = jax.lax.with_sharding_constraint(zeros, self.grad_shardings)
            grad_sum, ce_A = jax.lax.scan(micro_step, zeros, batch)
            divisor = accumulation if n_targets is None else 1
            grads = jax.tree_util.tree_map(lambda g: g / divisor, grad_sum)
            grads = jax.lax.with_sharding_constraint(grads, self.optimizer_param_shardings)

            updates, opt_state = self.optimizer.update(grads, state.opt_state, trained)
            params = self.join(optax.apply_updates(trained, updates), frozen)
            metrics = {
                "loss": jnp.mean(ce_A) if n_targets is None else jnp.sum(ce_A),
                "grad_norm": optax.tree.norm(grads),
                "lr": self.schedule(state.step),
            }
            return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_loss(self, params, batch_BT1: jax.Array | Batch) -> jax.Array:
        """Mean cross-entropy over the batch's targets (those its loss mask marks, if it has one)."""
        with sharding.activation_sharding(self.mesh):
            return self._loss(params, batch_BT1)[1]

    # ----- host-side helpers -----
    def init_state(self, seed: int) -> TrainState:
        return self._jit_init(jax.random.PRNGKey(seed))

    def state_from_params(self, params) -> TrainState:
        """Step 0 with a fresh optimizer around `params`: where fine-tuning starts (schedule from step 0)."""
        return self._jit_from_params(params)

    # ----- what a run saves, resumes and samples (lora.LoraTrainer keeps the base out of its checkpoints) ---
    @property
    def abstract_saved_state(self) -> TrainState:
        """The structure (with shardings) of what `saved` returns: what a checkpoint restores into."""
        return self.abstract_state

    def saved(self, state: TrainState) -> TrainState:
        """What a checkpoint of `state` holds."""
        return state

    def checkpoint_extra(self) -> dict:
        """What a checkpoint's extra holds besides the run's own keys."""
        return {}

    def resumed(self, saved: TrainState, extra: dict, tune_model_path: str | None) -> TrainState:
        """The train state of a restored checkpoint (`saved`, and its `extra`)."""
        return saved

    def tuned_state(self, tune_model_path: str) -> TrainState:
        """Step 0 of a fine-tune from `tune_model_path`: our checkpoints (full or slim), a Hugging Face folder
        of the family, or an original GPT-J release."""
        from mesh_transformer.hf import load_pretrained_params

        return self.state_from_params(
            load_pretrained_params(tune_model_path, self.config, self.abstract_state.params)
        )

    def servable(self, params):
        """The params as sampling and export read them (the model's stored layout, nothing else)."""
        return params

    def global_batch(self, local: np.ndarray | Batch) -> jax.Array | Batch:
        """This process's rows (A, B / processes, T + 1) - a token array or a Batch of such arrays - as
        global arrays split over `dp`."""
        return jax.tree_util.tree_map(lambda a: sharding.global_array(a, self.batch_sharding), local)
