"""What the Ray driver times as a step: the run loop reports its evaluation and checkpoint phases, and the
driver's step timeout counts train steps only; the `checkpoint` event is logged once the checkpoint is
committed. The loop never waits for the step it has just dispatched, and its step time covers the loader."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from helpers import TINY_MODEL

from mesh_transformer import cluster, run
from mesh_transformer.checkpoint import COMMIT_MARKER
from mesh_transformer.config import from_dict
from mesh_transformer.metrics import MetricsLog, read_metrics
from mesh_transformer.prepare import prepare_dataset

CONFIG = from_dict(
    dict(TINY_MODEL, tpu_size=8, cores_per_replica=2, per_replica_batch=1, warmup_steps=1, anneal_steps=4,
         total_steps=4, ckpt_every=2, val_batches=1, val_every=2, compute_dtype="float32", remat="none")
)  # fmt: skip


def test_step_timeout_counts_train_steps_only():
    watch = cluster._Watch(step_timeout_s=10, startup_timeout_s=100)
    assert watch.hung(99) is None  # start-up and compilation get the long limit
    assert watch.hung(watch.last_report + 101).startswith("no step finished for 100 s before the first step")
    watch.report(0, {"step": 1, "loss": 1.0}, now=0)
    assert watch.hung(9) is None
    assert watch.hung(11) == "no step finished for 10 s after step 1: the group hung"
    watch.report(1, {"phase": "evaluation"}, now=11)
    watch.report(0, {"phase": "checkpoint"}, now=11)
    assert watch.hung(11 + 99) is None  # a long evaluation or save is not a hang
    assert "(host 0: checkpoint, host 1: evaluation): the group hung" in watch.hung(11 + 101)
    watch.report(0, {"phase": "train"}, now=120)
    watch.report(1, {"phase": "train"}, now=120)
    assert watch.hung(129) is None and watch.hung(131).startswith("no step finished for 10 s after step 1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "def", "return", "\n"]
    docs = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(100)]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset([str(tmp / "docs.jsonl")], str(tmp / "data"), train_tokenizer_vocab=300, seq=16,
                    val_fraction=0.2)  # fmt: skip
    return str(tmp / "data")


def test_the_loop_reports_its_phases_and_logs_checkpoints_once_committed(tmp_path, dataset, monkeypatch):
    seen: list = []
    logged = MetricsLog.event

    def event(self, kind, **fields):
        if kind == "checkpoint":  # is it committed yet?
            marker = os.path.join(self.model_dir, f"step_{fields['step']}", COMMIT_MARKER)
            seen.append(("checkpoint event", fields["step"], os.path.exists(marker)))
        logged(self, kind, **fields)

    monkeypatch.setattr(MetricsLog, "event", event)
    order: list = []  # what the loop does, in order: read a batch, dispatch a step, read a step's figures
    loader_seconds = 0.3
    read_batch, make_trainer, record = run.next_batch, run.make_trainer, run.StepRecorder.record

    def next_batch(trainer, loader):
        time.sleep(loader_seconds)  # a slow loader: the step time must show it
        order.append("batch")
        return read_batch(trainer, loader)

    def traced_trainer(*args):
        trainer = make_trainer(*args)
        step = trainer.step
        trainer.step = lambda state, batch: (
            order.append(f"dispatch {int(state.step) + 1}"),
            step(state, batch),
        )[1]
        return trainer

    monkeypatch.setattr(run, "next_batch", next_batch)
    monkeypatch.setattr(run, "make_trainer", traced_trainer)
    reading = lambda self, done, *a, **kw: (order.append(f"read {done.step}"), record(self, done, *a, **kw))[
        1
    ]  # noqa: E731
    monkeypatch.setattr(run.StepRecorder, "record", reading)
    options = run.RunOptions(
        str(tmp_path), data=[dataset], progress=False,
        on_step=lambda metrics: seen.append(("step", metrics["step"])),
        on_phase=lambda name: seen.append(("phase", name)),
    )  # fmt: skip
    run.train(CONFIG, options)
    phases = [item for item in seen if item[0] != "checkpoint event"]
    assert phases == [
        ("step", 1),
        *[("phase", "evaluation"), ("phase", "train"), ("phase", "checkpoint"), ("phase", "train")],
        ("step", 2),
        ("step", 3),
        *[("phase", "evaluation"), ("phase", "train"), ("phase", "checkpoint"), ("phase", "train")],
        ("step", 4),
        *[("phase", "checkpoint"), ("phase", "train")],  # the last save's wait
    ]
    assert sorted(item for item in seen if item[0] == "checkpoint event") == [
        ("checkpoint event", 2, True),
        ("checkpoint event", 4, True),
    ]
    _, events = read_metrics(str(tmp_path))
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    # step n + 1's batch is read, and step n + 1 dispatched, before step n's figures are read, except after
    # the steps the loop evaluates and saves at (2 and 4), which need their state at once
    assert order == ["batch", "dispatch 1", "batch", "dispatch 2", "batch", "read 1", "read 2",
                     "dispatch 3", "batch", "dispatch 4", "read 3", "read 4"]  # fmt: skip
    records, _ = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["step_seconds"] >= loader_seconds for r in records[:3])  # each of these waited on the loader
    assert all(r["mfu_palm"] > r["mfu"] > 0 for r in records)
