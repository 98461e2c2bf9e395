"""Training figures: model FLOPs per token, the hardware's peak, MFU; the run's log (`metrics.jsonl`, and
optionally Weights & Biases and TensorBoard, with an `event` API for checkpoints and recoveries); its plot.

MFU = achieved model FLOP/s / peak FLOP/s of all devices, with model FLOPs per token
    6 * N  +  6 * L * D * T
where N counts parameters that take part in matmuls (all but lookup tables: an untied input embedding,
learned positions), and the second term is the causal self-attention (QK^T and AV: 2 * 2 * T * D per token
forward, times 3 for forward + backward, halved because a causal mask needs only half the score matrix, as
MaxText counts it). PaLM (appendix B) and nanoGPT count the whole score matrix, 6 * N + 12 * L * D * T, so
their MFU of the same run is higher; the run loop logs both (`mfu`, `mfu_palm`). Each architecture computes
its own (`Model.flops_per_token`: GPT-Neo's local layers attend to fewer keys).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer import storage
from mesh_transformer.config import Config
from mesh_transformer.errors import UserError

# Dense bf16 peak per JAX device (a TPU v2/v3 core is one device; v4 and later expose one device per chip).
PEAK_BF16_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def flops_per_token(config: Config, *, full_attention: bool = False) -> float:
    """Model FLOPs (forward + backward) per trained token of the config's model; see the module docstring.
    `full_attention` counts every query-key pair, masked or not (6N + 12 * L * D * T for causal attention:
    PaLM's and nanoGPT's figure, which MFU tables elsewhere mostly quote)."""
    from mesh_transformer.models import model_for

    model = model_for(config)
    flops = model.flops_per_token(config.seq)
    if full_attention:  # the causal term counts half the keys: add the other half
        flops += 12.0 * model.layers * model.d_model * model.attended_keys(config.seq)
    return flops


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of one n x n matmul on the first device (all host cores serve one CPU device's op)."""
    accumulate = jnp.float32
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=accumulate))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(devices: list[jax.Device], compute_dtype: str) -> float:
    """Peak FLOP/s of all `devices` together: a datasheet figure for accelerators, measured for CPUs.

    Fake CPU devices share the host's cores, so their joint peak is the host's, measured once."""
    kind = devices[0].device_kind
    for name, peak in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return peak * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops(compute_dtype)
    return float("nan")


SEGMENTS_DIR = "metrics"  # on gs://, {model_dir}/metrics/{session}-{n}.jsonl hold the log's lines


