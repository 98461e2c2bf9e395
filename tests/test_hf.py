"""Hugging Face interop: HF GPT-J -> our params -> checkpoint -> HF folder keeps the logits; a model trained
on a (2, 4) mesh exports and generates the same greedy tokens in `transformers`; original Mesh-Transformer-JAX
checkpoints import; bad folders and checkpoints give one clear error."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from test_checkpoint_gcs import BUCKET, emulator  # noqa: F401 - the gs:// emulator fixture
from test_model import random_hf_model
from transformers import AutoTokenizer, GPTJForCausalLM

from mesh_transformer import original
from mesh_transformer.checkpoint import CheckpointManager, save_params
from mesh_transformer.config import from_dict
from mesh_transformer.engine import generate
from mesh_transformer.errors import UserError
from mesh_transformer.hf import (
    PADDED_VOCAB_BIAS,
    InteropError,
    expected_shapes,
    export_checkpoint,
    load_hf_params,
    load_pretrained_params,
)
from mesh_transformer.models import build, model_for
from mesh_transformer.sharding import make_mesh
from mesh_transformer.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    values = dict(
        layers=2,
        d_model=64,
        n_heads=4,
        n_vocab=96,
        seq=32,
        pe_rotary_dims=8,
        compute_dtype="float32",
        remat="none",
    )
    return from_dict({**values, **overrides})


def our_logits(config, params, tokens_BT) -> np.ndarray:
    model = build(model_for(config))
    return np.asarray(jax.jit(model.apply)(jax.device_get(params), None, jnp.asarray(tokens_BT)))


def hf_logits(hf: GPTJForCausalLM, tokens_BT) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens_BT)).long()).logits.float().numpy()


def hf_state(hf: GPTJForCausalLM) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}


@pytest.mark.parametrize(
    "n_embd,n_head,rotary_dim,hf_vocab,n_vocab",
    [
        (64, 4, 8, 96, 96),  # rotary on half the head
        (96, 3, 32, 96, 96),  # rotary on the whole head
        (64, 4, 16, 90, 96),  # vocabulary padded from 90 to 96 rows
    ],
)
def test_hf_import_export_roundtrip_keeps_logits(
    tmp_path, capsys, n_embd, n_head, rotary_dim, hf_vocab, n_vocab
):
    hf = random_hf_model(n_embd=n_embd, n_head=n_head, rotary_dim=rotary_dim, vocab=hf_vocab)
    hf.save_pretrained(tmp_path / "hf")
    config = tiny_config(d_model=n_embd, n_heads=n_head, pe_rotary_dims=rotary_dim, n_vocab=n_vocab)
    tokens_BT = np.random.default_rng(0).integers(0, hf_vocab, (2, 20))
    expected = hf_logits(hf, tokens_BT)

    params = load_pretrained_params(str(tmp_path / "hf"), config)
    ours = our_logits(config, params, tokens_BT)
    assert ours.shape == (2, 20, n_vocab)
    np.testing.assert_allclose(ours[..., :hf_vocab], expected, atol=1e-4, rtol=0)
    if hf_vocab < n_vocab:
        assert (
            f"padding the vocabulary from {hf_vocab} to the config's n_vocab {n_vocab}"
            in capsys.readouterr().out
        )
        np.testing.assert_array_equal(ours[..., hf_vocab:], PADDED_VOCAB_BIAS)

    save_params(str(tmp_path / "ckpt"), params)
    result = export_checkpoint(str(tmp_path / "ckpt"), config, str(tmp_path / "out"))
    assert result.weight_files == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    exported = GPTJForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.vocab_size == n_vocab and exported.config.rotary_dim == rotary_dim
    again = hf_logits(exported, tokens_BT)
    np.testing.assert_allclose(again[..., :hf_vocab], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(again, ours, atol=1e-4, rtol=0)


def test_import_reads_sharded_safetensors_bfloat16_and_pytorch_bin(tmp_path):
    """Each format imports to the logits transformers computes from the same folder's weights."""
    hf = random_hf_model()
    config = tiny_config()
    tokens_BT = np.random.default_rng(2).integers(0, 96, (2, 16))
    expected = hf_logits(hf, tokens_BT)

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    os.replace(tmp_path / "pytorch_model.bin", tmp_path / "bin" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    for folder in ("sharded", "bin"):
        got = load_hf_params(str(tmp_path / folder), config)
        np.testing.assert_allclose(
            our_logits(config, got, tokens_BT), expected, atol=1e-4, rtol=0, err_msg=folder
        )

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    rounded = hf_logits(GPTJForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32), tokens_BT)
    got = load_hf_params(str(tmp_path / "bf16"), config)
    np.testing.assert_allclose(our_logits(config, got, tokens_BT), rounded, atol=1e-4, rtol=0)
    assert np.abs(rounded - expected).max() > 1e-3  # bf16 weights are a different model: the check sees it


