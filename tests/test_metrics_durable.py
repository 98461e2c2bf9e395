"""The run's log on gs:// (a GCS emulator): every flush becomes a new object, so a process killed with SIGKILL
keeps what it flushed and no later run drops an earlier one's history; read_metrics, the plot and the
TensorBoard mirror read and write the bucket; a log that cannot be read stops with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import gcs_emulator
from test_checkpoint_gcs import _FlakyProxy

from mesh_transformer import storage
from mesh_transformer.config import from_dict
from mesh_transformer.metrics import SEGMENTS_DIR, MetricsLog, read_metrics

pytestmark = pytest.mark.slow
BUCKET = "metrics-test"
ROOT = Path(__file__).resolve().parent.parent

KILLED_RUN = """
import os, signal, sys
from mesh_transformer.metrics import MetricsLog
log = MetricsLog(sys.argv[1])
log.write({"step": 3, "loss": 3.0})
log.event("checkpoint", step=3)
log.flush()  # what the run loop does just before checkpoint 3 commits
log.write({"step": 4, "loss": 2.0})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Iterator[str]:
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as url:
        yield url


def test_flushed_lines_survive_sigkill_and_later_runs_add_to_the_history(emulator, tmp_path):
    model_dir = f"gs://{BUCKET}/killed"
    first = MetricsLog(model_dir)
    first.write({"step": 1, "loss": 5.0})
    first.write({"step": 2, "loss": 4.0})
    first.close()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, model_dir], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    records, events = read_metrics(model_dir)
    # step 4 was never flushed
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert [e["step"] for e in events] == [3]

    resumed = MetricsLog(model_dir)  # a resumed run redoes step 4 and logs on
    resumed.event("resume", step=3)
    resumed.write({"step": 4, "loss": 2.5})
    resumed.flush()
    resumed.write({"step": 5, "loss": 2.25})
    resumed.close()
    records, events = read_metrics(model_dir)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.5), (5, 2.25)]
    assert [e["event"] for e in events] == ["checkpoint", "resume"]
    segments = storage.list_dir(storage.join(model_dir, SEGMENTS_DIR))[0]
    assert len(segments) == 4 and segments == sorted(segments)  # one object per flush, never rewritten


def test_plot_of_a_gcs_run_is_written_to_the_bucket(emulator):
    model_dir = f"gs://{BUCKET}/plotted"
    log = MetricsLog(model_dir)
    for step in range(1, 6):
        log.write({"step": step, "loss": 5.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 100.0})
    log.close()
    script = ROOT / "scripts" / "plot_metrics.py"
    done = subprocess.run([sys.executable, str(script), model_dir], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"wrote {model_dir}/metrics.png"
    assert storage.read_bytes(f"{model_dir}/metrics.png").startswith(b"\x89PNG\r\n\x1a\n")


def test_a_log_that_cannot_be_read_stops_the_plot_with_one_line(emulator):
    proxy = _FlakyProxy(emulator, range(1, 10**9), status=403)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        script = ROOT / "scripts" / "plot_metrics.py"
        done = subprocess.run(
            [sys.executable, str(script), f"gs://{BUCKET}/plotted"], env=env, capture_output=True, text=True
        )
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: gs://{BUCKET}/plotted/{SEGMENTS_DIR}: access denied")


def test_tensorboard_mirror_uploads_one_event_file_per_flush(emulator):
    model_dir = f"gs://{BUCKET}/tensorboard-run"
    log = MetricsLog(model_dir, config=from_dict(dict(layers=1, d_model=8, n_heads=1, n_vocab=8, seq=4,
                                                       pe_rotary_dims=8, tensorboard=True)))  # fmt: skip
    log.write({"step": 1, "loss": 2.5, "val/owt/loss": 2.75})
    log.flush()
    log.write({"step": 2, "loss": 2.25})
    log.event("checkpoint", step=2)
    log.close()
    files = storage.list_dir(f"{model_dir}/tensorboard")[0]
    assert len(files) == 2 and all(f.startswith("events.out.tfevents.") for f in files)
    contents = [storage.read_bytes(f"{model_dir}/tensorboard/{f}") for f in files]
    assert b"val/owt/loss" in b"".join(contents) and b"event/checkpoint" in b"".join(contents)
