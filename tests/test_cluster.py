"""Multi-host training on real Ray actors over 127.0.0.1: 2 hosts x 4 fake CPU devices form one global mesh
and train like one process with 8 devices; a killed or hung host is replaced and the run resumes from its last
checkpoint to the very same parameters; bad cluster arguments give one clear line."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import ray
from helpers import TINY_MODEL

from mesh_transformer import cluster, data, run, sharding
from mesh_transformer.checkpoint import CheckpointManager
from mesh_transformer.config import from_dict
from mesh_transformer.data import DataError
from mesh_transformer.run import RunOptions, train
from mesh_transformer.train import Trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 6

TINY = dict(
    TINY_MODEL,
    tpu_size=8,
    cores_per_replica=2,  # dp=4 x mp=2: dp splits over the hosts, each host holds whole mp groups
    per_replica_batch=1,
    gradient_accumulation_steps=2,
    warmup_steps=2,
    anneal_steps=10,
    lr=1e-2,
    end_lr=1e-3,
    weight_decay=0.1,
    total_steps=STEPS,
    ckpt_every=2,
    val_batches=0,
    compute_dtype="float32",
    remat="none",
)
CONFIG = from_dict(TINY)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small prepared dataset with its own tokenizer, built from generated words."""
    root = tmp_path_factory.mktemp("cluster_data")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "lambda", "yield", "\n"]
    docs = [f"doc{i} " + " ".join(rng.choice(words, rng.integers(5, 80))) for i in range(300)]
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = str(root / "dataset")
    data.prepare_dataset([str(source)], out, train_tokenizer_vocab=300, val_fraction=0.05, seq=TINY["seq"])
    return out


@pytest.fixture(scope="module")
def local_ray() -> str:
    """One Ray instance on 127.0.0.1 (conftest keeps it there) for the module; yields its address."""
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield context.address_info["gcs_address"]
    ray.shutdown()


def options(model_dir: Path, dataset: str) -> RunOptions:
    return RunOptions(model_dir=str(model_dir), steps=STEPS, data=[dataset], progress=False)


def losses(model_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "event" not in r]


def recoveries(model_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "recovery"]


@pytest.fixture(scope="module")
def two_host_metrics(tmp_path_factory, dataset, local_ray) -> tuple[Path, dict]:
    model_dir = tmp_path_factory.mktemp("two_hosts")
    run_options = options(model_dir, dataset)
    run_options.sample_prompt, run_options.sample_tokens = "def", 8
    return model_dir, cluster.train(CONFIG, run_options, cluster.ClusterOptions(hosts=2))


@pytest.fixture(scope="module")
def two_host_run(two_host_metrics) -> Path:
    return two_host_metrics[0]


def test_two_hosts_of_four_devices_train_like_one_process_of_eight(tmp_path, dataset, two_host_run):
    train(CONFIG, options(tmp_path, dataset))
    single = losses(tmp_path)
    assert len(single) == STEPS
    np.testing.assert_allclose(losses(two_host_run), single, rtol=1e-5)
    assert single[-1] < single[0]


@functools.cache
def local_trainer() -> Trainer:
    """The config's trainer on this process's 8 devices (the mesh the two hosts form together)."""
    return Trainer(CONFIG, sharding.mesh_for(CONFIG))


def final_params(model_dir: Path):
    """The params of the run's last checkpoint, gathered into this process."""
    manager = CheckpointManager(str(model_dir))
    assert manager.latest_step() == STEPS
    state, _ = manager.restore(local_trainer().abstract_state)
    return jax.device_get(state.params)


def test_host_0_samples_from_the_final_checkpoint(two_host_metrics, dataset):
    """The driver's sample is the one `sample_text` draws from the final checkpoint's params here, and not
    the one the initial params give."""
    model_dir, metrics = two_host_metrics
    assert metrics["step"] == STEPS
    expected = run.sample_text(CONFIG, final_params(model_dir), dataset, "def", 8)
    assert metrics["sample"] == expected
    initial = local_trainer().init_state(CONFIG.seed).params
    assert run.sample_text(CONFIG, jax.device_get(initial), dataset, "def", 8) != expected


def assert_same_params(a: Path, b: Path) -> None:
    leaves = [jax.tree_util.tree_leaves(final_params(d)) for d in (a, b)]
    for x, y in zip(*leaves, strict=True):
        np.testing.assert_array_equal(x, y)


