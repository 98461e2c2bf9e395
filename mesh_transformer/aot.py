"""Ahead-of-time compilation of the real train step for a TPU pod from a machine without one.

libtpu's compiler builds `train.Trainer`'s step for a named topology (`v3:8x16` = a v3-256) from shapes
alone, and reports per-device memory; this module compares it with `memory.estimate` and the device's HBM.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Compiling touches no TPU: skip libtpu's query of the GCE metadata server (stderr noise off a TPU VM; read
# when JAX is first imported) and its one-process-per-host lock (held by any other process that loaded it).
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Nor is this host part of a pod: without these, libtpu's start-up guesses at the pod's hosts and this host's
# place in it and prints errors (`Failed to find host bounds`, `TPU_WORKER_HOSTNAMES`). The compiled target
# is the topology named, whatever they say.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mesh_transformer import sharding  # noqa: E402
from mesh_transformer.config import Config, ConfigError  # noqa: E402
from mesh_transformer.errors import UserError  # noqa: E402
from mesh_transformer.memory import GiB, MemoryEstimate, estimate  # noqa: E402
from mesh_transformer.train import Trainer, make_trainer  # noqa: E402

# HBM per device (a core on v2/v3, a chip from v4 on), keyed by the topology's device_kind.
DEVICE_MEMORY_GIB = {
    "TPU v2": 8,
    "TPU v3": 16,
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v6 lite": 32,
}
TOPOLOGY_EXAMPLES = "v3:8x16 (a v3-256), v4:4x4x8, v5e:16x16"


class TpuCompilerUnavailable(UserError):
    """libtpu, which holds the TPU compiler, is not installed."""


class UnknownTopology(UserError):
    """The topology name is not one libtpu knows."""


class StepDoesNotFit(UserError):
    """The compiled step needs more memory per device than the device has."""


@dataclass(frozen=True)
class DeviceMemory:
    """The compiler's per-device figures, in bytes."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (the train state)
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclass
class AotResult:
    config: Config
    topology: str
    device_kind: str
    device_count: int
    device_memory: int  # HBM of one device, bytes
    estimate: MemoryEstimate
    compile_seconds: float
    memory: DeviceMemory | None  # None when the compiler itself gave up for lack of memory
    required: int  # the compiler's total per device (from its out-of-memory message when it gave up)
    compiled: Any = None  # jax.stages.Compiled, None when it did not fit

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.required <= self.device_memory

    def estimate_error(self) -> float:
        """(estimate - compiler) / compiler."""
        return self.estimate.total / self.required - 1.0


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology such as `v3:8x16`, described by libtpu without any TPU attached."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TpuCompilerUnavailable(
            "libtpu is not installed; the TPU compiler comes with it: pip install -e '.[tpu]'"
        ) from None
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", topology):
        raise UnknownTopology(
            f"unknown TPU topology {topology!r}; expected a name such as {TOPOLOGY_EXAMPLES}"
        )
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except jax.errors.JaxRuntimeError as e:
        if "INVALID_ARGUMENT" not in str(e):
            raise
        reason = str(e).split("\n")[0]
        raise UnknownTopology(
            f"unknown TPU topology {topology!r} ({reason}); expected a name such as {TOPOLOGY_EXAMPLES}"
        ) from None


def abstract_batch(trainer: Trainer) -> jax.ShapeDtypeStruct:
    """The step's token batch (accumulation steps, global batch, seq + 1) as a shape, already sharded."""
    c = trainer.config
    shape = (c.gradient_accumulation_steps, c.global_batch, c.seq + 1)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)


_OOM_TOTAL = re.compile(r"memory required for [^(]*\(([\d.]+)([KMGT])\)")


def _oom_bytes(message: str) -> int:
    match = _OOM_TOTAL.search(message)
    assert match, f"unrecognised out-of-memory message from the TPU compiler: {message}"
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


