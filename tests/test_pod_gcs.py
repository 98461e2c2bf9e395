"""The pod user's whole path on Google Cloud Storage, through the command line against a GCS emulator: data,
checkpoints and metrics all in a bucket. A fresh run; the same run SIGKILLed at a random step and resumed to
bit-identical checkpoints and losses (what it logged up to its last committed checkpoint having survived the
kill); validation; the Hugging Face export, a sample and the plot, all from gs://; and a 2-host Ray run that
loses a host and then suffers a storage failure while saving, recovered to the very checkpoint of an
uninterrupted 2-host run. No command prints libtpu's start-up errors."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from helpers import TINY_MODEL, gcs_emulator

from mesh_transformer import cluster, storage
from mesh_transformer.checkpoint import CheckpointManager, ParamPieces
from mesh_transformer.config import from_dict
from mesh_transformer.hf import param_key
from mesh_transformer.metrics import read_metrics
from mesh_transformer.models.gptj import GLOBAL_NAMES
from mesh_transformer.prepare import prepare_dataset
from mesh_transformer.run import RunOptions

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BUCKET = "pod"
DATA = f"gs://{BUCKET}/data"
STEPS = 12
TINY = dict(
    TINY_MODEL,
    tpu_size=8,
    cores_per_replica=4,  # a (2, 4) mesh; with 2 hosts, each holds one model replica
    per_replica_batch=2,
    warmup_steps=2,
    anneal_steps=20,
    lr=1e-2,
    end_lr=1e-3,
    weight_decay=0.1,
    total_steps=STEPS,
    ckpt_every=3,
    keep_n=10,
    val_batches=1,
    val_every=6,
    compute_dtype="float32",
    remat="none",
)
RAY_STEPS = 8
# Two hosts of 2 devices, one model replica each (validation is the single process's to test). The Adam
# moments are split over dp too, so that host 1 also holds pieces to save (else host 0 holds every one).
RAY_TINY = dict(
    TINY, tpu_size=4, cores_per_replica=2, total_steps=RAY_STEPS, ckpt_every=2, val_batches=0,
    shard_optimizer_over_dp=True,
)  # fmt: skip
LIBTPU_NOISE = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "InitGoogle")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Iterator[Path]:
    """An emulated bucket holding a prepared dataset; yields a local scratch directory."""
    tmp = tmp_path_factory.mktemp("pod")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "lambda", "yield", "\n"]
    docs = [f"doc{i} " + " ".join(rng.choice(words, rng.integers(5, 80))) for i in range(300)]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with gcs_emulator(tmp, BUCKET):
        prepare_dataset([str(tmp / "docs.jsonl")], DATA, train_tokenizer_vocab=300, val_fraction=0.1, seq=16)
        (tmp / "tiny.json").write_text(json.dumps(TINY))
        (tmp / "ray.json").write_text(json.dumps(RAY_TINY))
        yield tmp


def command(*args: str) -> list[str]:
    return [sys.executable, *args]


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no JAX_PLATFORMS (the test session sets one)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return dict(env, **extra)


def check_clean(stderr: str) -> None:
    noise = [line for line in stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)]
    assert not noise and "Traceback" not in stderr, stderr[-3000:]


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(*args), cwd=ROOT, env=env or user_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check_clean(done.stderr)
    return done


def train_args(bucket: Path, model_dir: str, config: str = "tiny.json") -> list[str]:
    return ["device_train.py", "--config", str(bucket / config), "--model-dir", model_dir, "--data", DATA]


def step_files(model_dir: str, step: int) -> dict[str, bytes]:
    directory = storage.join(model_dir, f"step_{step}")
    files, _ = storage.list_dir(directory)
    assert "COMMITTED" in files, files
    return {name: storage.read_bytes(storage.join(directory, name)) for name in files}


def losses(model_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(model_dir)[0]]


@pytest.fixture(scope="module")
def fresh_run(bucket) -> str:
    """A fresh run on gs://: it used to crash on its first action (reading the old log)."""
    model_dir = f"gs://{BUCKET}/fresh"
    run(*train_args(bucket, model_dir), "--sample-tokens", "0", "--no-progress")
    return model_dir


