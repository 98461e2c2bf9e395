"""Multi-host training on real Ray actors over 127.0.0.1: 2 hosts x 4 fake CPU devices form one global mesh
and train like one process with 8 devices; a killed or hung host is replaced and the run resumes from its last
checkpoint to the very same parameters; bad cluster arguments give one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray

from mesh_transformer import cluster, data
from mesh_transformer.config import from_dict
from mesh_transformer.run import RunOptions, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 6

TINY = dict(
    layers=2,
    d_model=64,
    n_heads=4,
    n_vocab=384,
    seq=16,
    pe_rotary_dims=8,
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
def local_ray():
    """One Ray instance on 127.0.0.1 for the module: the driver side of every cluster run here."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    yield
    ray.shutdown()


def options(model_dir: Path, dataset: str) -> RunOptions:
    return RunOptions(model_dir=str(model_dir), steps=STEPS, data=[dataset], progress=False)


def losses(model_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "event" not in r]


def events(model_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" in r]


@pytest.fixture(scope="module")
def two_host_run(tmp_path_factory, dataset, local_ray) -> Path:
    model_dir = tmp_path_factory.mktemp("two_hosts")
    cluster.train(CONFIG, options(model_dir, dataset), cluster.ClusterOptions(hosts=2))
    return model_dir


def test_two_hosts_of_four_devices_train_like_one_process_of_eight(tmp_path, dataset, two_host_run):
    train(CONFIG, options(tmp_path, dataset))
    single = losses(tmp_path)
    assert len(single) == STEPS
    np.testing.assert_allclose(losses(two_host_run), single, rtol=1e-5)
    assert single[-1] < single[0]
