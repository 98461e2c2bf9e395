"""Exact resume: device_train.py killed with SIGKILL at random points (mid-save included) and restarted ends
bit-identical to a run that never stopped, and no committed checkpoint is ever damaged; fine-tuning from a
slim checkpoint starts a fresh optimizer and schedule."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_MODEL

from mesh_transformer import data
from mesh_transformer.checkpoint import COMMIT_MARKER, CheckpointManager, slim_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
CONFIG = dict(
    TINY_MODEL,
    tpu_size=8,
    cores_per_replica=2,
    per_replica_batch=1,
    gradient_accumulation_steps=2,
    warmup_steps=3,
    anneal_steps=10,
    lr=1e-2,
    end_lr=1e-3,
    weight_decay=0.1,
    total_steps=STEPS,
    ckpt_every=2,
    keep_n=2,
    keep_every=4,
    val_batches=0,
    compute_dtype="float32",
    remat="none",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, str]:
    """(config file, prepared dataset) of a tiny model on generated words."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "lambda", "yield", "\n"]
    docs = [f"doc{i} " + " ".join(rng.choice(words, rng.integers(5, 80))) for i in range(300)]
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dataset = str(root / "dataset")
    data.prepare_dataset([str(source)], dataset, train_tokenizer_vocab=300, val_fraction=0.05, seq=16)
    config = root / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    return config, dataset


def command(config: Path, dataset: str, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "device_train.py"), "--config", str(config), "--data", dataset] + [
        "--model-dir",
        str(model_dir),
        "--no-progress",
        "--sample-tokens",
        "0",
        *extra,
    ]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]


def committed_files(model_dir: Path) -> dict[int, dict[str, str]]:
    """step -> {file name: sha256} of every committed checkpoint."""
    out = {}
    for step in CheckpointManager(str(model_dir)).committed_steps():
        step_dir = model_dir / f"step_{step}"
        out[step] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(step_dir.iterdir())}
    return out


def kill_at(proc: subprocess.Popen, model_dir: Path, mid_save: bool, delay: float) -> str:
    """Once `proc` has committed a checkpoint of its own, SIGKILL it the moment its next save is under way
    (a step directory with pieces but no marker), or `delay` seconds later; returns what was interrupted."""
    before = set(CheckpointManager(str(model_dir)).committed_steps())
    committed_at = None
    while proc.poll() is None:
        if committed_at is None:
            if set(CheckpointManager(str(model_dir)).committed_steps()) - before:
                committed_at = time.monotonic()
        elif mid_save:
            for d in model_dir.glob("step_*"):
                if not (d / COMMIT_MARKER).exists() and any(d.glob("*.safetensors")):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return f"mid-save of {d.name}"
        elif time.monotonic() - committed_at > delay:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"{delay:.2f} s after a commit"
        time.sleep(0.001)
    return "finished before the kill"


