"""LoRA fine-tuning (mesh_transformer/lora.py): adapters over a frozen base on any mesh, started from every
kind of checkpoint the project reads, saved without the base but with its identity, resumed bit-identically,
exported merged (transformers) and as a PEFT folder (peft), read back, sampled and served - GPT-J through the
command line, GPT-NeoX and GPT-Neo through transformers and peft."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, serve_one_greedy_request
from test_evaluation import write_tasks
from test_family import HF_VOCAB, hf_logits, our_config
from test_family import random_hf_model as random_family_model
from test_model import random_hf_model

from mesh_transformer import data, lora
from mesh_transformer.checkpoint import (
    METADATA_FILE,
    CheckpointError,
    CheckpointManager,
    load_params,
    save_params,
)
from mesh_transformer.config import ConfigError, from_dict
from mesh_transformer.hf import load_pretrained_params
from mesh_transformer.models import build, model_for
from mesh_transformer.sharding import make_mesh
from mesh_transformer.train import make_trainer

ROOT = Path(__file__).resolve().parent.parent
GPTJ_TARGETS = ["q", "k", "v", "out", "fc_in", "fc_out"]
CONFIG = dict(
    TINY_MODEL,
    tpu_size=8,
    cores_per_replica=2,
    per_replica_batch=1,
    warmup_steps=0,
    anneal_steps=10,
    lr=2e-2,
    end_lr=1e-3,
    total_steps=3,
    ckpt_every=1,
    keep_n=5,
    val_batches=0,
    compute_dtype="float32",
    remat="none",
    lora_rank=4,
    lora_alpha=8.0,
    lora_targets=GPTJ_TARGETS,
)


def lora_logits(config, base, adapters, tokens_BT) -> np.ndarray:
    """Our forward with the adapters as a side path (not merged)."""
    model = lora.transformed(model_for(config), lora.spec_for(config))
    return np.asarray(jax.jit(model.apply)(lora.join(adapters, base), None, jnp.asarray(tokens_BT)))


def saved_adapters(ckpt: str, config) -> dict:
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
        lora.abstract_adapters(model_for(config), lora.spec_for(config), config.seq),
    )
    return jax.tree_util.tree_map(np.asarray, jax.device_get(load_params(ckpt, target)))


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def piece_hashes(step_dir: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(step_dir.iterdir()) if f.suffix == ".safetensors"}


# ----- config -----


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lora_rank": -1}, "'lora_rank' must be >= 0"),
        ({"lora_rank": 4, "lora_alpha": 0}, "'lora_alpha' must be positive"),
        ({"lora_targets": ["q"]}, "'lora_targets' needs lora_rank > 0"),
        ({"lora_rank": 4, "lora_targets": ["q", "query_key_value"]}, "q, k, v, out, fc_in, fc_out"),
        ({"lora_rank": 4, "lora_targets": []}, "'lora_targets' must be distinct names"),
    ],
)
def test_bad_lora_keys_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({**TINY_MODEL, **changes})


def test_default_targets_are_the_architectures():
    assert from_dict({**TINY_MODEL, "lora_rank": 2}).lora_targets == ["q", "v"]
    neox = {k: v for k, v in TINY_MODEL.items() if k != "pe_rotary_dims"}
    assert from_dict({**neox, "architecture": "gpt_neox", "lora_rank": 2}).lora_targets == ["query_key_value"]


# ----- training, in one process -----


def test_lora_trains_adapters_only_on_any_mesh_from_every_kind_of_base(tmp_path):
    """From a Hugging Face folder, one of our checkpoints and an original checkpoint: the base (matmul weights
    in bfloat16) never changes, only adapters have optimizer state, adapters split like the weight they adapt,
    step 0 is the base model, and two meshes train the same adapters."""
    from test_hf import write_original_checkpoint

    hf = random_hf_model(n_head=8, vocab=96)
    hf.save_pretrained(tmp_path / "hf")
    values = dict(CONFIG, n_heads=8, n_vocab=96, compute_dtype="bfloat16", per_replica_batch=2, tpu_size=8)
    tokens_BT = np.random.default_rng(1).integers(0, 96, (2, 16))
    batches = [np.random.default_rng(s).integers(0, 96, (1, 4, 17)) for s in range(2)]
    results = {}
    for dp, mp in ((1, 1), (2, 4)):
        config = from_dict(dict(values, tpu_size=dp * mp, cores_per_replica=mp, per_replica_batch=4 // dp))
        trainer = make_trainer(config, make_mesh(dp, mp, jax.devices()[: dp * mp]))
        state = trainer.tuned_state(str(tmp_path / "hf"))
        adapters, base = lora.split(state.params)
        assert {v.dtype for m in base.values() for n, v in m.items() if n == "w"} == {jnp.dtype("bfloat16")}
        opt_shapes = sorted(a.shape for a in jax.tree_util.tree_leaves(state.opt_state) if a.ndim)
        assert opt_shapes == sorted(2 * [a.shape for a in jax.tree_util.tree_leaves(adapters)])
        for module, leaves in adapters.items():
            w_spec = tuple(base[module]["w"].sharding.spec) + (None,) * 3
            assert tuple(leaves["lora_a"].sharding.spec)[:2] == w_spec[:2], module
            assert tuple(leaves["lora_b"].sharding.spec)[2:] == w_spec[2:3], module
        if (dp, mp) == (1, 1):  # step 0 computes the base (bfloat16 matmuls, as the base model's forward)
            plain = build(model_for(config)).apply(jax.device_get(base), None, jnp.asarray(tokens_BT))
            np.testing.assert_array_equal(trainer.model.apply(state.params, None, tokens_BT), plain)
        base_before = jax.device_get(base)
        losses = []
        for batch in batches:
            state, metrics = trainer.step(state, trainer.global_batch(batch))
            losses.append(float(metrics["loss"]))
        adapters, base = lora.split(jax.device_get(state.params))
        jax.tree_util.tree_map(np.testing.assert_array_equal, base, base_before)
        assert np.abs(adapters["gptj/layers/block/fc_out"]["lora_b"]).max() > 0
        results[(dp, mp)] = losses, adapters, trainer.base_identity["base_sha256"]
    (l1, a1, sha1), (l2, a2, sha2) = results.values()
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    # bfloat16 matmuls sum in another order on each mesh; Adam's normalisation magnifies that where a
    # gradient is near zero (adapters are ~0.03-0.1; a mis-sharded adapter would be off by that much)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-3), a1, a2)

    # One of our checkpoints of the same weights is the same base (the identity is of the values), and an
    # original Mesh-Transformer-JAX checkpoint starts a LoRA run whose step 0 is its own model.
    save_params(str(tmp_path / "ours"), load_pretrained_params(str(tmp_path / "hf"), config))
    state = trainer.tuned_state(str(tmp_path / "ours"))
    assert trainer.base_identity["base_sha256"] == sha1 == sha2
    write_original_checkpoint(str(tmp_path / "orig"), hf, full=True)
    state = trainer.tuned_state(str(tmp_path / "orig"))
    assert trainer.base_identity["base_sha256"] != sha1
    # ... so resuming the Hugging Face run over the original checkpoint's weights is one clear error.
    extra = {"lora": {"base": str(tmp_path / "hf"), "base_sha256": sha1, "spec": trainer.spec.to_json()}}
    with pytest.raises(
        CheckpointError, match=r"trained on base .*/hf \(sha256 [0-9a-f]{16}\), but .*/orig holds"
    ):
        trainer.resumed(trainer.saved(state), extra, str(tmp_path / "orig"))
    original_base = load_pretrained_params(str(tmp_path / "orig"), config)
    np.testing.assert_array_equal(
        jax.device_get(lora.split(state.params)[1]["gptj/layers/block/fc_in"]["b"]),
        original_base["gptj/layers/block/fc_in"]["b"],
    )


# test_family's model of each architecture (GPT-NeoX's parallel residual and fused query_key_value,
# GPT-Neo's local and global layers and tied head), every LoRA target, and the (dp, mp) mesh it trains on
# (GPT-J's run is the command-line test below; one device for GPT-Neo, whose compile on a mesh would double
# its test's time)
ARCHITECTURES = {
    "gpt_neox": ("neox_parallel", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], (2, 2)),
    "gpt_neo": ("neo_local_global_tied", ["q", "k", "v", "out", "c_fc", "c_proj"], (1, 1)),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_lora_of_every_architecture_exports_to_transformers_and_peft_and_reads_back(tmp_path, architecture):
    """Every projection adapted (GPT-NeoX's fused query_key_value on a (2, 2) mesh, GPT-Neo's local layers
    and tied head): the merged export loads in transformers and the PEFT folder in peft over the base, both
    with our logits; the PEFT folder starts a LoRA run with exactly its adapters."""
    import peft
    from transformers import AutoModelForCausalLM

    case, targets, (dp, mp) = ARCHITECTURES[architecture]
    base_hf = random_family_model(case)
    base_hf.save_pretrained(tmp_path / "base")
    lora_keys = {k: v for k, v in CONFIG.items() if k in ("lora_rank", "lora_alpha")}
    mesh = dict(tpu_size=dp * mp, cores_per_replica=mp, per_replica_batch=2 // dp)
    config = our_config(case, **lora_keys, **mesh, seq=16, n_vocab=HF_VOCAB, lr=2e-2, lora_targets=targets)
    trainer = make_trainer(config, make_mesh(dp, mp, jax.devices()[: dp * mp]))
    state = trainer.tuned_state(str(tmp_path / "base"))
    rng = np.random.default_rng(0)
    for _ in range(2):
        state, _ = trainer.step(state, trainer.global_batch(rng.integers(0, HF_VOCAB, (1, 2, 17))))
    manager = CheckpointManager(str(tmp_path / "run"))
    manager.save(2, trainer.saved(state), trainer.checkpoint_extra())
    manager.wait()
    adapters, base = lora.split(jax.device_get(state.params))
    tokens_BT = rng.integers(0, HF_VOCAB, (2, 16))
    ours = lora_logits(config, base, adapters, tokens_BT)
    assert np.abs(ours - hf_logits(base_hf, tokens_BT)).max() > 1e-3  # the adapters matter

    lora.export_merged(str(tmp_path / "run"), config, str(tmp_path / "merged"))
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged_hf) is type(base_hf)
    np.testing.assert_allclose(hf_logits(merged_hf, tokens_BT), ours, atol=1e-4, rtol=0)

    lora.export_peft(str(tmp_path / "run"), config, str(tmp_path / "peft"))
    with_adapters = peft.PeftModel.from_pretrained(base_hf, tmp_path / "peft").eval()
    np.testing.assert_allclose(hf_logits(with_adapters, tokens_BT), ours, atol=1e-4, rtol=0)

    again = trainer.tuned_state(str(tmp_path / "peft"))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, jax.device_get(lora.split(again.params)[0]), adapters
    )


# ----- the user's path: the command line -----


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run of 3 steps from a transformers GPT-J folder, a checkpoint each step."""
    root = tmp_path_factory.mktemp("lora")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "lambda", "yield", "\n"]
    docs = [f"doc{i} " + " ".join(rng.choice(words, rng.integers(5, 80))) for i in range(200)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dataset = str(root / "dataset")
    data.prepare_dataset([str(root / "docs.jsonl")], dataset, train_tokenizer_vocab=300, seq=16)
    hf = random_hf_model(vocab=CONFIG["n_vocab"])
    hf.config.bos_token_id = hf.config.eos_token_id = 0
    hf.save_pretrained(root / "hf")
    (root / "lora.json").write_text(json.dumps(CONFIG))
    return root, dataset, hf


def train_command(root: Path, dataset: str, model_dir: Path, base: Path, steps: int) -> list[str]:
    return [
        "device_train.py",
        "--config",
        str(root / "lora.json"),
        "--data",
        dataset,
        "--model-dir",
        str(model_dir),
        "--tune-model-path",
        str(base),
        "--steps",
        str(steps),
        "--no-progress",
        "--sample-tokens",
        "0",
    ]


@pytest.mark.slow
def test_lora_run_resumes_exports_and_samples_through_the_command_line(lora_run):
    import peft
    from transformers import GPTJForCausalLM

    root, dataset, base_hf = lora_run
    config = from_dict(CONFIG)
    run_a = root / "a"
    cli(*train_command(root, dataset, run_a, root / "hf", 3))

    # Checkpoints hold adapters and their Adam moments only, and what identifies the base.
    meta = json.loads((run_a / "step_3" / METADATA_FILE).read_text())
    arrays = [leaf["path"] for leaf in meta["leaves"] if leaf["shape"]]  # besides step and Adam's counts
    assert all("lora_" in p for p in arrays) and len(arrays) == 3 * 2 * len(GPTJ_TARGETS), arrays
    assert meta["extra"]["lora"]["base"] == str(root / "hf")
    assert meta["extra"]["lora"]["spec"] == {"rank": 4, "alpha": 8.0, "targets": GPTJ_TARGETS}
    base = load_pretrained_params(str(root / "hf"), config)
    assert meta["extra"]["lora"]["base_sha256"] == lora.params_sha256(base)

    # Resume from step 1 ends bit-identical to the run that never stopped.
    run_b = root / "b"
    run_b.mkdir()
    shutil.copytree(run_a / "step_1", run_b / "step_1")
    cli(*train_command(root, dataset, run_b, root / "hf", 3))
    for step in (2, 3):
        assert piece_hashes(run_b / f"step_{step}") == piece_hashes(run_a / f"step_{step}"), step

    # Exports: merged weights for transformers, a PEFT folder for peft over the base, both our logits.
    adapters = saved_adapters(str(run_a / "step_3"), config)
    tokens_BT = np.random.default_rng(3).integers(0, CONFIG["n_vocab"], (2, 16))
    ours = lora_logits(config, base, adapters, tokens_BT)
    assert np.abs(ours - hf_logits(base_hf, tokens_BT)).max() > 1e-3
    config_file = str(root / "lora.json")
    cli(
        "to_hf_weights.py",
        "--config",
        config_file,
        "--ckpt",
        str(run_a),
        "--output-path",
        str(root / "merged"),
    )
    merged = GPTJForCausalLM.from_pretrained(root / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, tokens_BT), ours, atol=1e-4, rtol=0)
    peft_dir = root / "peft"
    cli(
        "to_hf_weights.py",
        "--config",
        config_file,
        "--ckpt",
        str(run_a),
        "--output-path",
        str(peft_dir),
        "--peft",
    )
    with_adapters = peft.PeftModel.from_pretrained(GPTJForCausalLM.from_pretrained(root / "hf"), peft_dir)
    np.testing.assert_allclose(hf_logits(with_adapters.eval(), tokens_BT), ours, atol=1e-4, rtol=0)

    # The PEFT folder reads back: a LoRA run starts from exactly its adapters, sampling merges them the same.
    # (the NeoX test starts a run from a PEFT folder; here the same reader, `lora.load_base`)
    read_base, base_path, started = lora.load_base(str(peft_dir), config)
    assert base_path == str(root / "hf") and lora.params_sha256(read_base) == lora.params_sha256(base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, started, adapters)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        lora.load_merged(str(peft_dir), config),
        lora.load_merged(str(run_a / "step_3"), config),
    )

    # slim_checkpoint.py keeps the adapters (bfloat16) and the base's identity; `device_sample.py --serve`
    # serves the slim LoRA checkpoint with its adapters merged: one OpenAI-client request gets the greedy text
    # of transformers on the merged model. (--serve and --prompt load a checkpoint the same way,
    # engine.load_generator; one slot: the fewest programs for the server to compile before it serves.)
    slim = root / "slim"
    cli("slim_checkpoint.py", str(run_a / "step_3"), str(slim))
    assert json.loads((slim / METADATA_FILE).read_text())["extra"]["lora"] == meta["extra"]["lora"]
    slim_merged = lora.load_merged(str(slim), config)
    # what reads any starting point (eval_harness.py, --tune-model-path) reads a LoRA checkpoint merged
    read = load_pretrained_params(str(slim), config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, read, slim_merged)
    tokenizer = data.load_tokenizer(dataset)
    prompt_ids = tokenizer.encode("alpha beta gamma").ids
    serve = [str(ROOT / "device_sample.py"), "--config", config_file, "--ckpt", str(slim)]
    served = serve_one_greedy_request(
        [sys.executable, *serve, "--tokenizer", dataset, "--max-batch", "1"], config.name, prompt_ids, 8
    )
    slim_hf = GPTJForCausalLM.from_pretrained(root / "merged").eval()
    from mesh_transformer.hf import hf_tensors

    state = {
        name: torch.from_numpy(np.ascontiguousarray(v))
        for name, v in hf_tensors(slim_merged, model_for(config))
    }
    slim_hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        greedy = slim_hf.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    assert served == tokenizer.decode(greedy)

    # eval_harness.py scores the LoRA run (its model_dir: the newest checkpoint, adapters merged) as it scores
    # the run's merged export (the transformers folder checked above): a local multiple-choice task and a
    # perplexity task of lm-evaluation-harness, whose word perplexity moves with any change of the weights.
    write_tasks(root / "tasks")
    tasks = ["--include-path", str(root / "tasks"), "--tasks", "tiny_choice,tiny_perplexity"]
    results = {}
    for name, ckpt in (("lora", run_a), ("merged", root / "merged")):
        output = root / f"eval_{name}.json"
        evaluate = ["--config", config_file, "--ckpt", str(ckpt), "--tokenizer", dataset, *tasks]
        cli("scripts/eval_harness.py", *evaluate, "--output", str(output))
        results[name] = json.loads(output.read_text())["results"]
    assert results["lora"]["tiny_choice"] == results["merged"]["tiny_choice"]
    perplexity = [results[name]["tiny_perplexity"]["word_perplexity,none"] for name in ("lora", "merged")]
    assert perplexity[0] == pytest.approx(perplexity[1], rel=1e-6)