def compile_step(config: Config, topology: str) -> AotResult:
    """Compile `Trainer(config, mesh).step` for the topology's devices; nothing is allocated anywhere."""
    devices = tpu_devices(topology)
    if len(devices) != config.tpu_size:
        raise ConfigError(
            f"topology {topology} has {len(devices)} devices but the config's tpu_size is {config.tpu_size}"
        )
    device_kind = devices[0].device_kind
    if device_kind not in DEVICE_MEMORY_GIB:
        raise UnknownTopology(f"no HBM size known for {device_kind} (topology {topology!r})")
    trainer = make_trainer(config, sharding.mesh_for(config, devices))
    lowered = trainer.step.lower(trainer.abstract_state, abstract_batch(trainer))
    result = AotResult(
        config=config,
        topology=topology,
        device_kind=device_kind,
        device_count=len(devices),
        device_memory=DEVICE_MEMORY_GIB[device_kind] * GiB,
        estimate=estimate(config),
        compile_seconds=0.0,
        memory=None,
        required=0,
    )
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        result.compile_seconds = time.perf_counter() - start
        result.required = _oom_bytes(str(e))
        return result
    result.compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    result.memory = DeviceMemory(
        arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes,
        code=stats.generated_code_size_in_bytes,
    )
    result.required = result.memory.total
    result.compiled = compiled
    return result


def report(result: AotResult) -> str:
    c, m, est = result.config, result.memory, result.estimate
    gib = lambda n: f"{n / GiB:8.2f} GiB"
    lines = [
        f"topology {result.topology}: {result.device_count} x {result.device_kind}, "
        f"{result.device_memory / GiB:.0f} GiB each; mesh dp={c.dp} x mp={c.mp}",
        f"compile time: {result.compile_seconds:.1f} s",
    ]
    if m is None:
        lines.append(f"compiler: out of memory, needs {gib(result.required).strip()} per device")
    else:
        lines += [
            "memory per device (compiler):",
            f"  arguments   {gib(m.arguments)}  (train state and batch)",
            f"  outputs     {gib(m.outputs)}",
            f"  aliased     {gib(m.aliased)}  (outputs written over the donated state)",
            f"  temporaries {gib(m.temporaries)}",
            f"  code        {gib(m.code)}",
            f"  total       {gib(m.total)}",
        ]
    lines += [
        "memory per device (--dry-run estimate):",
        f"  params {gib(est.params).strip()}, optimizer {gib(est.optimizer).strip()}, "
        f"gradients {gib(est.gradients).strip()}, activations {gib(est.activations).strip()}, "
        f"update {gib(est.update).strip()}",
        f"  total       {gib(est.total)}  ({result.estimate_error():+.0%} vs the compiler)",
    ]
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"{verdict}: {result.required / GiB:.2f} of {result.device_memory / GiB:.0f} GiB per device")
    return "\n".join(lines)


def check(config: Config, topology: str, echo: Callable[[str], None] = print) -> AotResult:
    """Compile, print the report, and raise `StepDoesNotFit` when the step is too big for the device."""
    return require_fit(compile_step(config, topology), echo)


def require_fit(result: AotResult, echo: Callable[[str], None] = print) -> AotResult:
    """Print a compiled step's report, and raise `StepDoesNotFit` when the step is too big for the device."""
    echo(report(result))
    if not result.fits:
        raise StepDoesNotFit(
            f"the train step of this config needs {result.required / GiB:.2f} GiB per device, "
            f"more than the {result.device_memory / GiB:.0f} GiB of a {result.device_kind} "
            f"(topology {result.topology}); see the report above"
        )
    return result


# ----- golden shardings -----


def state_shardings(compiled) -> dict[str, str]:
    """Partition spec of every train-state leaf as the compiled step receives it, keyed by tree path."""
    (state_shardings_tree, _batch), _ = compiled.input_shardings
    leaves = jax.tree_util.tree_leaves_with_path(state_shardings_tree)
    return {jax.tree_util.keystr(path): str(tuple(s.spec)) for path, s in leaves}


def dump_shardings(shardings: dict[str, str]) -> str:
    return json.dumps(shardings, indent=1, sort_keys=True) + "\n"
