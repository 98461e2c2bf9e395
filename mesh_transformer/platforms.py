"""Which JAX platforms a command starts. JAX tries every backend it finds installed, and libtpu (installed for
TPU pods and for ahead-of-time compilation) prints start-up errors on a machine that has no TPU; such a
machine skips it. A TPU host, and JAX_PLATFORMS set by the user, are left alone.
"""

from __future__ import annotations

import importlib.util
import os


def skip_absent_tpu() -> None:
    """Restrict JAX to the CPU where libtpu is installed but no TPU chip (and no GPU) is attached; call before
    JAX starts a backend. Child processes (local Ray actors) inherit the choice through JAX_PLATFORMS."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if tpu_chips() > 0 or gpu_attached():
        return
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def tpu_chips() -> int:
    """TPU chips on this machine's PCI bus, found the way JAX itself looks for them."""
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def gpu_attached() -> bool:
    from jax._src import hardware_utils

    return hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")  # NVIDIA, AMD ROCm
