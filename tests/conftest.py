"""Test session set-up: 8 fake CPU devices, so multi-device meshes run on a CPU-only machine."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Keep Ray, wandb and Hugging Face offline and local in every test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# One persistent compilation cache for every process of the session: the xdist workers (this runs first in
# the controller, whose environment they inherit) and the commands, Ray hosts and resumed runs the tests
# start. A program compiled once (the same tiny model's train step in a run and in its resumption) is read
# back from it afterwards, instead of compiled again; the cache goes at the end of the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mesh-transformer-tests-jax-cache-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_CACHE = None

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices; was JAX initialised before conftest?"


def pytest_xdist_auto_num_workers(config):
    """Workers of `-n auto`: one per core, at most one per 6 GiB of memory (a worker with its Ray actors and
    compiled programs peaks near 5 GiB), and at most 4 (each worker's 8 fake devices keep every core busy)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(os.cpu_count() or 1, memory // (6 << 30), 4))


def pytest_sessionfinish(session):
    if _OWN_CACHE is not None:  # the process that made the session's cache (the controller, or the only one)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
