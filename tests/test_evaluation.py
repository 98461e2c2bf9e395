"""Validation loss and the lm-evaluation-harness adapter against direct forward passes of a tiny GPT-J on a
dp=4 x mp=2 mesh of fake CPU devices; harness tasks are YAML files with JSON-lines data written here."""

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mesh_transformer import data, evaluation, sharding
from mesh_transformer.checkpoint import save_params
from mesh_transformer.config import from_dict
from mesh_transformer.errors import UserError
from mesh_transformer.models import Model, build, model_for
from mesh_transformer.prepare import prepare_dataset
from mesh_transformer.train import Trainer

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
    "val_batches": 2,
}
WORDS = "the cat dog sat ran on a mat hat red blue big small and with under".split()


def write_corpus(path, n_docs: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(20, 60)))}) + "\n")
    return str(path)


def prepare(tmp_path, name: str, vocab: int, seed: int) -> str:
    corpus = write_corpus(tmp_path / f"{name}.jsonl", 60, seed)
    out = str(tmp_path / name)
    prepare_dataset([corpus], out, train_tokenizer_vocab=vocab, seq=32, val_fraction=0.3, seed=seed)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    config = from_dict(TINY)
    trainer = Trainer(config, sharding.mesh_for(config))
    params = trainer.init_state(0).params
    dataset = prepare(tmp, "dataset", 300, seed=1)
    tokenizer = data.load_tokenizer(dataset)
    return config, trainer, params, dataset, tokenizer, tmp


@pytest.fixture(scope="module")
def adapter(tiny):
    _, trainer, params, _, tokenizer, _ = tiny
    return evaluation.HarnessModel(trainer, params, tokenizer, max_gen_toks=12)


@functools.cache
def single_device_forward(shape: Model):
    """log-softmax of the model's logits, one plain jit on the default device: no mesh, no buckets."""
    model = build(shape)
    return jax.jit(
        lambda params, tokens_BT: jax.nn.log_softmax(model.apply(params, None, tokens_BT), axis=-1)
    )


def direct_logprobs(config, params, ids: list[int]) -> np.ndarray:
    """(len(ids), n_vocab) log-probabilities of a forward pass over ids (right-padded to seq: causal
    attention keeps padding from reaching earlier positions, and one length compiles once)."""
    assert len(ids) <= config.seq
    tokens = np.zeros((1, config.seq), np.int32)
    tokens[0, : len(ids)] = ids
    logp = single_device_forward(model_for(config))(jax.device_get(params), tokens)
    return np.asarray(logp[0, : len(ids)], np.float64)


def direct_score(config, params, context: list[int], continuation: list[int]) -> float:
    whole = (context + continuation)[-(config.seq + 1) :]
    logp = direct_logprobs(config, params, whole[:-1])
    n = min(len(continuation), len(whole) - 1)
    positions = range(len(whole) - 1 - n, len(whole) - 1)
    return float(sum(logp[t, whole[t + 1]] for t in positions))


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# ----- validation loss -----