def test_import_places_leaves_on_a_mesh(tmp_path):
    hf = random_hf_model(vocab=96)
    hf.save_pretrained(tmp_path / "hf")
    config = tiny_config(tpu_size=8, cores_per_replica=4)
    trainer = Trainer(config, make_mesh(2, 4))
    params = load_pretrained_params(str(tmp_path / "hf"), config, trainer.abstract_state.params)
    q = params["gptj/layers/block/q_proj"]["w"]
    assert q.sharding == trainer.abstract_state.params["gptj/layers/block/q_proj"]["w"].sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 64, 16)
    tokens_BT = np.random.default_rng(1).integers(0, 96, (1, 12))
    np.testing.assert_allclose(
        our_logits(config, params, tokens_BT), hf_logits(hf, tokens_BT), atol=1e-4, rtol=0
    )


def write_word_tokenizer(path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return tokenizer


def test_model_trained_on_a_mesh_exports_and_generates_the_same_greedy_tokens(tmp_path):
    config = tiny_config(
        n_vocab=128, tpu_size=8, cores_per_replica=4, lr=3e-3, warmup_steps=0, total_steps=10
    )
    trainer = Trainer(config, make_mesh(2, 4))
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = rng.integers(0, 100, (1, config.global_batch, config.seq + 1))
        state, _ = trainer.step(state, trainer.global_batch(batch))
    model_dir = tmp_path / "run"
    manager = CheckpointManager(str(model_dir))
    manager.save(3, state, {})
    manager.wait()
    (model_dir / "dataset").mkdir()
    words = [f"w{i}" for i in range(100)]
    tokenizer = write_word_tokenizer(model_dir / "dataset" / "tokenizer.json", words)

    # The model_dir resolves to its newest step; the run's tokenizer comes along; several weight files.
    result = export_checkpoint(str(model_dir), config, str(tmp_path / "hf"), max_shard_bytes=60_000)
    assert len(result.weight_files) > 1 and result.tokenizer.endswith("tokenizer.json")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(result.weight_files)
    exported = GPTJForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.eos_token_id == 0

    params = jax.device_get(state.params)
    tokens_BT = rng.integers(0, 128, (2, config.seq))
    np.testing.assert_allclose(
        hf_logits(exported, tokens_BT), our_logits(config, params, tokens_BT), atol=1e-4
    )

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "w3 w14 w15 w92 w65"
    prompt = hf_tokenizer(text)["input_ids"]
    assert prompt == tokenizer.encode(text).ids
    ours = generate(model_for(config), params, prompt, 12, seq=config.seq, vocab_size=128, temperature=0.0)
    with torch.no_grad():
        theirs = exported.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == theirs

    bf16 = export_checkpoint(str(model_dir), config, str(tmp_path / "bf16"), dtype="bfloat16")
    assert bf16.weight_bytes < result.weight_bytes * 0.6
    half = GPTJForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    diff = np.abs(hf_logits(half, tokens_BT) - our_logits(config, params, tokens_BT)).max()
    assert 0 < diff < 0.1


def test_export_reads_a_gcs_model_dir_and_its_tokenizer(tmp_path, emulator):  # noqa: F811
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    config = tiny_config(tpu_size=8, cores_per_replica=4)
    trainer = Trainer(config, make_mesh(2, 4))
    params = trainer.init_state(1).params
    model_dir = f"gs://{BUCKET}/runs/hf"
    save_params(f"{model_dir}/step_5", params)
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer.json", ["alpha", "beta"])
    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)
    bucket.blob("runs/hf/dataset/tokenizer.json").upload_from_filename(tmp_path / "tokenizer.json")

    result = export_checkpoint(f"{model_dir}/step_5", config, str(tmp_path / "hf"))
    assert result.tokenizer == f"{model_dir}/dataset/tokenizer.json"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("beta alpha")["input_ids"] == [2, 1]
    assert tokenizer.encode("beta alpha").ids == [2, 1]
    exported = GPTJForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens_BT = np.random.default_rng(5).integers(0, 96, (1, 10))
    np.testing.assert_allclose(
        hf_logits(exported, tokens_BT), our_logits(config, params, tokens_BT), atol=1e-4
    )


# ----- the original Mesh-Transformer-JAX layout, written out here from a transformers GPT-J -----

