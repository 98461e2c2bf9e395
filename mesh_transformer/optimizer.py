"""The optimizer of the original trainer, in optax: clip by global norm 1.0, Adam, decoupled weight decay on
matrices only, and the `gpt3_schedule` learning rate (linear warmup, cosine anneal to `end_lr`, then flat).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mesh_transformer.config import Config
from mesh_transformer.models import is_stacked


def gpt3_schedule(warmup_steps: int, anneal_steps: int, lr: float, end_lr: float) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, cosine lr -> end_lr over `anneal_steps`, then end_lr."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup_pct = jnp.clip(step, 0, warmup_steps) / warmup_steps if warmup_steps else 1.0
        anneal_pct = jnp.clip(step - warmup_steps, 0, anneal_steps) / anneal_steps
        return warmup_pct * lr - (lr - end_lr) * (1 - jnp.cos(jnp.pi * anneal_pct)) / 2

    return schedule


def schedule_for(config: Config) -> optax.Schedule:
    return gpt3_schedule(config.warmup_steps, config.anneal_steps, config.lr, config.end_lr)


def decay_mask(params):
    """True for weight matrices (per layer), False for biases, norms - the original decayed ndim > 1 only."""
    return {
        module: {name: (p.ndim - is_stacked(module)) > 1 for name, p in leaves.items()}
        for module, leaves in params.items()
    }


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule_for(config)),
    )
