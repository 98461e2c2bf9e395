"""GPT-NeoX (Pythia) and GPT-Neo against Hugging Face `transformers`, with odd shapes: head_dim 24 (not a
power of two), rotary on a fraction of the head, a vocabulary of 90 that does not divide by mp (padded to 92),
NeoX with parallel residual on and off, GPT-Neo with local and global layers and a window shorter than the
sequence.

Each case's Hugging Face folder imports on a (2, 4) mesh with transformers' logits to 1e-4; params on that
mesh export to a folder that `AutoModelForCausalLM` loads as the right class with our logits to 1e-4, and
re-import to the very same params; old checkpoints' buffers and the old rotary key are read; the KV-cache
decode equals the full forward pass. Negative controls show each check tells the right layout from a wrong
one. GPT-J keeps its own tests (test_model.py, test_hf.py), plus here: a checkpoint saved by main's code
before the family restores and trains on bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoXConfig

from mesh_transformer import sharding
from mesh_transformer.checkpoint import CheckpointManager, save_params
from mesh_transformer.config import ConfigError, from_dict, load_config
from mesh_transformer.hf import export_checkpoint, load_pretrained_params
from mesh_transformer.models import KVCache, build, gpt_neo, gpt_neox, model_for, param_count
from mesh_transformer.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
HF_VOCAB, N_VOCAB = 90, 92  # 90 rows in the HF model, padded to a multiple of mp = 4 in ours
SEQ = 20
MESH = dict(tpu_size=8, cores_per_replica=4)

# Our config of each case (written out, not derived from the HF config under test) and the HF config.
CASES = {
    "neox_parallel": (
        dict(architecture="gpt_neox", layers=2, d_model=96, n_heads=4, d_ff=100, rotary_pct=0.25),
        lambda: GPTNeoXConfig(
            hidden_size=96, num_attention_heads=4, num_hidden_layers=2, intermediate_size=100, rotary_pct=0.25
        ),
    ),
    "neox_sequential_tied": (
        dict(
            architecture="gpt_neox",
            layers=2,
            d_model=96,
            n_heads=4,
            d_ff=128,
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            attention_bias=False,
            activation="gelu_fast",
            layer_norm_eps=1e-6,
        ),
        lambda: GPTNeoXConfig(
            hidden_size=96,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=128,
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            attention_bias=False,
            hidden_act="gelu_fast",
            layer_norm_eps=1e-6,
        ),
    ),
    "neo_local_global_tied": (
        dict(
            architecture="gpt_neo",
            layers=3,
            d_model=96,
            n_heads=4,
            window_size=5,
            n_positions=32,
            attention_layers=["local", "global", "local"],
        ),
        lambda: GPTNeoConfig(
            hidden_size=96,
            num_heads=4,
            num_layers=3,
            window_size=5,
            max_position_embeddings=32,
            attention_types=[[["local", "global"], 1], [["local"], 1]],
        ),
    ),
    "neo_untied": (
        dict(
            architecture="gpt_neo",
            layers=2,
            d_model=96,
            n_heads=4,
            d_ff=100,
            window_size=3,
            n_positions=24,
            tie_word_embeddings=False,
            activation="relu",
        ),
        lambda: GPTNeoConfig(
            hidden_size=96,
            num_heads=4,
            num_layers=2,
            intermediate_size=100,
            window_size=3,
            max_position_embeddings=24,
            attention_types=[[["global", "local"], 1]],
            tie_word_embeddings=False,
            activation_function="relu",
        ),
    ),
}


def our_config(case: str, **changes):
    values = dict(
        CASES[case][0],
        n_vocab=N_VOCAB,
        seq=SEQ,
        compute_dtype="float32",
        remat="none",
        **MESH,
        lr=3e-3,
        warmup_steps=0,
        total_steps=10,
    )
    return from_dict({**values, **changes})


def random_hf_model(case: str, seed: int = 0):
    """A transformers model of the case, every tensor random (biases and norms too, so that a swapped or
    ignored tensor shows), q and k large enough that attention and positions matter."""
    torch.manual_seed(seed)
    config = CASES[case][1]()
    config.vocab_size = HF_VOCAB
    for key in ("attention_dropout", "hidden_dropout", "resid_dropout", "embed_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = any(s in name for s in ("query_key_value.weight", "q_proj", "k_proj"))
            norm = name.endswith(("layernorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.randn_like(p) * (0.3 if big else 0.1) + (1.0 if norm else 0.0))
    return model


def hf_logits(model, tokens_BT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens_BT)).long()).logits.float().numpy()


@functools.cache
def sharded_forward(trainer: Trainer):
    return jax.jit(lambda p, t: trainer.model.apply(p, None, t))  # compiled once per case's trainer


def sharded_logits(trainer: Trainer, params, tokens_BT) -> np.ndarray:
    with sharding.activation_sharding(trainer.mesh):
        return np.asarray(sharded_forward(trainer)(params, jnp.asarray(tokens_BT)))


TOKENS = np.random.default_rng(0).integers(0, HF_VOCAB, (2, SEQ))


def random_params(trainer: Trainer, seed: int = 1):
    """Random params on the trainer's mesh, every leaf random (not the init's zero biases and unit norms)."""
    rng = np.random.default_rng(seed)
    host = jax.tree_util.tree_map(
        lambda p: rng.normal(scale=0.2, size=p.shape).astype(np.float32), trainer.abstract_state.params
    )
    return jax.device_put(host, trainer.state_shardings.params)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def trainer(case):
    """The case's trainer on a (2, 4) mesh (compiled once per case)."""
    return Trainer(our_config(case), sharding.make_mesh(2, 4))