# The original's Haiku module names (REFERENCE section 5), spelled out rather than taken from our reader.
ORIGINAL_EMBEDDING = "causal_transformer_shard/~/embedding_shard/~/linear"
ORIGINAL_HEAD = "causal_transformer_shard/~/projection_shard/~/linear"
ORIGINAL_FINAL_NORM = "causal_transformer_shard/~/projection_shard/~/replicated_layer_norm"


def original_layer(k: int, module: str) -> str:
    return f"causal_transformer_shard/~/layer_{k}/~/{module}"


def split_list(leaves: list, n: int) -> list[list]:
    """The original's split of a shard's flat leaf list into n contiguous, near-equal chunks."""
    k, m = divmod(len(leaves), n)
    return [leaves[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)] for i in range(n)]


def write_original_checkpoint(model_dir, hf, *, shards=8, full=True, bf16=False, step=7, seed=42) -> dict:
    """Save the weights of the transformers GPT-J `hf` as the original trainer did: each of `shards`
    model-parallel shards holds its slice of every Haiku linear (x @ w + b, w as [in, out], i.e. the torch
    weight transposed), the state {"opt_state", "params", "step"} flattened in sorted-key order, split into 16
    npz chunks per shard; bf16 leaves go to numpy as raw 2-byte values (dtype V2).

    Returns the HF state dict the checkpoint stands for, which differs from `hf`'s only by what the original
    format itself does: bf16 rounding, per-shard embedding biases added to every embedding row, fc_out biases
    summed over shards."""
    rng = np.random.default_rng(seed)
    torch_state = hf_state(hf)
    cfg = hf.config
    stored = (lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)) if bf16 else (lambda x: x)
    params = [dict() for _ in range(shards)]  # per shard: module -> param -> value (as stored)

    def put(module, param, values):
        for s in range(shards):
            params[s].setdefault(module, {})[param] = stored(np.asarray(values[s], np.float32))

    def columns(weight):  # output dim split: x @ w[:, slice]
        return np.split(weight.T, shards, axis=1)

    def rows(weight):  # input dim split: partial sums over shards
        return np.split(weight.T, shards, axis=0)

    def parts(total):  # per-shard biases of a row-split linear, adding up to about `total`
        noise = [rng.normal(scale=0.1, size=total.shape) for _ in range(shards - 1)]
        return [*noise, total - np.sum(noise, axis=0)]

    def replicated(value):  # every shard keeps a copy; the reader must take shard 0's
        return [value] + [value + 1.0 for _ in range(shards - 1)]

    embedding_bias = parts(np.full(cfg.n_embd, 0.25))
    put(ORIGINAL_EMBEDDING, "b", embedding_bias)
    wte = torch_state["transformer.wte.weight"]  # [vocab, d]: one-hot(token) @ w, vocab split over shards
    put(ORIGINAL_EMBEDDING, "w", np.split(wte - np.sum(embedding_bias, axis=0), shards, axis=0))
    put(ORIGINAL_HEAD, "w", columns(torch_state["lm_head.weight"]))
    put(ORIGINAL_HEAD, "b", np.split(torch_state["lm_head.bias"], shards))
    put(ORIGINAL_FINAL_NORM, "scale", replicated(torch_state["transformer.ln_f.weight"]))
    put(ORIGINAL_FINAL_NORM, "offset", replicated(torch_state["transformer.ln_f.bias"]))
    for k in range(cfg.n_layer):
        hf_layer = lambda name, k=k: torch_state[f"transformer.h.{k}.{name}"]  # noqa: E731
        # linears in the order the original created them: q, v, k, out, fc_in, fc_out
        put(original_layer(k, "linear"), "w", columns(hf_layer("attn.q_proj.weight")))
        put(original_layer(k, "linear_1"), "w", columns(hf_layer("attn.v_proj.weight")))
        put(original_layer(k, "linear_2"), "w", columns(hf_layer("attn.k_proj.weight")))
        put(original_layer(k, "linear_3"), "w", rows(hf_layer("attn.out_proj.weight")))
        put(original_layer(k, "linear_4"), "w", columns(hf_layer("mlp.fc_in.weight")))
        put(original_layer(k, "linear_4"), "b", np.split(hf_layer("mlp.fc_in.bias"), shards))
        put(original_layer(k, "linear_5"), "w", rows(hf_layer("mlp.fc_out.weight")))
        put(original_layer(k, "linear_5"), "b", parts(hf_layer("mlp.fc_out.bias")))
        put(original_layer(k, "replicated_layer_norm"), "scale", replicated(hf_layer("ln_1.weight")))
        put(original_layer(k, "replicated_layer_norm"), "offset", replicated(hf_layer("ln_1.bias")))

    step_dir = os.path.join(model_dir, f"step_{step}")
    for s in range(shards):
        as_saved = jax.tree_util.tree_map(
            lambda x: x.astype(ml_dtypes.bfloat16).view("V2") if bf16 else x, params[s]
        )
        state = {"params": as_saved, "step": np.int32(step)}
        if full:  # Adam's state: a count and two moment trees shaped like the params
            moments = [jax.tree_util.tree_map(lambda x, c=c: np.full_like(x, c), as_saved) for c in (0, 1)]
            state["opt_state"] = ({"count": np.int32(step)}, {"mu": moments[0], "nu": moments[1]})
        leaves = jax.tree_util.tree_leaves(state)  # sorted keys: opt_state, params (modules, names), step
        os.makedirs(os.path.join(step_dir, f"shard_{s}"))
        for c, chunk in enumerate(split_list(leaves, 16)):
            np.savez(os.path.join(step_dir, f"shard_{s}", f"{c}.npz"), *chunk)
    with open(os.path.join(model_dir, "meta.json"), "w") as f:
        json.dump({"step": step, "checkpoints": [step], "aux": {str(step): {}}}, f)

    # What the original computed with those pieces, in HF names (torch weights are [out, in]).
    def whole(module, param, how):
        values = [params[s][module][param] for s in range(shards)]
        if how == "sum":
            return np.sum(values, axis=0)
        if how == "first":
            return values[0]
        if how == "split":  # a bias split like its linear's outputs
            return np.concatenate(values)
        return np.concatenate(values, axis=1 if how == "out" else 0).T

    effective = {
        "transformer.wte.weight": np.concatenate([params[s][ORIGINAL_EMBEDDING]["w"] for s in range(shards)])
        + whole(ORIGINAL_EMBEDDING, "b", "sum"),
        "lm_head.weight": whole(ORIGINAL_HEAD, "w", "out"),
        "lm_head.bias": whole(ORIGINAL_HEAD, "b", "split"),
        "transformer.ln_f.weight": whole(ORIGINAL_FINAL_NORM, "scale", "first"),
        "transformer.ln_f.bias": whole(ORIGINAL_FINAL_NORM, "offset", "first"),
    }
    for k in range(cfg.n_layer):
        for name, (module, param, how) in {
            "attn.q_proj.weight": ("linear", "w", "out"),
            "attn.v_proj.weight": ("linear_1", "w", "out"),
            "attn.k_proj.weight": ("linear_2", "w", "out"),
            "attn.out_proj.weight": ("linear_3", "w", "in"),
            "mlp.fc_in.weight": ("linear_4", "w", "out"),
            "mlp.fc_in.bias": ("linear_4", "b", "split"),
            "mlp.fc_out.weight": ("linear_5", "w", "in"),
            "mlp.fc_out.bias": ("linear_5", "b", "sum"),
            "ln_1.weight": ("replicated_layer_norm", "scale", "first"),
            "ln_1.bias": ("replicated_layer_norm", "offset", "first"),
        }.items():
            effective[f"transformer.h.{k}.{name}"] = whole(original_layer(k, module), param, how)
    return effective


