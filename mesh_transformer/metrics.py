"""Training figures: model FLOPs per token, the hardware's peak, MFU, and the `metrics.jsonl` log.

MFU = achieved model FLOP/s / peak FLOP/s of all devices, with model FLOPs per token (PaLM appendix B)
    6 * N  +  6 * L * D * T
where N counts parameters that take part in matmuls (all but the input embedding), and the second term is the
causal self-attention (QK^T and AV: 2 * 2 * T * D per token forward, times 3 for forward + backward, halved
because a causal mask needs only half the score matrix).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from smart_open import open as smart_open_file

from mesh_transformer.config import Config

# Dense bf16 peak per JAX device (a TPU v2/v3 core is one device; v4 and later expose one device per chip).
PEAK_BF16_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def flops_per_token(config: Config, matmul_params: int) -> float:
    """Model FLOPs (forward + backward) per trained token; see the module docstring."""
    return 6.0 * matmul_params + 6.0 * config.layers * config.d_model * config.seq


def matmul_params(config: Config, total_params: int) -> int:
    return total_params - config.n_vocab * config.d_model  # the input embedding is a lookup


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of one n x n matmul on the first device (all host cores serve one CPU device's op)."""
    accumulate = jnp.float32
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=accumulate))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(devices: list[jax.Device], compute_dtype: str) -> float:
    """Peak FLOP/s of all `devices` together: a datasheet figure for accelerators, measured for CPUs.

    Fake CPU devices share the host's cores, so their joint peak is the host's, measured once."""
    kind = devices[0].device_kind
    for name, peak in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return peak * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops(compute_dtype)
    return float("nan")


class MetricsLog:
    """Appends one JSON object per line to `{model_dir}/metrics.jsonl` (kept across resumes)."""

    def __init__(self, model_dir: str, enabled: bool = True):
        self.path = f"{model_dir.rstrip('/')}/metrics.jsonl"
        self.enabled = enabled
        self._lines: list[str] = []
        self._local = "://" not in self.path
        if enabled and self._local:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        elif enabled:  # keep what an earlier run logged: it is rewritten whole on close
            try:
                with smart_open_file(self.path, "r") as f:
                    self._lines = f.read().splitlines()
            except (FileNotFoundError, OSError):
                self._lines = []

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        if self._local:
            self._file.write(line + "\n")
            self._file.flush()
        else:  # object stores cannot append: rewrite the whole log on close
            self._lines.append(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._local:
            self._file.close()
        elif self._lines:
            with smart_open_file(self.path, "w") as f:
                f.write("\n".join(self._lines) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
