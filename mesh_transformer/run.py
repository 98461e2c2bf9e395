"""A training run: data in, train steps over the mesh, figures out (metrics.jsonl, progress bar), a sample at
the end. `device_train.py` calls `train` in one process; each Ray actor calls the same function on its host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from mesh_transformer import data, sharding, storage
from mesh_transformer.checkpoint import CheckpointError, CheckpointManager
from mesh_transformer.config import Config
from mesh_transformer.engine import generate, sampling_mesh
from mesh_transformer.errors import InfrastructureError
from mesh_transformer.evaluation import Evaluator
from mesh_transformer.memory import GiB, estimate
from mesh_transformer.metrics import MetricsLog, flops_per_token, peak_flops
from mesh_transformer.models import model_for, param_count
from mesh_transformer.train import Trainer, TrainState, make_trainer


@dataclasses.dataclass
class RunOptions:
    model_dir: str
    steps: int | None = None  # train until this many optimizer steps (default: the config's total_steps)
    data: list[str] | None = None  # prepared dataset dir or text files; None = the embedded demo corpus
    tokenizer: str | None = None  # tokenizer.json for raw text files
    progress: bool = True
    sample_prompt: str | None = None  # printed continuation after training; None = no sample
    sample_tokens: int = 64
    # Full or slim checkpoint (or a model_dir) whose params start a fine-tune: fresh optimizer, step 0.
    # Ignored once model_dir holds a checkpoint of its own, which is then resumed instead.
    tune_model_path: str | None = None
    # Called in every process with each step's metrics once they are logged; Ray actors report progress
    # to the driver here (and tests inject faults), so they run this very loop rather than a copy of it.
    on_step: Callable[[dict], None] | None = None
    # Called in every process with "evaluation" or "checkpoint" when the loop turns to work that is not a
    # train step, and with "train" when it returns to steps: the Ray driver's step timeout times steps only.
    on_phase: Callable[[str], None] | None = None


def model_dir_for(config: Config, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    if config.bucket:
        return f"gs://{config.bucket}/{config.model_dir}".rstrip("/")
    return (config.model_dir or f"runs/{config.name}").rstrip("/")


def describe(config: Config) -> str:
    """The --dry-run report: parsed config, mesh, parameter count and per-device memory, from shapes only."""
    from mesh_transformer.memory import run_params

    params = run_params(config)  # a LoRA run's adapters included
    mem = estimate(config, params)
    lines = ["config:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in config.to_dict().items()]
    lines += [
        f"mesh: dp={config.dp} x mp={config.mp} ({config.tpu_size} devices)",
        f"parameters: {param_count(params):,}",
        f"tokens per step: {config.tokens_per_step:,} "
        f"({config.global_batch} sequences x {config.gradient_accumulation_steps} accumulated"
        f" x {config.seq} tokens)",
        "memory per device (estimate):",
        f"  params      {mem.params / GiB:8.2f} GiB",
        f"  optimizer   {mem.optimizer / GiB:8.2f} GiB",
        f"  gradients   {mem.gradients / GiB:8.2f} GiB",
        f"  activations {mem.activations / GiB:8.2f} GiB  (remat={config.remat})",
        f"  update      {mem.update / GiB:8.2f} GiB  (peak: state + max(gradients + activations, update))",
        f"  total       {mem.total / GiB:8.2f} GiB",
    ]
    return "\n".join(lines)


def is_mixture(config: Config, options: RunOptions) -> bool:
    """The run reads the config's train_set mixture (--data, when given, replaces it)."""
    return options.data is None and isinstance(config.train_set, dict)


def training_data(config: Config, options: RunOptions) -> list[str] | None:
    """What the run reads as `RunOptions.data` says it, with raw text prepared into the model dir first:
    [a prepared dataset dir], or None for the config's train_set mixture (whose datasets are prepared)."""
    data_args = options.data
    if is_mixture(config, options):
        return None
    if data_args is None and config.train_set:
        data_args = [config.train_set]
    try:
        dataset_dir = data.resolve_training_data(
            data_args,
            options.model_dir,
            n_vocab=config.n_vocab,
            seq=config.seq,
            tokenizer=options.tokenizer or config.tokenizer or None,
            seed=config.seed,
        )
    except data.DataError as e:
        if options.data is None and config.train_set:
            raise data.DataError(f"config key 'train_set': {e}") from None
        raise
    return [dataset_dir]


def training_datasets(config: Config, options: RunOptions) -> dict[str, float]:
    """Prepared dataset dir -> weight of what the run reads (one dataset: weight 1)."""
    prepared = training_data(config, options)
    if prepared is None:
        return data.resolve_mixture(config.train_set, n_vocab=config.n_vocab)
    return {prepared[0]: 1.0}


def make_loader(
    config: Config, options: RunOptions, datasets: dict[str, float]
) -> data.Loader | data.MixtureLoader:
    """One dataset's Loader, or a MixtureLoader for the config's train_set mixture."""
    kwargs = dict(
        seq=config.seq,
        global_batch=config.global_batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        segments=config.document_mask,
    )
    if is_mixture(config, options):
        return data.MixtureLoader(datasets, "train", **kwargs)
    return data.Loader(next(iter(datasets)), "train", **kwargs)