def hf_with(state: dict[str, np.ndarray], like: GPTJForCausalLM) -> GPTJForCausalLM:
    """A transformers GPT-J of `like`'s config holding the float32 tensors `state`."""
    model = GPTJForCausalLM(like.config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}, strict=False
    )
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), missing
    return model


def random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return {
        module: {name: rng.normal(scale=0.2, size=shape).astype(np.float32) for name, shape in leaves.items()}
        for module, leaves in expected_shapes(config).items()
    }


def test_original_full_checkpoint_imports_with_the_logits_of_transformers(tmp_path):
    hf = random_hf_model(n_head=8, vocab=96)
    config = tiny_config(n_heads=8, n_vocab=96)
    effective = write_original_checkpoint(str(tmp_path / "orig"), hf, full=True)
    assert original.is_original_checkpoint(str(tmp_path / "orig"))
    got = load_pretrained_params(str(tmp_path / "orig"), config)
    tokens_BT = np.random.default_rng(3).integers(0, 96, (2, 16))
    expected = hf_logits(hf_with(effective, hf), tokens_BT)
    np.testing.assert_allclose(our_logits(config, got, tokens_BT), expected, atol=1e-4, rtol=0)
    # the format's own changes are small: the same model as `hf` to float32 rounding
    np.testing.assert_allclose(expected, hf_logits(hf, tokens_BT), atol=1e-4, rtol=0)