def test_hf_folder_imports_on_a_2x4_mesh_with_the_logits_of_transformers(tmp_path, case, trainer, capsys):
    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    params = load_pretrained_params(str(tmp_path / "hf"), trainer.config, trainer.abstract_state.params)
    assert "padding the vocabulary from 90 to the config's n_vocab 92" in capsys.readouterr().out
    leaf = next(iter(jax.tree_util.tree_leaves(params)))
    assert leaf.sharding.mesh.shape == {"dp": 2, "mp": 4}
    ours = sharded_logits(trainer, params, TOKENS)
    assert ours.shape == (2, SEQ, N_VOCAB)
    np.testing.assert_allclose(ours[..., :HF_VOCAB], hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_params_on_a_2x4_mesh_export_a_folder_transformers_loads_as_its_class_and_import_back_exactly(
    tmp_path, case, trainer
):
    """(Training a few steps on that mesh, exporting and sampling through the command line, against
    transformers' greedy tokens, is test_family_cli.py's.)"""
    params = random_params(trainer)
    save_params(str(tmp_path / "run" / "step_3"), params)
    export_checkpoint(str(tmp_path / "run"), trainer.config, str(tmp_path / "hf"))

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == model_for(trainer.config).hf_class
    ours = sharded_logits(trainer, params, TOKENS)
    np.testing.assert_allclose(hf_logits(exported, TOKENS), ours, atol=1e-4, rtol=0)

    back = load_pretrained_params(str(tmp_path / "hf"), trainer.config)  # the round trip is exact
    trained = jax.device_get(params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(trained)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(trained), jax.tree_util.tree_leaves(back), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("case", ["neox_parallel", "neo_local_global_tied"])
def test_cached_decoding_equals_the_full_forward_pass(case):
    """Two rows prefilled at different (right-padded) lengths, then decoded a token at a time past the local
    window: each step's logits are those of a full forward pass over the row alone."""
    model = model_for(our_config(case))
    params = build(model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    apply = jax.jit(build(model).apply)
    tokens = np.random.default_rng(2).integers(0, N_VOCAB, (2, 16))
    length = np.array([8, 3])
    prompt = np.where(np.arange(8) < length[:, None], tokens[:, :8], 0)
    decode_params = model.decode_layout(params)
    logits, cache = apply(decode_params, None, jnp.asarray(prompt), KVCache.empty(model, 2, SEQ))
    cache = cache._replace(length_B=jnp.asarray(length, jnp.int32))
    expected = [np.asarray(apply(params, None, jnp.asarray(tokens[b : b + 1])))[0] for b in range(2)]
    for b in range(2):
        np.testing.assert_allclose(logits[b, : length[b]], expected[b][: length[b]], atol=1e-4, rtol=0)
    for step in range(8):
        next_B = jnp.asarray(tokens[np.arange(2), length + step][:, None])
        logits, cache = apply(decode_params, None, next_B, cache)
        for b in range(2):
            np.testing.assert_allclose(logits[b, 0], expected[b][length[b] + step], atol=1e-4, rtol=0)


# ----- negative controls: the checks above tell the right layout from a wrong one -----


def imported_logits(case: str, hf, folder) -> np.ndarray:
    config = our_config(case, tpu_size=1, cores_per_replica=1)
    params = load_pretrained_params(str(folder), config)
    return np.asarray(build(model_for(config)).apply(params, None, jnp.asarray(TOKENS)))[..., :HF_VOCAB]


def test_neox_controls_interleaved_rotary_and_block_qkv_layouts_differ(tmp_path, monkeypatch):
    hf = random_hf_model("neox_parallel")
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf, TOKENS)
    np.testing.assert_allclose(imported_logits("neox_parallel", hf, tmp_path / "hf"), expected, atol=1e-4)
    with monkeypatch.context() as patched:
        patched.setattr(gpt_neox, "ROTARY_INTERLEAVED", True)  # GPT-J's layout
        assert np.abs(imported_logits("neox_parallel", hf, tmp_path / "hf") - expected).max() > 1e-2
    # query_key_value read as [Q | K | V] blocks rather than per head (heads, 3, head_dim)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    for name in [n for n in state if "query_key_value" in n]:
        per_head = state[name].reshape(4, 3, 24, *state[name].shape[1:])
        state[name] = per_head.transpose(0, 1).reshape(state[name].shape).contiguous()
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert np.abs(imported_logits("neox_parallel", hf, tmp_path / "hf") - expected).max() > 1e-2


def test_neox_controls_parallel_residual_matters(tmp_path):
    hf = random_hf_model("neox_parallel")
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "use_parallel_residual": False}))
    params = load_pretrained_params(
        str(tmp_path / "hf"), our_config("neox_parallel", use_parallel_residual=False)
    )
    model = model_for(our_config("neox_parallel", use_parallel_residual=False))
    sequential = np.asarray(build(model).apply(params, None, jnp.asarray(TOKENS)))[..., :HF_VOCAB]
    assert np.abs(sequential - hf_logits(hf, TOKENS)).max() > 1e-2


