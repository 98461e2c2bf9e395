"""Everything about device placement: the (dp, mp) mesh, logical axes to mesh axes, and activation
constraints. Model code names logical axes ("batch", "heads", ...); each architecture's file gives the logical
axes of its params (`param_axes`); this module alone maps them to mesh axes.

Tensor parallelism follows the original: q/k/v, the MLP's first projection and the LM head split their output
dim over `mp`, the attention output and the MLP's second projection their input dim, the embedding its vocab;
the batch splits over `dp`.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer.config import Config

DP, MP = "dp", "mp"

# Logical axis -> mesh axis. "embed" is None (replicated) under plain tensor parallelism; the ZeRO
# switches map it to `dp` for optimizer state (and params), see `logical_rules`.
TENSOR_PARALLEL_RULES: dict[str, str | None] = {
    "batch": DP,
    "seq": None,
    "embed": None,
    "heads": MP,
    "mlp": MP,
    "vocab": MP,
    "layers": None,
}


def make_mesh(dp: int, mp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (dp, mp) mesh with Auto axes (GSPMD propagation), model-parallel groups on neighbouring devices."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != dp * mp:
        raise ValueError(f"a ({dp}, {mp}) mesh needs {dp * mp} devices, {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(dp, mp), (DP, MP))


def mesh_for(config: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return make_mesh(config.dp, config.mp, devices)


def on_cpu(mesh: Mesh) -> bool:
    """Whether the mesh's devices are CPUs, whose programs get CPU-only kernel and layout choices (the train
    step's weight-gradient layout, LoRA's layout pin, the engine's dot kernels)."""
    return mesh.devices.flat[0].platform == "cpu"


def logical_rules(config: Config | None = None, *, for_optimizer: bool = False) -> dict[str, str | None]:
    """Mesh axis of every logical axis; the ZeRO switches also split the embed dim over `dp`."""
    rules = dict(TENSOR_PARALLEL_RULES)
    if config is not None and (
        config.shard_params_over_dp or (for_optimizer and config.shard_optimizer_over_dp)
    ):
        rules["embed"] = DP
    return rules


def gradient_rules(config: Config) -> dict[str, str | None]:
    """Mesh axes of the float32 gradient accumulator: embed split over `dp` whenever d_model divides by dp.

    Each micro-batch's gradients are then reduce-scattered over `dp` instead of all-reduced, so the
    accumulator costs 1/dp of the params; without this the 6B step needs a second full copy of the params
    and does not fit a v3 core's 16 GiB. The optimizer receives them in its own sharding (`for_optimizer`).
    """
    rules = logical_rules(config, for_optimizer=True)
    if config.d_model % config.dp == 0:
        rules["embed"] = DP
    return rules


def spec_for(logical_axes: Sequence[str | None], rules: Mapping[str, str | None]) -> PartitionSpec:
    mesh_axes = [rules[a] if a is not None else None for a in logical_axes]
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(logical_axes)} map two dims to one mesh axis: {mesh_axes}")
    return PartitionSpec(*mesh_axes)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of a param ("root/module/param"), from its architecture's partition rules."""
    from mesh_transformer.models import all_param_axes

    # Decoding's one-array-per-layer weights ("gptj/layer_3/fc_in/w", `layers.unstack_layers`) split like one
    # layer of the stacked array.
    if layer := re.fullmatch(r"([^/]+)/layer_\d+/(.+)", path):
        return param_logical_axes(f"{layer[1]}/layers/block/{layer[2]}", ndim + 1)[1:]
    if path.endswith(("/lora_a", "/lora_b")):  # a LoRA adapter splits like the weight it adapts
        from mesh_transformer.lora import adapter_axes

        return adapter_axes(path, param_logical_axes(path.rsplit("/", 1)[0] + "/w", ndim))
    matches = [(pattern, axes) for pattern, axes in all_param_axes() if re.search(pattern, path)]
    assert len(matches) <= 1, f"parameter {path!r} matches several partition rules: {matches}"
    if not matches:
        raise KeyError(f"no partition rule matches parameter {path!r}")
    pattern, axes = matches[0]
    assert len(axes) == ndim, f"rule {pattern} has {len(axes)} axes, {path} has {ndim} dims"
    return axes


def param_path(module: str, name: str) -> str:
    return f"{module}/{name}"


def param_specs(params, rules: Mapping[str, str | None]):
    """PartitionSpec of every parameter (a Haiku params dict, or one of its shape structs)."""
    return {
        module: {
            name: spec_for(param_logical_axes(param_path(module, name), len(p.shape)), rules)
            for name, p in leaves.items()
        }
        for module, leaves in params.items()
    }


def tree_shardings(mesh: Mesh, specs):
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (gradient_accumulation_steps, batch, seq + 1): rows split over `dp`."""
    return NamedSharding(mesh, PartitionSpec(None, DP, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# Generation's KV cache (per layer: batch, heads, then slots and head_dim in the order keys or values keep
# them) splits like attention: heads over `mp`.
KV_CACHE_AXES: tuple[str | None, ...] = ("batch", "heads", None, None)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(KV_CACHE_AXES, TENSOR_PARALLEL_RULES))


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Per-row arrays of generation (tokens, sampling settings, PRNG keys): rows split over `dp`."""
    return NamedSharding(mesh, PartitionSpec(DP, *([None] * (ndim - 1))))


# ----- activation constraints, active only while a mesh is installed with `activation_sharding` -----

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, str | None]] | None] = contextvars.ContextVar(
    "mesh_transformer_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(
    mesh: Mesh, rules: Mapping[str, str | None] = TENSOR_PARALLEL_RULES
) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical_axes, rules)))


def global_array(local: np.ndarray, array_sharding: NamedSharding) -> jax.Array:
    """Assemble a global array from each process's contiguous block of rows along the sharded axis."""
    global_shape = list(local.shape)
    for dim, axis in enumerate(array_sharding.spec):
        if axis is not None:
            global_shape[dim] *= jax.process_count()
    return jax.make_array_from_process_local_data(array_sharding, local, tuple(global_shape))
