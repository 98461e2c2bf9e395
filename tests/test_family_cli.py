"""Every job through the command line, for GPT-NeoX and GPT-Neo, as a user runs them, in one run per
architecture that reuses one model dir: `scripts/hf_config.py` writes the config of a Hugging Face folder,
`device_train.py --tune-model-path` fine-tunes it on a (2, 4) mesh (GPT-NeoX as two Ray hosts, GPT-Neo in one
process), a second `device_train.py` resumes it and evaluates (validation loss and an lm-eval task), then
`slim_checkpoint.py`, `to_hf_weights.py` (the folder loads in `transformers` as the right class with our
logits to 1e-4) and `device_sample.py --serve` (one OpenAI-client request gives transformers' greedy tokens
on the export). GPT-J's jobs have their own tests (test_hf.py, test_server.py, test_cluster.py, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import serve_one_greedy_request
from test_evaluation import WORDS, write_tasks
from test_family import hf_logits, random_hf_model
from test_hf import write_word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from mesh_transformer.config import ConfigError, load_config
from mesh_transformer.hf import load_pretrained_params, training_config_from_hf
from mesh_transformer.metrics import read_metrics
from mesh_transformer.models import build, model_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16
CASES = {"gpt_neox": ("neox_parallel", ["--hosts", "2"]), "gpt_neo": ("neo_local_global_tied", [])}


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, f"{name} {args}: {done.stderr[-3000:]}"
    return done


def write_corpus(path, n_docs: int = 40) -> None:
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=30))}) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(CASES))
def test_every_job_through_the_command_line(tmp_path, architecture):
    case, hosts = CASES[architecture]
    random_hf_model(case).save_pretrained(tmp_path / "pretrained")
    words = [f"w{i}" for i in range(70)] + WORDS  # 87 tokens with <|endoftext|>: within the HF model's 90
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer.json", words)
    write_corpus(tmp_path / "corpus.jsonl")

    # hf_config.py: the architecture and shapes of the folder, the vocabulary padded to divide by mp 4
    config_path = tmp_path / "config.json"
    written = script(
        "scripts/hf_config.py",
        str(tmp_path / "pretrained"),
        "--tpu-size",
        "8",
        "--cores-per-replica",
        "4",
        "--seq",
        str(SEQ),
        "--output",
        str(config_path),
    )
    assert written.stdout.startswith(f"wrote {config_path}: {architecture}, ")
    raw = json.loads(config_path.read_text())
    assert (raw["architecture"], raw["n_vocab"], raw["seq"]) == (architecture, 92, SEQ)
    raw.update(
        total_steps=4,
        warmup_steps=0,
        anneal_steps=4,
        lr=3e-3,
        ckpt_every=2,
        gradient_accumulation_steps=1,
        compute_dtype="float32",
        remat="none",
        val_batches=1,
        val_every=100,
        model_dir=str(tmp_path / "run"),
    )
    config_path.write_text(json.dumps(raw))

    # train 2 steps from the HF weights on (2, 4), then resume to step 4 and evaluate there
    train = [
        "device_train.py",
        "--data",
        str(tmp_path / "corpus.jsonl"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
    ]
    train += ["--sample-tokens", "0", "--no-progress"]
    script(
        *train,
        "--config",
        str(config_path),
        "--steps",
        "2",
        "--tune-model-path",
        str(tmp_path / "pretrained"),
        *hosts,
    )
    task_dir = tmp_path / "tasks"
    write_tasks(task_dir)
    eval_path = tmp_path / "eval_config.json"
    eval_path.write_text(json.dumps({**raw, "eval_harness_tasks": [str(task_dir / "tiny_choice.yaml")]}))
    script(*train, "--config", str(eval_path))
    records, events = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert "val/default/loss" in records[-1] and 0 <= records[-1]["harness/tiny_choice/acc"] <= 1

    # slim the newest checkpoint, export the slim one; transformers loads it as the class of the architecture
    config = load_config(str(config_path))
    script("slim_checkpoint.py", str(tmp_path / "run"), str(tmp_path / "slim"), "--dtype", "float32")
    script(
        "to_hf_weights.py",
        "--config",
        str(config_path),
        "--ckpt",
        str(tmp_path / "slim"),
        "--output-path",
        str(tmp_path / "hf"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == model_for(config).hf_class
    trained = load_pretrained_params(str(tmp_path / "run"), config)  # the full step-4 checkpoint
    tokens_BT = np.random.default_rng(1).integers(0, len(words) + 1, (2, SEQ))
    ours = np.asarray(build(model_for(config)).apply(trained, None, jnp.asarray(tokens_BT)))
    np.testing.assert_allclose(hf_logits(exported, tokens_BT), ours, atol=1e-4, rtol=0)
    # fine-tuned from the pretrained weights: 4 Adam steps of lr 3e-3 move each weight by at most about 4 lr
    pretrained = load_pretrained_params(str(tmp_path / "pretrained"), config)
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(pretrained), strict=True)
    ]
    assert 0 < max(moved) < 4 * 3e-3 * 1.5, max(moved)

    # serve the run: one greedy request gives transformers' greedy tokens on the export
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = hf_tokenizer("the cat sat on w3 w14")["input_ids"]
    assert prompt == tokenizer.encode("the cat sat on w3 w14").ids
    text = serve_one_greedy_request(
        [sys.executable, os.path.join(ROOT, "device_sample.py"), "--config", str(config_path)],
        config.name,
        prompt,
        8,
    )
    with torch.no_grad():  # the tokenizer's ids only, as our sampler keeps to them
        theirs = exported.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=8,
            eos_token_id=None,
            pad_token_id=0,
            suppress_tokens=list(range(tokenizer.get_vocab_size(), config.n_vocab)),
        )[0, len(prompt) :].tolist()
    assert text.split() == hf_tokenizer.decode(theirs).split()


def test_hf_config_of_another_model_type_or_an_unsplittable_shape_is_one_line(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "hf_config.py"), str(tmp_path / "gpt2")]
        + ["--output", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and not (tmp_path / "out.json").exists()
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'gpt2' / 'config.json'}: model_type is 'gpt2', not one of the family "
        "('gptj', 'gpt_neox', 'gpt_neo')"
    ]
    random_hf_model("neox_parallel").config.to_json_file(tmp_path / "config.json")  # 4 heads
    with pytest.raises(ConfigError, match=r"^n_heads \(4\) must be divisible by cores_per_replica \(8\)$"):
        training_config_from_hf(str(tmp_path), tpu_size=8, cores_per_replica=8)
    written = training_config_from_hf(str(tmp_path), tpu_size=8, cores_per_replica=4)
    assert (written["n_vocab"], written["seq"], written["gradient_accumulation_steps"]) == (92, 2048, 16)
