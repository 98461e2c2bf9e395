"""Evaluation: validation loss and perplexity on fixed batches of named datasets, and an lm-evaluation-
harness adapter (`HarnessModel`) that scores and generates on the mesh in a few bucketed shapes.

`Evaluator` runs both every `val_every` steps of a training run; `scripts/eval_harness.py` runs the harness
on a checkpoint or a Hugging Face folder of the family.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer import data, sharding, storage
from mesh_transformer.config import Config
from mesh_transformer.engine import Generator, place_params
from mesh_transformer.errors import UserError
from mesh_transformer.models import model_for
from mesh_transformer.prepare import TOKENIZER_NAME, eos_id_of, read_tokenizer_file
from mesh_transformer.sampling import Row, SamplingParams, bucket
from mesh_transformer.train import Trainer

try:  # lm-eval is the optional `eval` extra: validation loss needs none of it
    from lm_eval.api.model import LM as _HarnessLM
except ImportError:  # pragma: no cover - exercised only where the extra is not installed
    _HarnessLM = object

DEFAULT_SET = "default"  # name of the training dataset's validation split when the config names no val_set
MIN_BUCKET = 16  # shortest padded length: shorter buckets would only add compilations


# ----- validation loss -----


def validation_sets(config: Config, training: str | Mapping[str, float]) -> dict[str, str]:
    """Name -> prepared dataset dir: the config's `val_set`, else the validation split of the training
    dataset (or of each dataset of a mixture, {dataset dir: weight}, under its name)."""
    if config.val_set:
        return dict(config.val_set)
    if isinstance(training, str):
        return {DEFAULT_SET: training}
    return dict(zip(data.dataset_names(list(training)), training, strict=True))


class Validator:
    """Mean cross-entropy and perplexity over `n_batches` fixed batches of each validation set.

    Batches are read once and reused, so every evaluation of a run sees the same tokens. Each set must have
    been tokenized like the training data (same tokenizer.json), or its loss would mean nothing. In a set of
    fine-tuning examples only completion tokens count (the loss is their mean over all the batches); with
    the config's document_mask, attention stays inside documents as in training."""

    def __init__(self, trainer: Trainer, sets: dict[str, str], n_batches: int, training_dataset: str):
        config = trainer.config
        self.trainer = trainer
        reference = data.read_index(training_dataset).get("tokenizer_sha256")
        self.batches: dict[str, list[data.Batch]] = {}
        self.weights: dict[str, list[int] | None] = {}
        for name, dataset_dir in sets.items():
            index = data.read_index(dataset_dir)
            if reference and index.get("tokenizer_sha256") not in (None, reference):
                raise UserError(
                    f"val_set '{name}' ({dataset_dir}) was tokenized with another tokenizer than the "
                    f"training data ({training_dataset}); prepare it with the training data's tokenizer.json"
                )
            if index["vocab_size"] > config.n_vocab:
                raise UserError(
                    f"val_set '{name}' ({dataset_dir}) has {index['vocab_size']} token ids but the model's "
                    f"n_vocab is {config.n_vocab}"
                )
            self.batches[name] = data.validation_examples(
                dataset_dir,
                seq=config.seq,
                global_batch=config.global_batch,
                n_batches=n_batches,
                segments=config.document_mask,
            )
            self.weights[name] = self._target_counts(name, dataset_dir)

    def _global(self, batch: data.Batch) -> data.Batch:
        return jax.tree_util.tree_map(
            lambda a: sharding.global_array(a, self.trainer.eval_batch_sharding), batch
        )

    def _target_counts(self, name: str, dataset_dir: str) -> list[int] | None:
        """Targets each batch's loss mask counts (over all processes), or None when every token counts."""
        if self.batches[name][0].loss_mask is None:
            return None
        count = jax.jit(
            lambda mask: jnp.sum(mask[:, 1:] > 0), out_shardings=sharding.replicated(self.trainer.mesh)
        )
        counts = [int(jax.device_get(count(self._global(b).loss_mask))) for b in self.batches[name]]
        if not sum(counts):
            raise UserError(
                f"val_set '{name}' ({dataset_dir}): its first {len(counts)} validation batches hold no "
                "completion tokens to score; prepare it with more examples or use more val_batches"
            )
        return counts

    def losses(self, params) -> dict[str, float]:
        """{"val/{name}/loss": mean cross-entropy (nats/token), "val/{name}/ppl": exp(loss)} for every set."""
        out = {}
        for name, batches in self.batches.items():
            losses = [self.trainer.eval_loss(params, self._global(b)) for b in batches]
            # A batch's loss is the mean over the targets it counts: every token, the same number in every
            # batch (so the mean of batch means is the token mean), or those its loss mask marks (weighted).
            loss = float(np.average(jax.device_get(losses), weights=self.weights[name]))
            out[f"val/{name}/loss"] = loss
            out[f"val/{name}/ppl"] = math.exp(min(loss, 700.0))  # exp overflows float64 past ~709
        return out


