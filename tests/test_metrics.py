"""The run's log (metrics.jsonl, events, Weights & Biases offline, TensorBoard), validation inside a real tiny
training run, and the plot script on that run's metrics.jsonl."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from mesh_transformer.config import from_dict
from mesh_transformer.errors import UserError
from mesh_transformer.metrics import MetricsLog, plot_metrics, read_metrics
from mesh_transformer.prepare import prepare_dataset
from mesh_transformer.run import RunOptions, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "layers": 2,
    "d_model": 32,
    "n_heads": 4,
    "n_vocab": 320,
    "seq": 32,
    "pe_rotary_dims": 4,
    "cores_per_replica": 2,
    "tpu_size": 8,
    "per_replica_batch": 1,
    "compute_dtype": "float32",
    "remat": "none",
    "warmup_steps": 1,
    "anneal_steps": 4,
    "lr": 1e-2,
    "total_steps": 4,
    "ckpt_every": 1000,
}


def wandb_records(path: str):
    """The protobuf records of a `.wandb` run file: a 7-byte header (":W&B", magic, version), then LevelDB
    log chunks (crc32c, length, type) in 32 KiB blocks; types 1 (whole), 2-4 (first, middle, last part)."""
    block = 32768
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(path: str) -> set[tuple[str, int, float]]:
    """(key, step, value) of every logged figure, without wandb's own "_step", "_runtime", ..."""
    out = set()
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) or item.key
                if not key.startswith("_"):
                    out.add((key, record.history.step.num, json.loads(item.value_json)))
    return out


def test_records_and_events_go_to_metrics_jsonl_and_survive_a_reopen(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.write({"step": 1, "loss": 5.0, "lr": 1e-4})
    log.event("checkpoint", step=1, path=str(tmp_path / "step_1"), seconds=0.25)
    log.write({"step": 2, "loss": 4.0, "val/pile/loss": 4.5})
    log.close()
    resumed = MetricsLog(str(tmp_path))  # a resumed run appends, and redoes step 2
    resumed.event("recovery", step=1, reason="preempted", restarts=1)
    resumed.write({"step": 2, "loss": 3.5})
    resumed.close()

    records, events = read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 3.5)]
    assert [(e["event"], e["step"]) for e in events] == [("checkpoint", 1), ("recovery", 1)]
    assert events[0]["path"].endswith("step_1") and events[1]["reason"] == "preempted"
    assert all(isinstance(e["time"], float) for e in events)
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / "tensorboard")


def test_wandb_offline_writes_a_run_directory_that_a_resume_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = from_dict(dict(TINY, wandb_project="tiny-project", name="tiny"))
    for step in (1, 2):
        log = MetricsLog(str(tmp_path), config=config)
        log.write({"step": step, "loss": 3.0 / step, "val/default/loss": 3.5 / step})
        log.event("checkpoint", step=step, seconds=0.5)
        log.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    # one directory per start, both of the same run id (wandb adds "-1" when two start within a second)
    assert len(runs) == 2 and all(f"-{run_id}" in os.path.basename(r) for r in runs)
    logged = []
    for run in runs:
        (data,) = glob.glob(os.path.join(run, f"run-{run_id}.wandb"))
        logged.append(wandb_history(data))
    assert logged == [
        {
            ("loss", step, 3.0 / step),
            ("val/default/loss", step, 3.5 / step),
            ("event/checkpoint/seconds", step, 0.5),
        }
        | {("event/checkpoint/step", step, step)}
        for step in (1, 2)
    ]