def train(config: Config, options: RunOptions) -> dict:
    """Train on the mesh of all devices; returns the last step's metrics."""
    model_dir = options.model_dir
    is_main = jax.process_index() == 0
    storage.makedirs(model_dir)

    datasets = training_datasets(config, options)
    dataset_dir = next(iter(datasets))  # its tokenizer is every dataset's
    loader = make_loader(config, options, datasets)
    mesh = sharding.mesh_for(config)
    trainer = make_trainer(config, mesh)
    # checks val sets and harness tasks before training
    evaluator = Evaluator(trainer, datasets if isinstance(loader, data.MixtureLoader) else dataset_dir)
    checkpoints = CheckpointManager(model_dir, keep_n=config.keep_n, keep_every=config.keep_every)
    state = initial_state(trainer, loader, checkpoints, options.tune_model_path, config.seed)
    checkpoints.prepare(trainer.saved(state))  # host buffers for the saves, mapped while the first steps run

    end_step = options.steps if options.steps is not None else config.total_steps
    start_step = int(state.step)

    log = MetricsLog(model_dir, enabled=is_main, config=config)
    if start_step > 0:
        log.event("resume", step=start_step)
    if isinstance(loader, data.MixtureLoader) and loader.mixture_changed:
        log.event("mixture_changed", step=start_step, mixture=loader.state_dict()["mixture"])
    bar = tqdm(
        total=end_step,
        initial=start_step,
        disable=not (options.progress and is_main),
        unit="step",
        dynamic_ncols=True,
    )
    steps = StepRecorder(config, options, end_step, trainer, evaluator, checkpoints, log, bar)
    metrics: dict = {}
    try:
        # Step n is dispatched, then step n + 1's batch read and placed, then step n - 1's metrics read:
        # the host never waits for the step it has just dispatched. A step after which the loop evaluates or
        # saves (and the last) is recorded at once, since that work needs its state.
        batch, position = next_batch(trainer, loader) if start_step < end_step else (None, None)
        previous = None
        for step in range(start_step, end_step):
            started = time.perf_counter()
            state, device_metrics = trainer.step(state, batch)
            dispatched = Dispatched(step + 1, device_metrics, position)
            if step + 1 < end_step:
                batch, position = next_batch(trainer, loader)
            if previous is not None:
                metrics = steps.record(previous, ended=started)
            previous = dispatched
            if steps.needs_state(step + 1):
                metrics, previous = steps.record(dispatched, state), None
        with _phase(options, "checkpoint"):
            checkpoints.wait()
    finally:
        bar.close()
        log.close()

    # Params spanning several processes cannot be sampled by one; the Ray driver samples from the checkpoint.
    if options.sample_prompt is not None and jax.process_count() == 1:
        params = trainer.servable(state.params)  # a LoRA run's adapters merged into the base
        print(sample_text(config, params, dataset_dir, options.sample_prompt, options.sample_tokens))
    return metrics


class DataPosition(NamedTuple):
    """Where the loader stood right after a step's batch: what that step's checkpoint and record hold."""

    loader_state: dict
    tokens_seen: dict[str, int]


class Dispatched(NamedTuple):
    """A train step handed to the devices whose figures are not read yet."""

    step: int  # optimizer steps done once it completes
    device_metrics: dict[str, jax.Array]
    position: DataPosition


def next_batch(trainer: Trainer, loader: data.Loader | data.MixtureLoader) -> tuple[Any, DataPosition]:
    """The next step's batch placed on the mesh, and the loader's position after it."""
    batch = trainer.global_batch(next(loader))
    return batch, DataPosition(loader.state_dict(), loader.tokens_seen())