def test_validation_loss_matches_direct_computation(tiny):
    config, trainer, params, dataset, _, _ = tiny
    validator = evaluation.Validator(trainer, {"pile": dataset}, 2, training_dataset=dataset)
    got = validator.losses(params)

    batches = data.validation_batches(dataset, seq=config.seq, global_batch=config.global_batch, n_batches=2)
    losses = []
    for batch in batches:
        for row in batch:
            logp = direct_logprobs(config, params, row[:-1].tolist())
            losses.append(-np.mean(logp[np.arange(config.seq), row[1:]]))
    expected = float(np.mean(losses))
    assert got["val/pile/loss"] == pytest.approx(expected, rel=1e-5)
    assert got["val/pile/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    # a freshly initialised model is near uniform over its 320 ids, not trained
    assert abs(expected - math.log(config.n_vocab)) < 0.5


def test_validation_sets_default_to_the_training_split_and_reject_other_tokenizers(tiny):
    config, trainer, _, dataset, _, tmp = tiny
    assert evaluation.validation_sets(config, dataset) == {"default": dataset}
    named = config.replace(val_set={"owt": "/data/owt"})
    assert evaluation.validation_sets(named, dataset) == {"owt": "/data/owt"}

    other = prepare(tmp, "other_tokenizer", 280, seed=2)
    with pytest.raises(UserError, match="val_set 'owt'.*another tokenizer"):
        evaluation.Validator(trainer, {"owt": other}, 1, training_dataset=dataset)
    with pytest.raises(UserError, match="not a prepared dataset"):
        evaluation.Validator(trainer, {"owt": str(tmp / "missing")}, 1, training_dataset=dataset)


# ----- harness adapter -----


def test_loglikelihood_equals_summed_logprobs_of_a_direct_forward_pass(tiny, adapter):
    config, _, params, _, tokenizer, _ = tiny
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    long_context = " ".join(WORDS * 4)  # far longer than seq: left-truncated
    cases = [("the cat sat", " on the mat"), (long_context, " and the dog"), ("", "red hat")]
    got = adapter.loglikelihood([request("loglikelihood", c, x) for c, x in cases])

    eos = tokenizer.token_to_id("<|endoftext|>")
    for (context, continuation), (logprob, _) in zip(cases, got, strict=True):
        if context:
            context_ids = encode(context)
            continuation_ids = encode(context + continuation)[len(context_ids) :]
        else:
            context_ids, continuation_ids = [eos], encode(continuation)
        assert len(encode(long_context)) > config.seq
        assert logprob == pytest.approx(direct_score(config, params, context_ids, continuation_ids), rel=1e-5)


def test_is_greedy_is_true_only_for_the_argmax_continuation(tiny, adapter):
    config, _, params, _, tokenizer, _ = tiny
    context = tokenizer.encode("the dog ran", add_special_tokens=False).ids
    vocab = tokenizer.get_vocab_size()
    greedy = []
    for _ in range(3):  # a greedy continuation of three tokens
        logp = direct_logprobs(config, params, context + greedy)[-1, :vocab]
        greedy.append(int(np.argmax(logp)))
    other = (greedy[0] + 1) % vocab
    results = adapter.score_tokens(
        [(context, greedy), (context, greedy[:1]), (context, [other] + greedy[1:])]
    )
    assert [g for _, g in results] == [True, True, False]
    assert results[0][0] == pytest.approx(direct_score(config, params, context, greedy), rel=1e-5)


def test_requests_of_many_lengths_compile_one_program_per_length_bucket(tiny):
    _, trainer, params, _, tokenizer, _ = tiny
    fresh = evaluation.HarnessModel(trainer, params, tokenizer)
    rng = np.random.default_rng(0)
    pairs = [
        (rng.integers(1, 300, size=n).tolist(), rng.integers(1, 300, size=m).tolist())
        for n, m in zip(rng.integers(1, 50, size=23), rng.integers(1, 8, size=23), strict=True)
    ]
    results = fresh.score_tokens(pairs)
    assert len(results) == 23 and all(np.isfinite(r[0]) and r[0] < 0 for r in results)
    assert fresh._score._cache_size() == 2  # lengths 16 and 32 (= seq), not one per request


def test_loglikelihood_rolling_predicts_every_token_once(tiny, adapter):
    config, _, params, _, tokenizer, _ = tiny
    eos = tokenizer.token_to_id("<|endoftext|>")
    short, long = "the cat sat on the mat", " ".join(WORDS * 3)
    got = adapter.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in (short, long)])

    ids = tokenizer.encode(short, add_special_tokens=False).ids
    logp = direct_logprobs(config, params, [eos] + ids[:-1])
    assert got[0] == pytest.approx(sum(logp[t, ids[t]] for t in range(len(ids))), rel=1e-5)

    ids = tokenizer.encode(long, add_special_tokens=False).ids
    assert len(ids) > config.seq
    windows = map(make_disjoint_window, get_rolling_token_windows(ids, eos, config.seq, 1))
    expected = sum(direct_score(config, params, c, x) for c, x in windows)
    assert got[1] == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_before_the_first_stop_string(adapter):
    prompt = "the big dog"
    settings = {"until": ["\x00never"], "max_gen_toks": 12}
    (full,) = adapter.generate_until([request("generate_until", prompt, settings)])
    assert len(full) >= 6, f"expected a longer greedy continuation, got {full!r}"
    stop = full[3:5]
    cut, again = adapter.generate_until(
        [
            request("generate_until", prompt, {"until": [stop, "\x00never"], "max_gen_toks": 12}),
            request("generate_until", prompt, settings),
        ]
    )
    assert cut == full[: full.index(stop)]
    assert again == full  # greedy, and independent of its batch mates