def test_hung_step_is_detected_and_the_run_resumes_bit_identical(tmp_path, dataset, two_host_run):
    """Host 0 (which also serves the jax coordinator) stops after step 3 without dying."""
    options = cluster.ClusterOptions(hosts=2, fault="hang:0@3", step_timeout_s=15, backoff_s=0)
    metrics = cluster.train(CONFIG, RunOptions(str(tmp_path), STEPS, [dataset], progress=False), options)
    assert metrics["step"] == STEPS
    (recovery,) = recoveries(tmp_path)
    assert recovery["resume_step"] == 2 and "hung" in recovery["reason"], recovery
    assert_same_params(tmp_path, two_host_run)


def test_a_users_mistake_inside_the_hosts_is_reported_not_retried(tmp_path, dataset, local_ray):
    """A batch larger than the dataset fails in every host's loader: one clear error, no restarts."""
    config = from_dict(dict(TINY, per_replica_batch=4096))
    options = cluster.ClusterOptions(hosts=2, backoff_s=0)
    with pytest.raises(DataError, match="split is too small"):
        cluster.train(config, RunOptions(str(tmp_path), STEPS, [dataset], progress=False), options)
    assert not (tmp_path / "metrics.jsonl").exists() or not recoveries(tmp_path)


def device_train(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "device_train.py"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--hosts", "2", "--ray-address", "127.0.0.1:1"],
            "--ray-address 127.0.0.1:1: no Ray head answers there",
        ),
        (["--hosts", "2", "--ray-address", "head-node"], "--ray-address 'head-node': expected HOST:PORT"),
        (["--hosts", "3"], "--hosts 3: the config's tpu_size 8 must split into 3 equal hosts"),
        (["--hosts", "2", "--actor-resources", "tpu"], "--actor-resources 'tpu': expected NAME=COUNT"),
        (["--ray-address", "127.0.0.1:6379"], "--ray-address and --actor-resources need --hosts N"),
    ],
)
def test_bad_cluster_arguments_give_one_clear_line(args, message):
    result = device_train("--config", str(ROOT / "configs" / "demo.json"), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {message}"), lines


def test_address_of_a_service_that_is_not_ray_is_refused_at_once():
    """ray.init would wait forever on such a port (e.g. the dashboard's); one line names it instead."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer_like_http_1() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_like_http_1, daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        result = device_train(
            "--config", str(ROOT / "configs" / "demo.json"), "--hosts", "2", "--ray-address", address
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --ray-address {address}: something listens there but it is not a Ray head (no gRPC answer); "
        "pass the GCS address that `ray start --head` prints (port 6379 by default)"
    ]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    hosts = {
        line.split()[3].rsplit(":", 1)[0]
        for line in out.splitlines()
        if any(f"pid={p}," in line for p in pids)
    }
    return {h.removeprefix("[::ffff:").removesuffix("]") for h in hosts}  # IPv4-mapped IPv6 is still IPv4


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_every_actor_and_ray_listened_on_loopback_only(tmp_path, dataset):
    """The command line with a private local Ray: every process it starts listens on 127.0.0.1 only, and
    SIGINT ends the driver (exit 130), its actors and Ray."""
    config = tmp_path / "long.json"
    config.write_text(json.dumps(dict(TINY, total_steps=100_000, ckpt_every=1000)))
    model_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "device_train.py"), "--config", str(config), "--hosts", "2"]
    command += ["--model-dir", str(model_dir), "--data", dataset, "--no-progress"]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (model_dir / "metrics.jsonl").exists() or not losses(model_dir):
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[1][-3000:]
            time.sleep(1)
        started = descendants(driver.pid)
        workers = {p for p in started if "HostWorker" in Path(f"/proc/{p}/cmdline").read_text()}
        assert len(workers) == 2, started
        assert listening_addresses(started | {driver.pid}) == {"127.0.0.1"}
        driver.send_signal(signal.SIGINT)
        try:
            _, stderr = driver.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            driver.kill()
            pytest.fail(
                f"the driver outlived SIGINT by 120 s; its stderr:\n{driver.communicate()[1][-3000:]}"
            )
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"
    deadline = time.monotonic() + 60
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(1)
    survivors = {
        p: Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:200] for p in started if alive(p)
    }
    assert not survivors, survivors


HANGING_TEARDOWN = """
import subprocess, sys, time
from mesh_transformer import cluster
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
with cluster._bounded_interrupt(1.0):
    try:
        time.sleep(120)  # training; the test sends SIGINT
    except KeyboardInterrupt:
        time.sleep(120)  # a teardown that never returns
"""


def test_a_teardown_hanging_after_ctrl_c_is_cut_short_and_what_it_started_dies():
    driver = subprocess.Popen(
        [sys.executable, "-c", HANGING_TEARDOWN],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child = int(driver.stdout.readline())
    time.sleep(0.5)  # inside the context
    started = time.monotonic()
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child)