# ----- lm-evaluation-harness adapter -----


class HarnessModel(_HarnessLM):
    """lm-evaluation-harness `LM` backed by our model on the Trainer's mesh.

    Requests are tokenized, sorted by length and batched `batch_size` rows at a time (a multiple of `dp`,
    padded with dummy rows); each batch is right-padded to a power-of-two length, so a whole task compiles
    one program per length bucket. Contexts are left-truncated to the model's `seq`."""

    def __init__(
        self,
        trainer: Trainer,
        params,
        tokenizer: Any,
        *,
        batch_size: int | None = None,
        max_gen_toks: int = 256,
    ):
        if _HarnessLM is object:
            raise UserError("the evaluation harness is not installed: pip install -e '.[eval]'")
        super().__init__()
        config = trainer.config
        self.trainer, self.params, self.tokenizer = trainer, params, tokenizer
        self.seq = config.seq
        self.vocab_size = min(tokenizer.get_vocab_size(with_added_tokens=True), config.n_vocab)
        self.eos_id = eos_id_of(tokenizer, "the evaluation tokenizer")
        self.max_gen_toks = max_gen_toks
        self._generator_instance: Generator | None = None  # built at the first generation request
        dp = config.dp
        rows = batch_size or config.global_batch
        self.batch_size = -(-rows // dp) * dp  # the batch is split over dp
        rows_sharding = trainer.eval_batch_sharding  # (batch, length) split over dp
        self._score = jax.jit(
            self._score_fn,
            in_shardings=(trainer.state_shardings.params, rows_sharding, rows_sharding),
            # replicated outputs: every process (on a multi-host mesh) reads all rows
            out_shardings=(sharding.replicated(trainer.mesh), sharding.replicated(trainer.mesh)),
        )

    def set_params(self, params) -> None:
        """Evaluate other params of the same model (a later training step) without recompiling."""
        self.params = params
        if self._generator_instance is not None:
            shape = model_for(self.trainer.config)
            self._generator_instance.params = place_params(params, shape, self.trainer.mesh)

    def _score_fn(self, params, tokens_BT: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """log p(target) at every position and whether the target is the argmax over real token ids."""
        with sharding.activation_sharding(self.trainer.mesh):
            logits_BTV = self.trainer.model.apply(params, None, tokens_BT).astype(jnp.float32)
        vocab_V = jnp.arange(logits_BTV.shape[-1])
        # one-hot product rather than a gather keeps a vocab split over mp split (as train.cross_entropy)
        target_logit_BT = jnp.sum(logits_BTV * (vocab_V == targets_BT[..., None]), axis=-1)
        logprob_BT = target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
        greedy_BT = jnp.argmax(jnp.where(vocab_V < self.vocab_size, logits_BTV, -jnp.inf), axis=-1)
        return logprob_BT, greedy_BT == targets_BT

    # ----- token-level scoring -----

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) for (context, continuation) ids.

        The context must hold at least one id; context + continuation is left-truncated to seq + 1 ids."""
        rows = []
        for context, continuation in pairs:
            assert context and continuation, "scoring needs a context and a continuation"
            whole = (list(context) + list(continuation))[-(self.seq + 1) :]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            length = bucket(max(len(rows[i][0]) for i in chunk), MIN_BUCKET, self.seq)
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(chunk):
                inputs, outputs, _ = rows[i]
                tokens[r, : len(inputs)], targets[r, : len(outputs)] = inputs, outputs
            logprob, greedy = jax.device_get(
                self._score(self.params, self._global(tokens), self._global(targets))
            )
            for r, i in enumerate(chunk):
                n_inputs, n_scored = len(rows[i][0]), rows[i][2]
                scored = slice(n_inputs - n_scored, n_inputs)
                results[i] = (
                    float(np.sum(logprob[r, scored], dtype=np.float64)),
                    bool(greedy[r, scored].all()),
                )
        return results

    def _global(self, rows: np.ndarray) -> jax.Array:
        """A batch every process holds whole, as one array split over dp."""
        sharding_ = self.trainer.eval_batch_sharding
        return jax.make_array_from_callback(rows.shape, sharding_, lambda index: rows[index])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ----- the harness API -----

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            # a context's trailing spaces belong to the continuation, so BPE merges them as in running text
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                context_ids = self._encode(context)
                whole = self._encode(context + continuation)
                continuation_ids = whole[len(context_ids) :]
            else:  # nothing to condition on: the end-of-text token, as at a document start
                context_ids, continuation_ids = [self.eos_id], self._encode(continuation)
            if not continuation_ids:
                raise UserError(f"loglikelihood request with an empty continuation: {request.args!r}")
            pairs.append((context_ids, continuation_ids))
        results = self.score_tokens(pairs)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.eos_id, max_seq_len=self.seq, context_len=1
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score_tokens(pairs), strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:
        rows = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.seq - 1))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            prompt_ids = (self._encode(context) or [self.eos_id])[-(self.seq - max_new) :]
            settings = SamplingParams(
                max_tokens=max_new, temperature=temperature, stop=tuple(s for s in until if s)
            )
            rows.append(Row(prompt_ids, settings))
        # similar prompt lengths share a batch (and its padded length)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt_ids))
        completions = self._generator().generate([rows[i] for i in order])
        texts = [""] * len(rows)
        for i, completion in zip(order, completions, strict=True):
            texts[i] = completion.text
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generator(self) -> Generator:
        if self._generator_instance is None:
            self._generator_instance = Generator(
                model_for(self.trainer.config),
                self.params,
                seq=self.seq,
                tokenizer=self.tokenizer,
                eos_id=self.eos_id,
                mesh=self.trainer.mesh,
                max_batch=self.batch_size,
            )
        return self._generator_instance


# ----- running the harness -----


@functools.cache
def task_manager(include_path: str | None = None) -> Any:
    """The harness's task index (built-in tasks plus YAML tasks under include_path); slow, so built once."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path}: not a directory of task YAML files")
    return TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """Raise one clear line for task names the harness does not know."""
    if not tasks:
        raise UserError("no evaluation harness tasks given; expected names such as lambada_openai,piqa")
    known = set(task_manager(include_path).all_tasks)
    # a task may also be a YAML file's path, which the harness loads directly
    unknown = [t for t in tasks if t not in known and not (t.endswith(".yaml") and os.path.isfile(t))]
    if unknown:
        raise UserError(
            f"unknown evaluation harness task(s): {', '.join(unknown)}; "
            "see `lm-eval ls tasks`, or pass --include-path DIR for your own task YAML files"
        )


def run_harness(
    model: HarnessModel,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    include_path: str | None = None,
    bootstrap_iters: int = 100_000,
) -> dict:
    """lm_eval.simple_evaluate's results dict for `tasks` (zero-shot unless a task sets its own shots)."""
    from lm_eval import simple_evaluate

    check_tasks(tasks, include_path)
    return simple_evaluate(
        model=model,
        tasks=list(tasks),
        limit=limit,
        task_manager=task_manager(include_path),
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )


def harness_metrics(results: dict) -> dict[str, float]:
    """{"harness/{task}/{metric}": value} from a results dict; metrics under a filter other than "none"
    are named {metric}_{filter}; standard errors are left out."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            out[f"harness/{task}/{name}"] = float(value)
    return out


# ----- during training -----


class Evaluator:
    """What a training run evaluates every `val_every` steps (and at its last step): validation loss on
    `val_batches` batches of each validation set, and the `eval_harness_tasks` when there are any."""

    def __init__(self, trainer: Trainer, training: str | Mapping[str, float]):
        """training: the training dataset dir, or a mixture's {dataset dir: weight}."""
        config = trainer.config
        training_dataset = training if isinstance(training, str) else next(iter(training))
        self.config, self.trainer, self.training_dataset = config, trainer, training_dataset
        self.validator: Validator | None = None
        self.harness_model: HarnessModel | None = None
        if config.val_batches:
            sets = validation_sets(config, training)
            self.validator = Validator(trainer, sets, config.val_batches, training_dataset)
        if config.eval_harness_tasks:
            check_tasks(config.eval_harness_tasks)  # fail before training, not at the first evaluation

    def due(self, step: int, end_step: int) -> bool:
        wanted = self.validator is not None or bool(self.config.eval_harness_tasks)
        return wanted and (step % self.config.val_every == 0 or step == end_step)

    def run(self, params) -> dict[str, float]:
        metrics = self.validator.losses(params) if self.validator is not None else {}
        if self.config.eval_harness_tasks:
            if self.harness_model is None:  # one adapter for the run: its programs compile once
                tokenizer = data.load_tokenizer(self.training_dataset)
                self.harness_model = HarnessModel(self.trainer, params, tokenizer)
            self.harness_model.set_params(params)
            results = run_harness(self.harness_model, self.config.eval_harness_tasks, bootstrap_iters=0)
            metrics.update(harness_metrics(results))
        return metrics


# ----- loading a model to evaluate -----


def check_model_path(path: str) -> None:
    """Fail early, before anything slow, when a model path (local or gs://) does not exist."""
    if not (storage.path_exists(path) or storage.is_dir(path)):
        raise UserError(
            f"checkpoint not found: {path} (expected a checkpoint directory, a model_dir "
            "or a Hugging Face folder of the family)"
        )


def load_params(trainer: Trainer, path: str) -> Any:
    """Params from a full or slim checkpoint (or a model_dir's newest), a Hugging Face folder of the config's
    architecture, an original Mesh-Transformer-JAX checkpoint or a LoRA fine-tune (adapters merged), placed
    with the Trainer's param shardings."""
    from mesh_transformer.hf import load_pretrained_params

    check_model_path(path)
    return load_pretrained_params(path, trainer.config, trainer.abstract_state.params)


def find_tokenizer(explicit: str | None, model_path: str, config: Config) -> Any:
    """The tokenizer to evaluate with: `explicit` (a tokenizer.json or a prepared dataset dir), else a
    Hugging Face folder's own, else the one the HF export would pick (the run's dataset, the config's)."""
    from mesh_transformer.data import find_tokenizer
    from mesh_transformer.hf import is_hf_folder

    hf_tokenizer = storage.join(model_path, TOKENIZER_NAME)
    if not explicit and is_hf_folder(model_path) and storage.path_exists(hf_tokenizer):
        return read_tokenizer_file(hf_tokenizer)[0]
    path = find_tokenizer(model_path, config, explicit)  # one search rule for export and evaluation
    if path is None:
        raise UserError(
            f"no tokenizer found for {model_path}; "
            "pass --tokenizer path/to/tokenizer.json (or a prepared dataset dir)"
        )
    return read_tokenizer_file(path)[0]