class StepRecorder:
    """What the loop does with a completed step: its record (figures, timing), evaluation and checkpoint
    when due, the log, the progress bar and `on_step`.

    `step_seconds` splits the loop's wall time between the steps, each moment counted once: a step's time
    ends where the next one is dispatched (or, for a step recorded at once, where its figures arrive), so it
    covers everything the loop does (reading and placing data, waiting for the devices, evaluation,
    checkpoints, logging), and tokens/s and MFU show a data-bound run as one. Steps overlap, so a step's
    figure is in fact the loop's period around it. MFU counts attention as 6 * L * D * T (the causal half;
    see metrics.py), `mfu_palm` as PaLM's and nanoGPT's 12 * L * D * T."""

    def __init__(self, config: Config, options: RunOptions, end_step: int, trainer: Trainer,
                 evaluator: Evaluator, checkpoints: CheckpointManager, log: MetricsLog,
                 bar: tqdm):  # fmt: skip
        self.config, self.options, self.end_step, self.trainer = config, options, end_step, trainer
        self.evaluator, self.checkpoints, self.log, self.bar = evaluator, checkpoints, log, bar
        peak = peak_flops(jax.devices(), config.compute_dtype)
        self.mfu_per_token_per_sec = flops_per_token(config) / peak
        self.mfu_palm_per_token_per_sec = flops_per_token(config, full_attention=True) / peak
        self.accounted_until = time.perf_counter()  # the loop's time up to here is in some step's figure

    def needs_state(self, step: int) -> bool:
        """Whether the loop evaluates or saves after `step` optimizer steps (the last one included)."""
        saves = step % self.config.ckpt_every == 0 or step == self.end_step
        return saves or self.evaluator.due(step, self.end_step)

    def record(self, done: Dispatched, state: TrainState | None = None, ended: float | None = None) -> dict:
        """Wait for `done`'s figures and record them, its time ending at `ended` (default: when they arrive);
        with `needs_state(done.step)`, `state` is the state after it, which the evaluation reads and the
        checkpoint saves."""
        figures = jax.device_get(done.device_metrics)
        ended = time.perf_counter() if ended is None else ended
        seconds, self.accounted_until = ended - self.accounted_until, ended
        config, step = self.config, done.step
        tokens_per_sec = config.tokens_per_step / seconds
        metrics = {
            "step": step,
            "loss": float(figures["loss"]),
            "lr": float(figures["lr"]),
            "grad_norm": float(figures["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.mfu_per_token_per_sec * tokens_per_sec,
            "mfu_palm": self.mfu_palm_per_token_per_sec * tokens_per_sec,
            "tokens_seen": step * config.tokens_per_step,
            "step_seconds": seconds,
            **{f"tokens_seen/{name}": n for name, n in done.position.tokens_seen.items()},
        }
        assert state is not None or not self.needs_state(step), step
        if self.evaluator.due(step, self.end_step):
            with _phase(self.options, "evaluation"):
                metrics.update(self.evaluator.run(state.params))
        self.log.write(metrics)  # before the save: the log is flushed when that checkpoint commits
        if step % config.ckpt_every == 0 or step == self.end_step:
            # Returns once host copies are taken; the write overlaps the next steps.
            extra = {"loader": done.position.loader_state, "seed": config.seed, "config": config.to_dict()}
            extra.update(self.trainer.checkpoint_extra())  # a LoRA run saves its adapters and base identity
            with _phase(self.options, "checkpoint"):
                self.checkpoints.save(
                    step, self.trainer.saved(state), extra, before_commit=self.log.flush,
                    on_commit=_log_commit(self.log, self.options.model_dir),
                )  # fmt: skip
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            lr=f"{metrics['lr']:.2e}",
            gnorm=f"{metrics['grad_norm']:.2f}",
            tok_s=f"{tokens_per_sec:,.0f}",
            mfu=f"{metrics['mfu']:.1%}",
            refresh=False,
        )
        self.bar.update(1)
        if self.options.on_step is not None:
            self.options.on_step(metrics)
        return metrics


@contextlib.contextmanager
def _phase(options: RunOptions, name: str) -> Iterator[None]:
    """Tell `options.on_phase` that the loop does `name` (not a train step) until the block ends."""
    if options.on_phase is not None:
        options.on_phase(name)
    yield
    if options.on_phase is not None:
        options.on_phase("train")


def _log_commit(log: MetricsLog, model_dir: str) -> Callable[[int, float], None]:
    """What process 0 does once a checkpoint is committed: log the event and make it durable."""

    def committed(step: int, seconds: float) -> None:
        log.event("checkpoint", step=step, path=storage.join(model_dir, f"step_{step}"), seconds=seconds)
        # Best effort: on failure the lines stay pending, and the next save's flush must succeed to commit.
        with contextlib.suppress(InfrastructureError):
            log.flush()

    return committed


def initial_state(
    trainer: Trainer,
    loader: data.Loader | data.MixtureLoader,
    checkpoints: CheckpointManager,
    tune_model_path: str | None,
    seed: int,
) -> TrainState:
    """The newest committed checkpoint in model_dir with its data position (so an interrupted run ends as
    if it never stopped); else `tune_model_path`'s params with a fresh optimizer at step 0; else a fresh
    init."""
    step = checkpoints.latest_step()
    if step is not None:
        saved, extra = checkpoints.restore(trainer.abstract_saved_state, step)
        if not isinstance(extra.get("loader"), dict):
            raise CheckpointError(f"{checkpoints.model_dir}/step_{step}: holds no data-loader position")
        loader.load_state_dict(extra["loader"])
        return trainer.resumed(saved, extra, tune_model_path)
    if tune_model_path:
        # our checkpoints (full or slim), a Hugging Face folder of the family, or an original GPT-J release
        return trainer.tuned_state(tune_model_path)
    return trainer.init_state(seed)


def sample_text(config: Config, params, dataset_dir: str, prompt: str, n_tokens: int) -> str:
    """A continuation of `prompt` by the trained params, split over `mp` devices like in training."""
    tokenizer = data.load_tokenizer(dataset_dir)
    prompt_ids = tokenizer.encode(prompt).ids or [tokenizer.token_to_id("<|endoftext|>") or 0]
    new_ids = generate(
        model_for(config),
        params,
        prompt_ids,
        n_tokens,
        seq=config.seq,
        vocab_size=tokenizer.get_vocab_size(),
        temperature=0.8,
        seed=config.seed,
        mesh=sampling_mesh(config.mp),
    )
    return prompt + tokenizer.decode(new_ids)