def write_tasks(task_dir, n_docs: int = 6, answers: list[str] | None = None) -> list[dict]:
    """Three task YAMLs over the same docs; tiny_generate's targets are `answers` (default: each doc's first
    choice), kept in a file of their own. Returns the docs."""
    task_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    docs = [
        {"question": " ".join(rng.choice(WORDS, 4)), "choices": list(rng.choice(WORDS, 3)), "label": i % 3}
        for i in range(n_docs)
    ]
    (task_dir / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    answers = answers if answers is not None else [d["choices"][0] for d in docs]
    (task_dir / "generate.jsonl").write_text(
        "".join(
            json.dumps({"question": d["question"], "answer": a}) + "\n"
            for d, a in zip(docs, answers, strict=True)
        )
    )

    def dataset(name: str) -> str:
        return f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {task_dir / name}
  cache_dir: {task_dir / "cache"}
test_split: test
"""

    (task_dir / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        + dataset("docs.jsonl")
        + """output_type: multiple_choice
doc_to_text: "{{question}}:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    (task_dir / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n"
        + dataset("generate.jsonl")
        + """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    (task_dir / "tiny_perplexity.yaml").write_text(
        "task: tiny_perplexity\n"
        + dataset("docs.jsonl")
        + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
    )
    return docs


def choice_accuracy(adapter, docs: list[dict]) -> float:
    """Accuracy as the adapter's own log-likelihoods say: the choice with the highest log-probability."""
    correct = 0
    for doc in docs:
        scores = adapter.loglikelihood(
            [request("loglikelihood", f"{doc['question']}:", f" {c}") for c in doc["choices"]]
        )
        correct += int(np.argmax([s for s, _ in scores]) == doc["label"])
    return correct / len(docs)


def test_custom_tasks_run_end_to_end_through_simple_evaluate(tiny, adapter, monkeypatch):
    """Every metric equals what the adapter's own answers give: accuracy from its log-likelihoods, exact
    match from its greedy generations (half the targets are those generations), word perplexity and bits
    per byte from its rolling log-likelihoods and the words and UTF-8 bytes of each text."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = tiny[5] / "tasks"
    docs = write_tasks(task_dir)
    until = {"until": ["\n", "."], "max_gen_toks": 8}
    generated = adapter.generate_until([request("generate_until", d["question"], until) for d in docs])
    answers = [g if i % 2 == 0 else g + " not" for i, g in enumerate(generated)]
    write_tasks(task_dir, answers=answers)
    tasks = ["tiny_choice", "tiny_generate", "tiny_perplexity"]
    results = evaluation.run_harness(adapter, tasks, include_path=str(task_dir), bootstrap_iters=0)
    metrics = evaluation.harness_metrics(results)

    assert metrics["harness/tiny_choice/acc"] == pytest.approx(choice_accuracy(adapter, docs))
    assert metrics["harness/tiny_generate/exact_match"] == pytest.approx(0.5)
    texts = [d["question"] for d in docs]
    logprob = sum(adapter.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts]))
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert metrics["harness/tiny_perplexity/word_perplexity"] == pytest.approx(math.exp(-logprob / words))
    assert metrics["harness/tiny_perplexity/bits_per_byte"] == pytest.approx(-logprob / n_bytes / math.log(2))
    assert not any("stderr" in k for k in metrics)


def test_evaluator_of_a_training_run_logs_validation_and_harness_metrics(tiny, adapter, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config, trainer, params, dataset, _, tmp = tiny
    docs = write_tasks(tmp / "tasks")
    task_yaml = str(tmp / "tasks" / "tiny_choice.yaml")  # a path: no --include-path during training
    evaluator = evaluation.Evaluator(
        Trainer(config.replace(eval_harness_tasks=[task_yaml], val_every=5), trainer.mesh), dataset
    )
    assert [s for s in range(1, 13) if evaluator.due(s, end_step=12)] == [5, 10, 12]
    metrics = evaluator.run(params)
    assert set(metrics) == {"val/default/loss", "val/default/ppl", "harness/tiny_choice/acc"}
    # the validator itself is checked against direct forward passes above
    validator = evaluation.Validator(
        trainer, {"default": dataset}, config.val_batches, training_dataset=dataset
    )
    assert metrics["val/default/loss"] == pytest.approx(
        validator.losses(params)["val/default/loss"], rel=1e-6
    )
    assert metrics["val/default/ppl"] == pytest.approx(math.exp(metrics["val/default/loss"]), rel=1e-6)
    assert metrics["harness/tiny_choice/acc"] == pytest.approx(choice_accuracy(adapter, docs))
    with pytest.raises(UserError, match="unknown evaluation harness task.*: lambada_typo"):
        evaluation.Evaluator(
            Trainer(config.replace(eval_harness_tasks=["lambada_typo"]), trainer.mesh), dataset
        )


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "eval_harness.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_eval_harness_script_scores_a_checkpoint_and_reports_bad_input_in_one_line(tiny, adapter):
    config, _, params, dataset, _, tmp = tiny
    config_path = tmp / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    ckpt = str(tmp / "slim")
    save_params(ckpt, params)
    task_dir = tmp / "tasks"
    docs = write_tasks(task_dir)
    common = ["--config", str(config_path), "--tokenizer", dataset, "--include-path", str(task_dir)]

    output = str(tmp / "results.json")
    ok = run_script(
        *common, "--ckpt", ckpt, "--tasks", "tiny_choice", "--limit", "4", "--output", str(output)
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "|tiny_choice|" in ok.stdout.replace(" ", "") and "acc" in ok.stdout
    with open(output) as f:
        saved = json.load(f)
    assert saved["results"]["tiny_choice"]["sample_len"] == 4
    acc = saved["results"]["tiny_choice"]["acc,none"]
    assert acc == pytest.approx(choice_accuracy(adapter, docs[:4]))  # the checkpoint holds these params
    (row,) = [r.split("|") for r in ok.stdout.replace(" ", "").splitlines() if r.startswith("|tiny_choice|")]
    assert float(row[row.index("acc") + 2]) == pytest.approx(acc, abs=1e-4)  # the printed table's figure

    # in this process, whose task index is built already: the script prints the same UserError as one line
    with pytest.raises(UserError) as bad_task:
        evaluation.check_tasks(["tiny_choice", "no_such_task"], include_path=str(task_dir))
    assert str(bad_task.value) == (
        "unknown evaluation harness task(s): no_such_task; see `lm-eval ls tasks`, "
        "or pass --include-path DIR for your own task YAML files"
    )

    missing = run_script(*common, "--ckpt", str(tmp / "nowhere"), "--tasks", "tiny_choice")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp / 'nowhere'} (expected a checkpoint directory, a model_dir "
        "or a Hugging Face folder of the family)"
    ]