def test_neo_controls_local_window_and_unscaled_scores_matter(tmp_path, monkeypatch):
    hf = random_hf_model("neo_local_global_tied")
    hf.save_pretrained(tmp_path / "hf")
    expected = hf_logits(hf, TOKENS)
    np.testing.assert_allclose(
        imported_logits("neo_local_global_tied", hf, tmp_path / "hf"), expected, atol=1e-4
    )
    with monkeypatch.context() as patched:
        patched.setattr(gpt_neo, "SCALE_SCORES", True)  # as GPT-J and NeoX divide by sqrt(head_dim)
        assert np.abs(imported_logits("neo_local_global_tied", hf, tmp_path / "hf") - expected).max() > 1e-2
    with monkeypatch.context() as patched:
        patched.setattr(gpt_neo.GPTNeo, "windows", lambda self: [1 << 30] * self.layers)  # every layer global
        assert np.abs(imported_logits("neo_local_global_tied", hf, tmp_path / "hf") - expected).max() > 1e-2


# ----- what older checkpoints hold -----


def test_old_checkpoints_buffers_and_rotary_pct_key_are_read(tmp_path):
    """Older NeoX folders say rotary_pct / rotary_emb_base instead of rope_parameters and carry
    attention.bias, attention.masked_bias and rotary_emb.inv_freq buffers; older GPT-Neo ones carry
    attn.attention.bias and masked_bias and a copy of the tied lm_head. All import to transformers' logits."""
    hf = random_hf_model("neox_sequential_tied")
    hf.save_pretrained(tmp_path / "neox")
    config = json.loads((tmp_path / "neox" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["partial_rotary_factor"] == 0.5 and "rotary_pct" not in config  # transformers 5 writes these
    config.update(rotary_pct=0.5, rotary_emb_base=500.0)
    (tmp_path / "neox" / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "neox" / "model.safetensors")
    for i in range(2):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.bool))
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(6)
    save_file(state, tmp_path / "neox" / "model.safetensors", metadata={"format": "pt"})
    got = imported_logits("neox_sequential_tied", hf, tmp_path / "neox")
    np.testing.assert_allclose(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)

    hf = random_hf_model("neo_local_global_tied")
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # lm_head.weight included, as old files had
    for i in range(3):
        state[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(
            torch.ones(1, 1, 32, 32, dtype=torch.bool)
        )
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    (tmp_path / "neo").mkdir()
    torch.save(state, tmp_path / "neo" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "neo" / "config.json")
    got = imported_logits("neo_local_global_tied", hf, tmp_path / "neo")
    np.testing.assert_allclose(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_a_folder_of_another_architecture_or_shape_is_one_clear_error(tmp_path):
    from mesh_transformer.errors import InteropError

    random_hf_model("neox_parallel").save_pretrained(tmp_path / "neox")
    with pytest.raises(InteropError, match="model_type is 'gpt_neox', expected 'gpt_neo'"):
        load_pretrained_params(str(tmp_path / "neox"), our_config("neo_untied"))
    with pytest.raises(
        InteropError, match="use_parallel_residual is True but the config's use_parallel_residual"
    ):
        load_pretrained_params(
            str(tmp_path / "neox"), our_config("neox_parallel", use_parallel_residual=False)
        )
    with pytest.raises(
        InteropError, match=r"rope_parameters.partial_rotary_factor is 0.25 .* rotary_pct is 0.5"
    ):
        load_pretrained_params(str(tmp_path / "neox"), our_config("neox_parallel", rotary_pct=0.5))
    random_hf_model("neo_untied").save_pretrained(tmp_path / "neo")
    with pytest.raises(
        InteropError, match=r"attention_types is \['global', 'local'\] .* \['local', 'local'\]"
    ):
        load_pretrained_params(
            str(tmp_path / "neo"), our_config("neo_untied", attention_layers=["local"] * 2)
        )


# ----- configs -----


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(architecture="llama"), "'architecture' must be one of gptj, gpt_neox, gpt_neo, got 'llama'"),
        (dict(rotary_pct=0.25), "'rotary_pct' does not apply to architecture 'gptj' (only to gpt_neox)"),
        (dict(window_size=128), "'window_size' does not apply to architecture 'gptj' (only to gpt_neo)"),
        (dict(tie_word_embeddings=True), "'tie_word_embeddings' does not apply to architecture 'gptj'"),
        (dict(architecture="gpt_neox", pe_rotary_dims=8), "'pe_rotary_dims' does not apply to architecture"),
        (dict(architecture="gpt_neox", rotary_pct=0.1), "'rotary_pct' (0.1) must be in (0, 1] and rotate"),
        (dict(architecture="gpt_neox", pe="fixed"), "'pe' must be \"rotary\" (GPT-NeoX)"),
        (dict(architecture="gpt_neo", attention_layers=["local"]), "'attention_layers' must list"),
        (dict(architecture="gpt_neo", attention_layers=["local", "sparse"]), "'attention_layers' must list"),
        (dict(architecture="gpt_neo", n_positions=8), "'n_positions' (8) must be at least seq (16)"),
        (dict(architecture="gpt_neo", window_size=0), "'window_size' must be a positive integer"),
        (dict(architecture="gpt_neo", rotary_emb_base=1.0), "'rotary_emb_base' does not apply"),
        (dict(d_ff=30), "'d_ff' (30) must be a positive multiple of cores_per_replica (4)"),
        (dict(activation="swiglu"), "'activation' must be one of gelu, gelu_new"),
        (dict(architecture="gpt_neox", layer_norm_eps=0), "'layer_norm_eps' must be positive"),
        (
            dict(architecture="gpt_neox", use_parallel_residual="yes"),
            "'use_parallel_residual' must be true or",
        ),
    ],
)
def test_combinations_that_make_no_sense_get_one_line_naming_the_key(changes, message):
    raw = dict(layers=2, d_model=64, n_heads=4, n_vocab=96, seq=16, tpu_size=8, cores_per_replica=4)
    with pytest.raises(ConfigError) as error:
        from_dict({**raw, **changes})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_architecture_defaults_fill_unset_keys_and_round_trip():
    raw = dict(layers=4, d_model=256, n_heads=4, n_vocab=96, seq=16)
    neox = from_dict({**raw, "architecture": "gpt_neox"})
    assert (neox.rotary_pct, neox.rotary_emb_base, neox.use_parallel_residual, neox.d_ff) == (
        0.25,
        1e4,
        True,
        1024,
    )
    assert (neox.activation, neox.tie_word_embeddings, neox.attention_bias, neox.pe_rotary_dims) == (
        "gelu",
        False,
        True,
        None,
    )
    neo = from_dict({**raw, "architecture": "gpt_neo"})
    assert neo.attention_layers == ["global", "local", "global", "local"] and neo.n_positions == 16
    assert (neo.window_size, neo.tie_word_embeddings, neo.activation, neo.pe) == (
        256,
        True,
        "gelu_new",
        "fixed",
    )
    gptj = from_dict(raw)
    assert (gptj.pe_rotary_dims, gptj.activation, gptj.rotary_pct, gptj.window_size) == (
        64,
        "gelu_new",
        None,
        None,
    )
    for config in (neox, neo, gptj):  # a checkpoint's stored config loads back as it was
        assert from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ----- GPT-J exactly as before the family -----


