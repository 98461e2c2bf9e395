"""A served model scored by lm-evaluation-harness's own API client: `lm_eval --model local-completions`
against the server (logprobs and echo) gives the accuracy of `scripts/eval_harness.py` on the same
checkpoint and of `lm_eval --model hf` on its Hugging Face export, and every request's log-likelihood
within 1e-3 of both."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from test_sampling import SEQ, SHAPE, tiny_params, tiny_tokenizer
from test_server import TINY_CONFIG, RunningServer

from mesh_transformer import evaluation, sharding
from mesh_transformer.checkpoint import save_params
from mesh_transformer.config import from_dict
from mesh_transformer.engine import Generator
from mesh_transformer.hf import export_checkpoint
from mesh_transformer.train import Trainer

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {**TINY_CONFIG, "tpu_size": 1, "cores_per_replica": 1, "per_replica_batch": 4}
WORDS = "The quick brown fox jumps over the lazy dog hello world model".split()
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS")  # the config's own device count, not the test session's 8
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def lm_eval(model: str, model_args: str, tasks: str, output: str) -> tuple[float, dict]:
    """The accuracy lm_eval reports, and each (document, choice)'s request and log-likelihood."""
    run(
        sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
        "--tasks", "tiny_choice", "--include_path", tasks, "--output_path", output, "--log_samples",
        "--device", "cpu", "--batch_size", "4",
    )  # fmt: skip
    (folder,) = [os.path.join(output, d) for d in os.listdir(output)]
    results = next(f for f in os.listdir(folder) if f.startswith("results"))
    samples = next(f for f in os.listdir(folder) if f.startswith("samples"))
    with open(os.path.join(folder, results)) as f:
        accuracy = json.load(f)["results"]["tiny_choice"]["acc,none"]
    scores = {}  # (doc, choice) -> ((context, continuation), log-likelihood)
    with open(os.path.join(folder, samples)) as f:
        for sample in map(json.loads, f):
            for k, (args, response) in enumerate(
                zip(sample["arguments"].values(), sample["resps"], strict=True)
            ):
                scores[(sample["doc_id"], k)] = ((args["arg_0"], args["arg_1"]), float(response[0][0]))
    return accuracy, scores


def test_lm_eval_scores_the_served_model_like_the_harness_adapter_and_transformers(tmp_path):
    params, tokenizer = tiny_params(), tiny_tokenizer()
    rng = np.random.default_rng(5)
    docs = [
        {"question": " ".join(rng.choice(WORDS, 4)), "choices": list(rng.choice(WORDS, 3)), "label": i % 3}
        for i in range(8)
    ]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_choice.yaml").write_text(TASK.format(docs=tasks / "docs.jsonl", cache=tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ckpt = str(tmp_path / "ckpt")
    save_params(ckpt, params)
    hf_dir = str(tmp_path / "hf")
    export_checkpoint(ckpt, from_dict(CONFIG), hf_dir, tokenizer=str(tmp_path / "tokenizer.json"))

    # scripts/eval_harness.py on the checkpoint; its adapter, in this process, for each request's score
    script = run(
        sys.executable, os.path.join(REPO, "scripts", "eval_harness.py"),
        "--config", str(tmp_path / "config.json"), "--ckpt", ckpt,
        "--tasks", "tiny_choice", "--include-path", str(tasks),
        "--tokenizer", str(tmp_path / "tokenizer.json"), "--output", str(tmp_path / "script.json"),
    )  # fmt: skip
    assert "tiny_choice" in script.stdout
    script_accuracy = json.loads((tmp_path / "script.json").read_text())["results"]["tiny_choice"]["acc,none"]
    config = from_dict(CONFIG)
    trainer = Trainer(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
    adapter = evaluation.HarnessModel(trainer, evaluation.load_params(trainer, ckpt), tokenizer)

    generator = Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, chunk_tokens=8, batch_sizes=(1, 16))
    server = RunningServer(generator)
    try:
        served_args = (
            f"base_url={server.url}/v1/completions,model=tiny-gptj,tokenizer={hf_dir},"
            f"tokenizer_backend=huggingface,max_length={SEQ}"
        )
        served_accuracy, served = lm_eval(
            "local-completions", served_args, str(tasks), str(tmp_path / "served")
        )
    finally:
        server.close()
    hf_accuracy, hf = lm_eval(
        "hf", f"pretrained={hf_dir},dtype=float32", str(tasks), str(tmp_path / "hf_eval")
    )

    assert served_accuracy == script_accuracy == hf_accuracy
    assert set(served) == set(hf) and len(served) == 3 * len(docs)
    requests = [Instance("loglikelihood", {}, pair, 0) for pair, _ in served.values()]
    ours = [ll for ll, _ in adapter.loglikelihood(requests)]
    for (key, (pair, score)), adapter_score in zip(served.items(), ours, strict=True):
        assert hf[key][0] == pair
        assert abs(score - hf[key][1]) < 1e-3 and abs(score - adapter_score) < 1e-3, (pair, score, hf[key])
