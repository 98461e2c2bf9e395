"""Per-device memory estimate of a training step, computed from shapes alone (nothing is built on devices).

Used by `device_train.py --dry-run` to tell, in seconds, whether a config fits before a pod is rented; the
ahead-of-time compile (`scripts/aot_compile.py`) gives the compiler's exact figure to compare with.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mesh_transformer import sharding
from mesh_transformer.config import Config
from mesh_transformer.models import is_stacked, model_for, param_count

GiB = 1024**3


class MemoryEstimate(NamedTuple):
    """Bytes one device holds. The step's peak is the state plus the larger of its two phases: the
    micro-batches (gradients + activations), then the optimizer update (`update`) once activations are gone.
    Calibrated against the TPU compiler (`scripts/aot_compile.py`): within 25% for the shipped configs."""

    params: int  # float32 master weights held by one device
    optimizer: int  # Adam moments (two float32 copies) held by one device
    gradients: int  # float32 accumulator + one micro-batch's gradients, both split over dp
    activations: int  # what the forward keeps for the backward, plus one layer's recompute and the logits
    update: int  # during the update: accumulator + gradients (or updates) gathered to the params' sharding

    @property
    def total(self) -> int:
        return self.params + self.optimizer + max(self.gradients + self.activations, self.update)


def abstract_params(config: Config):
    """Shapes and dtypes of the model's params (the stored layout), via tracing only."""
    return model_for(config).abstract_params(config.seq)


def run_params(config: Config):
    """Shapes and dtypes of what a run trains over: the model's params, and a LoRA run's adapters."""
    from mesh_transformer import lora

    spec = lora.spec_for(config)
    if spec is None:
        return abstract_params(config)
    return lora.join(lora.abstract_adapters(model_for(config), spec, config.seq), abstract_params(config))


def _sharded_bytes(params, rules, mesh_sizes: dict[str, int], itemsize=lambda name: 4) -> int:
    total = 0
    for module, leaves in params.items():
        for name, p in leaves.items():
            spec = sharding.spec_for(sharding.param_logical_axes(f"{module}/{name}", len(p.shape)), rules)
            shards = int(np.prod([mesh_sizes[a] for a in spec if a is not None]))
            total += int(np.prod(p.shape)) * itemsize(name) // shards
    return total


def estimate(config: Config, params=None) -> MemoryEstimate:
    """A LoRA run (lora_rank > 0) trains its adapters only: its frozen base counts in `params`, in the dtypes
    `lora.frozen_dtype` keeps it in, and has no optimizer state or gradients."""
    from mesh_transformer import lora

    params = run_params(config) if params is None else params
    trained, frozen = lora.split(params) if config.lora_rank else (params, {})
    mesh_sizes = {sharding.DP: config.dp, sharding.MP: config.mp}
    frozen_size = lambda name: lora.frozen_dtype(name, config.compute_dtype).itemsize  # noqa: E731
    frozen_bytes = _sharded_bytes(frozen, sharding.logical_rules(config), mesh_sizes, frozen_size)
    param_bytes = _sharded_bytes(trained, sharding.logical_rules(config), mesh_sizes)
    opt_param_bytes = _sharded_bytes(trained, sharding.logical_rules(config, for_optimizer=True), mesh_sizes)
    grad_bytes = _sharded_bytes(trained, sharding.gradient_rules(config), mesh_sizes)
    if config.shard_params_over_dp:
        update = grad_bytes + 2 * opt_param_bytes  # gradients and updates, all split over dp
    else:
        # Params replicated over dp need the whole update: the gradients gathered to the moments' sharding
        # (plain), or the updates gathered back from it (ZeRO-1). XLA streams part of it, not all.
        update = grad_bytes + param_bytes

    # Activations of one micro-batch on one device (batch split over dp; heads, mlp, vocab over mp).
    B, T, L = config.per_replica_batch, config.seq, config.layers
    act = 2 if config.compute_dtype != "float32" else 4
    one_layer = model_for(config).layer_activation_bytes(B, T, config.mp, act)
    if config.remat == "layer":
        kept = (
            L * B * T * config.d_model * 4 + one_layer
        )  # each layer's input, plus one recomputed in backward
    else:
        kept = L * one_layer
    if config.shard_params_over_dp:
        # one layer's weights gathered over dp (float32 and compute dtype), the next one prefetched
        layer_weights = param_count({m: p for m, p in params.items() if is_stacked(m)}) // L
        kept += 2 * layer_weights // config.mp * (4 + act)
    logits = 3 * B * T * config.n_vocab // config.mp * 4  # logits, their gradient, the one-hot product
    return MemoryEstimate(
        frozen_bytes + param_bytes, 2 * opt_param_bytes, 2 * grad_bytes, kept + logits, update
    )