def test_a_fresh_run_trains_validates_and_logs_in_the_bucket(fresh_run):
    records, events = read_metrics(fresh_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val/default/loss" in r] == [6, 12]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6, 9, 12]
    assert CheckpointManager(fresh_run).committed_steps() == [3, 6, 9, 12]
    assert records[-1]["loss"] < records[0]["loss"]


def kill_at_step(args: list[str], step: int) -> int:
    """Start a run and SIGKILL it once its progress bar shows `step` or later; returns the step seen."""
    proc = subprocess.Popen(command(*args), cwd=ROOT, env=user_env(), stderr=subprocess.PIPE)
    seen, text = [0], []

    def read() -> None:
        while chunk := proc.stderr.read1(4096):
            text.append(chunk.decode(errors="replace"))
            found = re.findall(rf"(\d+)/{STEPS} \[", "".join(text)[-400:])
            if found and int(found[-1]) >= step and not seen[0]:
                seen[0] = int(found[-1])
                proc.send_signal(signal.SIGKILL)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "".join(text)[-3000:]
    check_clean("".join(text))
    return seen[0]


@pytest.fixture(scope="module")
def resumed_run(bucket, fresh_run) -> str:
    """The same run killed at a random step (after a checkpoint, before the end) and run again."""
    model_dir = f"gs://{BUCKET}/killed"
    target = random.randint(7, STEPS - 1)  # from step 7 on, the step-3 save has committed (step 6 waited)
    seen = kill_at_step([*train_args(bucket, model_dir), "--sample-tokens", "0"], target)
    committed = CheckpointManager(model_dir).latest_step()
    assert committed is not None and 3 <= committed < STEPS, (target, seen, committed)
    logged = [r["step"] for r in read_metrics(model_dir)[0]]
    # everything logged up to the last committed checkpoint survived the SIGKILL
    assert logged[:committed] == list(range(1, committed + 1)), (target, seen, committed, logged)
    run(*train_args(bucket, model_dir), "--sample-tokens", "0", "--no-progress")
    _, events = read_metrics(model_dir)
    assert [e["step"] for e in events if e["event"] == "resume"] == [committed]
    return model_dir


def test_a_run_killed_at_a_random_step_resumes_bit_identical(fresh_run, resumed_run):
    assert step_files(resumed_run, STEPS) == step_files(fresh_run, STEPS)
    assert losses(resumed_run) == losses(fresh_run)
    fresh_val = [r.get("val/default/loss") for r in read_metrics(fresh_run)[0]]
    assert [r.get("val/default/loss") for r in read_metrics(resumed_run)[0]] == fresh_val


def test_export_sample_and_plot_read_the_run_from_the_bucket(bucket, resumed_run, tmp_path):
    from transformers import AutoTokenizer, GPTJForCausalLM

    hf_dir = f"gs://{BUCKET}/hf"
    done = run("to_hf_weights.py", "--config", str(bucket / "tiny.json"), "--ckpt", resumed_run,
               "--output-path", hf_dir, "--tokenizer", DATA)  # fmt: skip
    assert done.stdout.startswith(f"wrote {hf_dir}: 1 safetensors file(s)"), done.stdout
    local = tmp_path / "hf"
    local.mkdir()
    for name in storage.list_dir(hf_dir)[0]:
        (local / name).write_bytes(storage.read_bytes(storage.join(hf_dir, name)))
    model = GPTJForCausalLM.from_pretrained(local)
    AutoTokenizer.from_pretrained(local)
    pieces = ParamPieces(resumed_run)
    state = model.state_dict()
    for (module, name), (hf_name, transpose) in GLOBAL_NAMES.items():
        shape, _ = pieces.shapes[param_key(module, name)]
        ours = np.zeros(shape, np.float32)
        for box, values in pieces.pieces(param_key(module, name)):
            ours[tuple(slice(lo, hi) for lo, hi in box)] = values
        np.testing.assert_array_equal(state[hf_name].numpy(), ours.T if transpose else ours)

    done = run("device_sample.py", "--config", str(bucket / "tiny.json"), "--ckpt", resumed_run,
               "--tokenizer", DATA, "--prompt", "def", "--max-tokens", "8", "--temperature", "0")  # fmt: skip
    assert done.stdout.startswith("def") and len(done.stdout.strip()) > len("def")

    done = run(str(Path("scripts") / "plot_metrics.py"), resumed_run)
    assert done.stdout.strip() == f"wrote {resumed_run}/metrics.png"
    assert storage.read_bytes(f"{resumed_run}/metrics.png").startswith(b"\x89PNG\r\n\x1a\n")


@pytest.fixture(scope="module")
def local_ray(bucket) -> Iterator[str]:
    """Ray on 127.0.0.1, started while STORAGE_EMULATOR_HOST is set, so that its actors reach the bucket."""
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_two_hosts_recover_from_a_lost_host_and_a_failed_save_bit_identical(bucket, local_ray):
    """Host 0 (the coordinator) is SIGKILLed after step 5; in the group that replaces it, host 1's writes of
    the step-6 checkpoint fail as GCS does after its retries, so host 0 must learn of it at once rather than
    wait at the commit barrier, and the driver restarts from step 4. The result: the checkpoint and losses
    of an uninterrupted 2-host run, bit for bit."""
    reference = f"gs://{BUCKET}/ray-reference"
    options = RunOptions(reference, RAY_STEPS, [DATA], progress=False)
    cluster.train(from_dict(RAY_TINY), options, cluster.ClusterOptions(hosts=2))

    model_dir = f"gs://{BUCKET}/ray-faults"
    env = user_env(**{cluster.FAULT_ENV: "die:0@5,storage:1@6"})
    started = time.monotonic()
    done = run(*train_args(bucket, model_dir, "ray.json"), "--hosts", "2", "--ray-address", local_ray,
               "--sample-tokens", "0", "--no-progress", "--restart-backoff", "0", env=env,
               timeout=600)  # fmt: skip
    elapsed = time.monotonic() - started
    recoveries = [e for e in read_metrics(model_dir)[1] if e["event"] == "recovery"]
    assert len(recoveries) == 2, (recoveries, done.stderr[-3000:])
    died, failed = recoveries
    assert died["reason"].startswith("host 0 (pid ") and "died" in died["reason"], died
    assert "injected fault" in failed["reason"] or "process 1 failed to write" in failed["reason"], failed
    assert failed["resume_step"] == 4 and failed["backoff_s"] == 0, failed
    assert elapsed < 400, elapsed  # no host waited out a 30-minute barrier
    assert step_files(model_dir, RAY_STEPS) == step_files(reference, RAY_STEPS)
    assert losses(model_dir) == losses(reference)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["device_train.py", "--config", f"gs://{BUCKET}/missing.json"],
            f"config file not found: gs://{BUCKET}/",
        ),
        (
            [
                "device_train.py",
                "--config",
                "{tiny}",
                "--model-dir",
                "gs://no-such-bucket/run",
                "--data",
                DATA,
            ],
            "gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist; check the gs:// path",
        ),
        (
            [
                "to_hf_weights.py",
                "--config",
                "{tiny}",
                "--ckpt",
                f"gs://{BUCKET}/nothing",
                "--output-path",
                "x",
            ],
            f"gs://{BUCKET}/nothing: no checkpoint found",
        ),
    ],
)
def test_a_gs_path_that_does_not_exist_is_one_line_naming_it(bucket, args, message):
    args = [a.replace("{tiny}", str(bucket / "tiny.json")) for a in args]
    done = subprocess.run(
        command(*args), cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}"), line