def test_original_slim_bfloat16_step_dir_imports_and_pads_vocab(tmp_path, capsys):
    hf = random_hf_model(n_head=8, vocab=96, seed=1)
    effective = write_original_checkpoint(str(tmp_path / "orig"), hf, full=False, bf16=True, step=5)
    config = tiny_config(n_heads=8, n_vocab=104)
    got = load_pretrained_params(str(tmp_path / "orig" / "step_5"), config)
    assert "padding the vocabulary from 96 to the config's n_vocab 104" in capsys.readouterr().out
    assert got["gptj"]["embeddings"].shape == (104, 64) and got["gptj/lm_head"]["b"].shape == (104,)
    tokens_BT = np.random.default_rng(4).integers(0, 96, (2, 16))
    ours = our_logits(config, got, tokens_BT)
    expected = hf_logits(hf_with(effective, hf), tokens_BT)
    np.testing.assert_allclose(ours[..., :96], expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ours[..., 96:], PADDED_VOCAB_BIAS)  # padded ids are never likely
    # the bf16 rounding did change the model: the comparison above would see a wrong rounding
    assert np.abs(expected - hf_logits(hf, tokens_BT)).max() > 1e-3


# ----- errors -----


@pytest.mark.parametrize(
    "field,override,message",
    [
        ("d_model", dict(d_model=96, n_heads=4), "n_embd is 64 but the config's d_model is 96"),
        ("layers", dict(layers=3), "n_layer is 2 but the config's layers is 3"),
        ("n_heads", dict(n_heads=8), "n_head is 4 but the config's n_heads is 8"),
        ("rotary", dict(pe_rotary_dims=16), "rotary_dim is 8 but the config's pe_rotary_dims is 16"),
        ("vocab", dict(n_vocab=64), "vocabulary of 96 rows but the config's n_vocab is 64"),
    ],
)
def test_mismatched_hf_folder_names_the_field(tmp_path, field, override, message):
    random_hf_model(vocab=96).save_pretrained(tmp_path / "hf")
    with pytest.raises(InteropError, match=message):
        load_pretrained_params(str(tmp_path / "hf"), tiny_config(**override))


def test_bad_folders_and_checkpoints_give_one_clear_error(tmp_path):
    config = tiny_config()
    assert issubclass(InteropError, UserError)
    with pytest.raises(UserError, match="no checkpoint found"):
        load_pretrained_params(str(tmp_path / "nothing"), config)

    hf = random_hf_model(vocab=96)
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(InteropError, match="not a readable safetensors file"):
        load_hf_params(str(tmp_path / "hf"), config)
    os.remove(weights)
    with pytest.raises(InteropError, match="holds no weights"):
        load_hf_params(str(tmp_path / "hf"), config)

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InteropError, match="model_type is 'llama', expected 'gptj'"):
        load_hf_params(str(tmp_path / "llama"), config)

    write_original_checkpoint(str(tmp_path / "orig"), random_hf_model(n_head=8, vocab=96), full=False)
    with pytest.raises(InteropError, match="has shape .* but the config"):
        load_pretrained_params(str(tmp_path / "orig"), tiny_config(d_model=128, n_heads=8))
    os.remove(tmp_path / "orig" / "step_7" / "shard_3" / "15.npz")
    with pytest.raises(InteropError, match="shards hold different numbers of leaves"):
        load_pretrained_params(str(tmp_path / "orig"), config)


def test_export_refuses_a_non_empty_output_and_a_mismatched_config(tmp_path):
    config = tiny_config()
    save_params(str(tmp_path / "ckpt"), random_params(config))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    with pytest.raises(InteropError, match="already exists and is not empty"):
        export_checkpoint(str(tmp_path / "ckpt"), config, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    with pytest.raises(InteropError, match=r"has shape \(96, 64\) but the config .* expects \(128, 64\)"):
        export_checkpoint(str(tmp_path / "ckpt"), config.replace(n_vocab=128), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    export_checkpoint(str(tmp_path / "ckpt"), config, str(tmp_path / "empty"))
    assert "model.safetensors" in os.listdir(tmp_path / "empty")


def test_export_script_prints_one_line_and_exits_non_zero_on_bad_input(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config().to_dict()))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    missing = subprocess.run(
        [sys.executable, "to_hf_weights.py", "--config", str(config_path), "--ckpt", str(tmp_path / "none")]
        + ["--output-path", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no checkpoint found" in lines[0]
    assert not os.path.exists(tmp_path / "out")
