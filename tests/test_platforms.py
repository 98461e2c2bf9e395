"""A clean console: on this machine (libtpu installed, no TPU attached) commands print none of libtpu's
start-up errors, `--aot` still compiles with libtpu, and a machine with a TPU keeps its TPU backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import TINY_MODEL

from mesh_transformer import platforms

ROOT = Path(__file__).resolve().parent.parent
LIBTPU_NOISE = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "InitGoogle")


def command_line(*args: str) -> subprocess.CompletedProcess:
    """A command as a user runs it: no JAX_PLATFORMS (the test session sets one) and no forced devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_prints_nothing_on_stderr():
    done = command_line("device_train.py", "--config", "configs/demo.json", "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    assert "mesh: dp=4 x mp=2 (8 devices)" in done.stdout


def test_aot_still_compiles_with_libtpu_and_quietly(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(TINY_MODEL, tpu_size=8, cores_per_replica=4, compute_dtype="float32")))
    done = command_line("device_train.py", "--config", str(config), "--aot", "v3:2x2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "topology v3:2x2: 8 x TPU v3" in done.stdout and "fits:" in done.stdout
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)]


@pytest.fixture
def no_platform_choice(monkeypatch):
    """A machine where nothing chose a platform yet; records what skip_absent_tpu sets."""
    monkeypatch.delenv("JAX_PLATFORMS")
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setattr(platforms, "gpu_attached", lambda: False)
    return updates


def test_a_machine_without_a_tpu_runs_jax_on_the_cpu(no_platform_choice, monkeypatch):
    monkeypatch.setattr(platforms, "tpu_chips", lambda: 0)
    platforms.skip_absent_tpu()
    assert no_platform_choice == [("jax_platforms", "cpu")] and os.environ["JAX_PLATFORMS"] == "cpu"


def test_a_tpu_host_keeps_its_tpu(no_platform_choice, monkeypatch):
    monkeypatch.setattr(platforms, "tpu_chips", lambda: 4)
    platforms.skip_absent_tpu()
    assert no_platform_choice == [] and "JAX_PLATFORMS" not in os.environ


def test_a_platform_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    monkeypatch.setattr(platforms, "tpu_chips", lambda: pytest.fail("no need to look for chips"))
    platforms.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cuda,cpu"