class MetricsLog:
    """The run's log: one JSON object per line in `{model_dir}/metrics.jsonl` (kept across resumes), mirrored
    to Weights & Biases when the config names a `wandb_project` and to TensorBoard event files in
    `{model_dir}/tensorboard` when the config sets `tensorboard`.

    `write(record)` logs a step's figures (keys such as loss, lr, grad_norm, tokens_per_sec, mfu, mfu_palm,
    tokens_seen, val/{set}/loss, harness/{task}/{metric}; "step" is the x axis).

    `event(kind, **fields)` logs something that happened, for the checkpoint and cluster code to call
    (thread-safe, e.g. from a background checkpoint writer):
        log.event("checkpoint", step=500, path="gs://bucket/run/step_500", seconds=12.5)
        log.event("recovery", step=1200, reason="preempted", restarts=1)
    In metrics.jsonl an event is the line {"event": kind, "time": unix seconds, **fields}, told apart from
    step records by its "event" key; fields must be JSON values. Weights & Biases gets the numeric fields as
    event/{kind}/{field} at the latest step, TensorBoard the whole event as text.

    Durability: a local metrics.jsonl is appended and flushed line by line. An object store cannot append,
    so on gs:// the lines logged since the last `flush()` are uploaded as one new object
    `{model_dir}/metrics/{session}-{n}.jsonl`; objects are never rewritten, so no run's history is ever
    dropped, and `read_metrics` joins them in order. The run loop flushes just before each checkpoint is
    committed, so what was logged up to the last committed checkpoint survives a SIGKILL; `close()` flushes
    the rest.

    Weights & Biases never blocks training: without a login (no WANDB_API_KEY, no ~/.netrc entry) and
    WANDB_MODE not offline, it logs offline into the model dir with one printed line (`wandb sync` uploads
    it later). A resumed run continues the same W&B run (its id is kept in {model_dir}/wandb_run_id).
    """

    def __init__(self, model_dir: str, enabled: bool = True, *, config: Config | None = None):
        self.model_dir = model_dir.rstrip("/")
        self.path = storage.join(self.model_dir, "metrics.jsonl")
        self.enabled = enabled
        self._lock = threading.Lock()  # events may come from checkpoint writer threads
        self._last_step = 0
        self._local = not storage.is_gcs(self.model_dir)
        self._pending: list[str] = []  # gs:// lines not uploaded yet
        self._session = f"{time.time_ns():020d}-{os.getpid()}"  # sorts segments of later runs after these
        self._segments = 0
        self._wandb: Any = None
        self._tensorboard: _TensorBoard | None = None
        if not enabled:
            return
        if self._local:
            storage.makedirs(self.model_dir)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        if config is not None and config.wandb_project:
            self._wandb = _start_wandb(config, self.model_dir, self._local)
        if config is not None and config.tensorboard:
            self._tensorboard = _TensorBoard(storage.join(self.model_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with self._lock:
            step = record.get("step")
            if isinstance(step, int):
                self._last_step = max(self._last_step, step)
            self._append(record)
            numbers = _numbers(record, exclude=("step",))
            if self._wandb is not None:
                self._wandb.log(numbers, step=self._last_step)
            if self._tensorboard is not None:
                for key, value in numbers.items():
                    self._tensorboard.writer.add_scalar(key, value, self._last_step)

    def event(self, kind: str, **fields: Any) -> None:
        """Log that something happened (a checkpoint saved, a worker restarted, ...); see the class doc."""
        if not self.enabled:
            return
        record = {"event": kind, "time": time.time(), **{k: _plain(v) for k, v in fields.items()}}
        with self._lock:
            self._append(record)
            if self._wandb is not None:
                numbers = _numbers(fields, exclude=())
                self._wandb.log({f"event/{kind}/{k}": v for k, v in numbers.items()}, step=self._last_step)
            if self._tensorboard is not None:
                self._tensorboard.writer.add_text(f"event/{kind}", json.dumps(record), self._last_step)

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        if self._local:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._pending.append(line)

    def flush(self) -> None:
        """Make everything logged so far durable (on gs://: upload it as the next segment). On a storage
        failure the lines stay pending for the next flush, and the error is raised."""
        if not self.enabled:
            return
        with self._lock:
            if self._tensorboard is not None:
                self._tensorboard.flush()
            self._flush_lines()

    def _flush_lines(self) -> None:
        if self._local or not self._pending:
            return
        name = f"{self._session}-{self._segments:06d}.jsonl"
        storage.write_text(storage.join(self.model_dir, SEGMENTS_DIR, name), "\n".join(self._pending) + "\n")
        self._segments += 1
        self._pending = []

    def close(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            try:
                self._flush_lines()
            finally:
                self.enabled = False
                if self._local:
                    self._file.close()
                if self._tensorboard is not None:
                    self._tensorboard.close()
                if self._wandb is not None:
                    self._wandb.finish()


class _TensorBoard:
    """A tensorboardX writer for `logdir`. On gs:// it writes a local event file and uploads it at each flush,
    then starts a new one (TensorBoard reads every event file of a directory), so no object is rewritten."""

    def __init__(self, logdir: str) -> None:
        self.logdir, self.remote = logdir, storage.is_gcs(logdir)
        self.files = 0
        self._open()

    def _open(self) -> None:
        from tensorboardX import SummaryWriter

        self.local_dir = tempfile.mkdtemp(prefix="tensorboard-") if self.remote else self.logdir
        # tensorboardX names files by the second and host: a suffix keeps two files of one second apart
        suffix = f".{os.getpid()}.{self.files:06d}" if self.remote else ""
        self.writer = SummaryWriter(logdir=self.local_dir, filename_suffix=suffix)
        self.files += 1

    def flush(self) -> None:
        if not self.remote:
            self.writer.flush()
            return
        self._upload()
        self._open()

    def _upload(self) -> None:
        self.writer.close()
        for name in sorted(os.listdir(self.local_dir)):
            storage.upload_file(os.path.join(self.local_dir, name), storage.join(self.logdir, name))
        shutil.rmtree(self.local_dir, ignore_errors=True)

    def close(self) -> None:
        if self.remote:
            self._upload()
        else:
            self.writer.close()


def _numbers(record: dict[str, Any], exclude: Iterable[str]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in exclude and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _start_wandb(config: Config, model_dir: str, local: bool) -> Any:
    """A wandb run for this model dir: resumed if one was started there before, offline without a login."""
    import wandb

    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode not in ("offline", "dryrun", "disabled") and not wandb.login(prompt=False, verify=False):
        where = f"{model_dir}/wandb" if local else "./wandb"
        print(f"wandb: not logged in; logging offline to {where} (upload it later with `wandb sync`)")
        mode = "offline"
    id_path = storage.join(model_dir, "wandb_run_id")
    try:
        run_id = storage.read_text(id_path).strip()
    except FileNotFoundError:
        run_id = uuid.uuid4().hex[:12]
        storage.write_text(id_path, run_id + "\n")
    return wandb.init(
        project=config.wandb_project,
        name=config.name,
        notes=config.comment or None,
        config=config.to_dict(),
        id=run_id,
        resume="allow",
        dir=model_dir if local else None,
        mode=mode or None,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ----- reading and plotting metrics.jsonl -----


def read_metrics(model_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, events) of a run's log: `{model_dir}/metrics.jsonl` and the segments in
    `{model_dir}/metrics/` (gs://), in the order they were written, or a metrics.jsonl file given itself.
    For a step logged twice (a resumed run redid it) the later record wins. A torn line (a run killed
    mid-write) is skipped; a log that cannot be read stops with one line."""
    lines, where = _log_lines(model_dir)
    by_step: dict[int, dict[str, Any]] = {}
    events = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "event" in record:
            events.append(record)
        elif isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    if not by_step:
        raise UserError(f'{where} holds no step records; expected lines such as {{"step": 1, "loss": ...}}')
    return [by_step[s] for s in sorted(by_step)], events


def _log_lines(model_dir: str) -> tuple[list[str], str]:
    """Every line of the log at `model_dir` (a model_dir or a .jsonl file), and the name errors give it."""
    if model_dir.endswith(".jsonl"):
        where, files = model_dir, [model_dir]
    else:
        where = storage.join(model_dir.rstrip("/"), "metrics.jsonl")
        segments = storage.join(model_dir.rstrip("/"), SEGMENTS_DIR)
        names = sorted(n for n in storage.list_dir(segments)[0] if n.endswith(".jsonl"))
        files = ([where] if storage.path_exists(where) else []) + [storage.join(segments, n) for n in names]
    if not files:
        raise UserError(f"no metrics log at {where}; expected the model_dir of a training run")
    lines = []
    for path in files:
        try:
            lines += storage.read_text(path).splitlines()
        except FileNotFoundError:
            raise UserError(f"no metrics log at {path}; expected the model_dir of a training run") from None
        except UnicodeDecodeError as e:
            raise UserError(f"cannot read metrics log {path}: not UTF-8 text ({e.reason})") from None
    return lines, where


def plot_metrics(model_dir: str, output: str) -> None:
    """Render the run's loss (train and validation), throughput, schedule and evaluation scores to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records, events = read_metrics(model_dir)
    if not output.lower().endswith(".png"):
        raise UserError(f"plot output {output} must be a .png file")
    directory = storage.parent(output)
    if directory and not storage.is_gcs(directory) and not os.path.isdir(directory):
        raise UserError(f"cannot write {output}: directory {directory} does not exist")

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for r in records for k in r})
    val_keys = [k for k in keys if k.startswith("val/") and k.endswith("/loss")]
    harness_keys = [k for k in keys if k.startswith("harness/")]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    fig.suptitle(f"{model_dir.rstrip('/')}  ({records[-1]['step']} steps)")

    ax = axes[0, 0]
    steps, loss = series("loss")
    if loss:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        ax.plot(steps, _smoothed(loss), color="tab:blue", label="train (smoothed)")
    for key in val_keys:
        ax.plot(*series(key), marker="o", label=key.removesuffix("/loss"))
    for e in events:
        if e.get("event") == "checkpoint" and isinstance(e.get("step"), int):
            ax.axvline(e["step"], color="grey", linestyle=":", linewidth=0.8)
    ax.set(title="loss (cross-entropy, nats/token)", xlabel="step", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    steps, tokens_per_sec = series("tokens_per_sec")
    if tokens_per_sec:
        ax.plot(steps, tokens_per_sec, color="tab:green", alpha=0.3, linewidth=0.8)
        ax.plot(steps, _smoothed(tokens_per_sec), color="tab:green")
    ax.set(title="throughput (smoothed)", xlabel="step", ylabel="tokens/s")
    ax.grid(alpha=0.3)
    ratios = [r["mfu"] / r["tokens_per_sec"] for r in records if r.get("mfu") and r.get("tokens_per_sec")]
    if ratios:  # MFU is tokens/s times a constant: a second scale, not a second curve
        per_token = ratios[-1] * 100
        ax.secondary_yaxis("right", functions=(lambda t: t * per_token, lambda m: m / per_token)).set_ylabel(
            "MFU (%)"
        )

    ax = axes[1, 0]
    ax.plot(*series("lr"), color="tab:purple")
    ax.set(title="learning rate and gradient norm", xlabel="step", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    steps, grad_norm = series("grad_norm")
    if grad_norm:
        twin = ax.twinx()
        twin.plot(steps, grad_norm, color="tab:red", alpha=0.6)
        twin.set_ylabel("gradient norm", color="tab:red")

    ax = axes[1, 1]
    if harness_keys:
        for key in harness_keys:
            ax.plot(*series(key), marker="o", label=key.removeprefix("harness/"))
        ax.set(title="evaluation harness", xlabel="step", ylabel="score")
        ax.legend()
    elif val_keys:
        for key in val_keys:
            ax.plot(*series(key.removesuffix("loss") + "ppl"), marker="o", label=key.removesuffix("/loss"))
        ax.set(title="validation perplexity", xlabel="step", ylabel="perplexity")
        ax.legend()
    else:
        ax.plot(*series("tokens_seen"), color="tab:gray")
        ax.set(title="tokens seen", xlabel="step", ylabel="tokens")
    ax.grid(alpha=0.3)

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(output, png.getvalue())


def _smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to zero."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out