def test_killed_and_resumed_run_ends_bit_identical(setup, tmp_path: Path) -> None:
    config, dataset = setup
    straight = tmp_path / "straight"
    run(command(config, dataset, straight))

    interrupted = tmp_path / "interrupted"
    rng = np.random.default_rng(1)
    seen: dict[int, dict[str, str]] = {}
    outcomes = []
    for mid_save in (True, False, True):
        proc = subprocess.Popen(
            command(config, dataset, interrupted),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        outcomes.append(kill_at(proc, interrupted, mid_save, delay=float(rng.uniform(0.0, 0.5))))
        # A committed checkpoint never changes afterwards (until retention deletes it whole).
        now = committed_files(interrupted)
        for step, files in now.items():
            assert seen.get(step, files) == files, f"committed step {step} changed after {outcomes[-1]}"
        seen.update(now)
    assert any(o.startswith("mid-save") for o in outcomes), outcomes
    run(command(config, dataset, interrupted))

    final = committed_files(interrupted)
    assert max(final) == STEPS
    for step, files in final.items():
        assert seen.get(step, files) == files, f"committed step {step} changed"
    # Same mesh, same format: the final checkpoints' piece files are byte for byte the same.
    reference = committed_files(straight)
    assert sorted(reference) == sorted(final) == [4, 8, 10, 12]  # keep_n=2 newest + every 4th
    for step in final:
        pieces = {k: v for k, v in final[step].items() if k.endswith(".safetensors")}
        assert pieces == {k: v for k, v in reference[step].items() if k.endswith(".safetensors")}, (
            step,
            outcomes,
        )
    extra = json.loads((interrupted / f"step_{STEPS}" / "checkpoint.json").read_text())["extra"]
    assert (
        extra["loader"]
        == json.loads((straight / f"step_{STEPS}" / "checkpoint.json").read_text())["extra"]["loader"]
    )


def steps_logged(model_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r]


def test_tune_model_path_starts_from_slim_params_with_fresh_optimizer(setup, tmp_path: Path) -> None:
    config, dataset = setup
    base = tmp_path / "base"
    run(command(config, dataset, base, "--steps", "4"))
    slim = tmp_path / "slim"
    slim_checkpoint(str(base), str(slim))

    tuned = tmp_path / "tuned"
    run(command(config, dataset, tuned, "--steps", "2", "--tune-model-path", str(slim)))
    base_log, tuned_log = steps_logged(base), steps_logged(tuned)
    assert [r["step"] for r in tuned_log] == [1, 2]
    assert [r["lr"] for r in tuned_log] == [r["lr"] for r in base_log[:2]]  # the schedule restarted at 0
    assert tuned_log[0]["loss"] < base_log[0]["loss"] - 0.5  # it started from the trained weights
    state_meta = json.loads((tuned / "step_2" / "checkpoint.json").read_text())
    assert state_meta["step"] == 2

    # Once the tuned model_dir holds a checkpoint, a restart resumes it rather than the slim weights.
    run(command(config, dataset, tuned, "--steps", "3", "--tune-model-path", str(slim)))
    assert [r["step"] for r in steps_logged(tuned)] == [1, 2, 3]


def test_tune_model_path_that_does_not_exist_is_one_line(setup, tmp_path: Path) -> None:
    config, dataset = setup
    done = subprocess.run(
        command(config, dataset, tmp_path / "run", "--tune-model-path", str(tmp_path / "nowhere")),
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere: no checkpoint found" in lines[0], done.stderr[-2000:]


def test_tune_model_path_takes_a_hugging_face_folder(setup, tmp_path: Path) -> None:
    """A GPT-J saved by `transformers` starts a fine-tune: the saved step-1 model computes transformers'
    logits, and since the first step's lr is 0 (warmup) its params are exactly the imported weights."""
    import jax
    import torch
    from test_model import random_hf_model

    from mesh_transformer.checkpoint import load_params
    from mesh_transformer.config import from_dict
    from mesh_transformer.hf import load_pretrained_params
    from mesh_transformer.memory import abstract_params
    from mesh_transformer.models import build, model_for

    config, dataset = setup
    hf = random_hf_model(
        n_embd=CONFIG["d_model"],
        n_head=CONFIG["n_heads"],
        n_layer=CONFIG["layers"],
        rotary_dim=CONFIG["pe_rotary_dims"],
        vocab=CONFIG["n_vocab"],
    )
    hf.config.bos_token_id = hf.config.eos_token_id = 0
    hf.save_pretrained(tmp_path / "hf")
    run(
        command(
            config, dataset, tmp_path / "tuned", "--steps", "1", "--tune-model-path", str(tmp_path / "hf")
        )
    )
    ours = from_dict(CONFIG)
    tuned = jax.device_get(load_params(str(tmp_path / "tuned" / "step_1"), abstract_params(ours)))
    tokens_BT = np.random.default_rng(0).integers(0, CONFIG["n_vocab"], (2, CONFIG["seq"]))
    logits = build(model_for(ours)).apply(tuned, None, tokens_BT)
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens_BT)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    imported = load_pretrained_params(str(tmp_path / "hf"), ours)
    for module, leaves in imported.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(np.asarray(tuned[module][name]), value, err_msg=f"{module}/{name}")