def test_gptj_checkpoint_saved_by_main_restores_and_trains_bit_identically():
    """tests/golden/gptj_main was written by main's code at b8ddf82 (tests/golden/make_gptj_main_fixture.py):
    its train state restores with the same tree paths and values, this code's init from the same seed is that
    code's, and the logits and the next train step are the ones that code computed, bit for bit."""
    sys.path.insert(0, GOLDEN)
    try:
        from make_gptj_main_fixture import CONFIG, flat
    finally:
        sys.path.remove(GOLDEN)
    trainer = Trainer(from_dict(CONFIG), sharding.make_mesh(4, 2))
    computed = np.load(os.path.join(GOLDEN, "gptj_main", "computed.npz"))

    def assert_equal(tree, npz: str) -> None:
        want = np.load(os.path.join(GOLDEN, "gptj_main", npz))
        got = flat(jax.device_get(tree))
        assert sorted(got) == sorted(want.files)  # "['gptj/layers/block/q_proj']['w']", ...
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    assert_equal(trainer.init_state(0).params, "init_params.npz")
    state, extra = CheckpointManager(os.path.join(GOLDEN, "gptj_main", "run")).restore(trainer.abstract_state)
    assert int(state.step) == 1 and extra["loader"]["position"] == 4
    logits = trainer.model.apply(jax.device_get(state.params), None, computed["tokens_BT"])
    np.testing.assert_array_equal(np.asarray(logits), computed["logits_step_1"])
    state, metrics = trainer.step(state, trainer.global_batch(computed["batches"][1]))
    assert float(metrics["loss"]) == float(computed["loss_step_2"])
    assert float(metrics["grad_norm"]) == float(computed["grad_norm_step_2"])
    assert_equal(state.params, "params_step_2.npz")