def test_wandb_without_a_login_falls_back_to_offline_with_one_printed_line(tmp_path):
    code = (
        "from mesh_transformer.config import from_dict\n"
        "from mesh_transformer.metrics import MetricsLog\n"
        f"config = from_dict({dict(TINY, wandb_project='p')!r})\n"
        f"log = MetricsLog({str(tmp_path)!r}, config=config)\n"
        "log.write({'step': 1, 'loss': 1.0})\n"
        "log.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_MODE="online", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wandb: not logged in; logging offline to {tmp_path}/wandb" in done.stdout
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    log = MetricsLog(str(tmp_path), config=from_dict(dict(TINY, tensorboard=True)))
    log.write({"step": 1, "loss": 2.5, "val/owt/loss": 2.75})
    log.event("checkpoint", step=1, path="step_1")
    log.write({"step": 2, "loss": 2.25, "lr": 0.125})
    log.close()
    (events_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    # read back by TensorBoard's own reader
    events = EventAccumulator(events_file, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {(tag, e.step, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert scalars == {
        ("loss", 1, 2.5),
        ("val/owt/loss", 1, 2.75),
        ("loss", 2, 2.25),
        ("lr", 2, 0.125),  # values exact in float32, as TensorBoard stores them
    }
    (text,) = events.Tensors("event/checkpoint/text_summary")
    assert text.step == 1
    assert json.loads(text.tensor_proto.string_val[0]) == {
        "event": "checkpoint",
        "time": pytest.approx(read_metrics(str(tmp_path))[1][0]["time"]),
        "step": 1,
        "path": "step_1",
    }


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Four steps of a real training run validating every 2 steps on two named sets."""
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.jsonl"
    words = "the cat dog sat ran on a mat hat red blue big small and with under".split()
    corpus.write_text(
        "".join(
            json.dumps({"text": " ".join(words[(i + j) % 16] for j in range(40))}) + "\n" for i in range(40)
        )
    )
    train_set, other = str(tmp / "train_set"), str(tmp / "other_set")
    prepare_dataset([str(corpus)], train_set, train_tokenizer_vocab=300, seq=32, val_fraction=0.3)
    prepare_dataset(
        [str(corpus)], other, tokenizer_path=f"{train_set}/tokenizer.json", seq=32, val_fraction=0.5, seed=7
    )
    config = from_dict(dict(TINY, val_set={"pile": train_set, "owt": other}, val_batches=1, val_every=2))
    model_dir = str(tmp / "model")
    train(config, RunOptions(model_dir=model_dir, data=[train_set], progress=False))
    return model_dir


def test_a_training_run_logs_validation_loss_of_every_named_set_every_val_every_steps(trained_run):
    records, _ = read_metrics(trained_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        has_val = record["step"] % 2 == 0
        for name in ("pile", "owt"):
            assert (f"val/{name}/loss" in record) == has_val
            assert (f"val/{name}/ppl" in record) == has_val
        assert record["tokens_seen"] == record["step"] * 4 * 32
    assert records[1]["val/pile/loss"] != records[1]["val/owt/loss"]  # different batches, different loss
    for name in ("pile", "owt"):  # training lowers the loss of held-out text of the same distribution
        assert 0 < records[3][f"val/{name}/loss"] < records[1][f"val/{name}/loss"], name


def run_plot(*args: str) -> subprocess.CompletedProcess:
    script = os.path.join(ROOT, "scripts", "plot_metrics.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)


def test_plot_script_renders_a_png_from_a_real_metrics_jsonl(trained_run, tmp_path):
    output = str(tmp_path / "metrics.png")
    done = run_plot(trained_run, "--output", output)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(output, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_plot_draws_every_logged_series(trained_run, tmp_path, monkeypatch):
    """The figure's curves hold the log's figures: training and validation loss, learning rate, gradient
    norm (a PNG of the right size could be empty axes)."""
    import matplotlib.figure

    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))
    )
    plot_metrics(trained_run, str(tmp_path / "plot.png"))
    (figure,) = figures
    curves = [
        (list(line.get_xdata()), list(line.get_ydata())) for ax in figure.axes for line in ax.get_lines()
    ]
    records, _ = read_metrics(trained_run)
    steps = [r["step"] for r in records]
    for key in ("loss", "lr", "grad_norm"):
        assert (steps, [r[key] for r in records]) in curves, key
    for name in ("pile", "owt"):
        assert ([2, 4], [records[i][f"val/{name}/loss"] for i in (1, 3)]) in curves, name


def test_plot_script_reports_a_missing_log_in_one_line(tmp_path):
    done = run_plot(str(tmp_path / "nothing_here"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: no metrics log at {tmp_path}/nothing_here/metrics.jsonl; "
        "expected the model_dir of a training run"
    ]
    (tmp_path / "metrics.jsonl").write_text('{"event": "checkpoint", "step": 1}\n{"step": 2, "lo')
    with pytest.raises(UserError, match="holds no step records"):
        read_metrics(str(tmp_path))