def test_every_model_is_hashable_and_a_different_field_is_a_different_program():
    a = model_for(our_config("neox_parallel"))
    assert hash(a) == hash(model_for(our_config("neox_parallel")))
    assert a != dataclasses.replace(a, use_parallel_residual=False)


# ----- the shipped configs of the public sizes -----

# name: (model_type, layers, hidden size, heads, vocab_size) of EleutherAI/<name>'s config.json on the Hub
# (intermediate size 4 x hidden; GPT-Neo alternates global and local layers, window 256, 2048 positions).
PUBLIC = {
    "pythia-70m": ("gpt_neox", 6, 512, 8, 50304),
    "pythia-160m": ("gpt_neox", 12, 768, 12, 50304),
    "pythia-410m": ("gpt_neox", 24, 1024, 16, 50304),
    "pythia-1b": ("gpt_neox", 16, 2048, 8, 50304),
    "pythia-1.4b": ("gpt_neox", 24, 2048, 16, 50304),
    "pythia-2.8b": ("gpt_neox", 32, 2560, 32, 50304),
    "pythia-6.9b": ("gpt_neox", 32, 4096, 32, 50432),
    "pythia-12b": ("gpt_neox", 36, 5120, 40, 50688),
    "gpt-neox-20b": ("gpt_neox", 44, 6144, 64, 50432),
    "gpt-neo-125m": ("gpt_neo", 12, 768, 12, 50257),
    "gpt-neo-1.3b": ("gpt_neo", 24, 2048, 16, 50257),
    "gpt-neo-2.7b": ("gpt_neo", 32, 2560, 20, 50257),
}


def public_hf_config(model_type: str, layers: int, hidden: int, heads: int, vocab: int):
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            vocab_size=vocab,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    return GPTNeoConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        vocab_size=vocab,
        window_size=256,
        max_position_embeddings=2048,
        attention_types=[[["global", "local"], layers // 2]],
    )


@pytest.mark.parametrize("name", list(PUBLIC))
def test_each_public_size_config_has_the_parameters_transformers_builds(name):
    """Each shipped config is its model's architecture and shapes: as many parameters as transformers builds
    for that config.json on the meta device (with the config's n_vocab, padded to divide by mp), and the
    model keys its config.json maps to."""
    config = load_config(os.path.join(ROOT, "configs", f"{name}.json"))
    model_type, layers, hidden, heads, vocab = PUBLIC[name]
    assert config.n_vocab - vocab in range(config.mp) and config.seq == 2048
    hf = public_hf_config(model_type, layers, hidden, heads, vocab)
    for key, (value, hf_key) in type(model_for(config)).config_from_hf(hf.to_dict(), name).items():
        assert getattr(config, key) == value, (key, hf_key)
    hf.vocab_size = config.n_vocab
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())
    assert param_count(model_for(config).abstract_params()) == theirs
