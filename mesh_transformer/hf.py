"""Hugging Face GPT-J interop: the name and layout mapping between our Haiku params and `GPTJForCausalLM`.

Torch linears are [out, in]; our `w` are [in, out], so every kernel is transposed. The embedding is
[vocab, d] in both. Our per-layer params are stacked on a leading layers axis; HF names each layer `h.{i}`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from mesh_transformer.config import Config

LAYERS = "gptj/layers/block/"

# (our module, our param) -> (HF name with {i} for the layer, transpose?)
LAYER_MAP: dict[tuple[str, str], tuple[str, bool]] = {
    ("ln_1", "scale"): ("transformer.h.{i}.ln_1.weight", False),
    ("ln_1", "offset"): ("transformer.h.{i}.ln_1.bias", False),
    ("q_proj", "w"): ("transformer.h.{i}.attn.q_proj.weight", True),
    ("k_proj", "w"): ("transformer.h.{i}.attn.k_proj.weight", True),
    ("v_proj", "w"): ("transformer.h.{i}.attn.v_proj.weight", True),
    ("out_proj", "w"): ("transformer.h.{i}.attn.out_proj.weight", True),
    ("fc_in", "w"): ("transformer.h.{i}.mlp.fc_in.weight", True),
    ("fc_in", "b"): ("transformer.h.{i}.mlp.fc_in.bias", False),
    ("fc_out", "w"): ("transformer.h.{i}.mlp.fc_out.weight", True),
    ("fc_out", "b"): ("transformer.h.{i}.mlp.fc_out.bias", False),
}
GLOBAL_MAP: dict[tuple[str, str], tuple[str, bool]] = {
    ("gptj", "embeddings"): ("transformer.wte.weight", False),
    ("gptj/ln_f", "scale"): ("transformer.ln_f.weight", False),
    ("gptj/ln_f", "offset"): ("transformer.ln_f.bias", False),
    ("gptj/lm_head", "w"): ("lm_head.weight", True),
    ("gptj/lm_head", "b"): ("lm_head.bias", False),
}


def hf_config_dict(config: Config, bos_token_id: int = 50256, eos_token_id: int = 50256) -> dict:
    """`config.json` of the equivalent `GPTJForCausalLM`."""
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_layer": config.layers,
        "n_positions": config.seq,
        "n_inner": None,
        "rotary_dim": config.pe_rotary_dims,
        "vocab_size": config.n_vocab,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def hf_tensors(params, layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in torch layout) for every tensor, one at a time (host arrays; no copies kept)."""
    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        value = np.asarray(params[module][name])
        yield hf_name, value.T if transpose else value
    for (module, name), (hf_name, transpose) in LAYER_MAP.items():
        stacked = params[LAYERS + module][name]
        for i in range(layers):
            value = np.asarray(stacked[i])
            yield hf_name.format(i=i), value.T if transpose else value


def params_from_hf(tensors: Mapping[str, np.ndarray], layers: int) -> dict[str, dict[str, np.ndarray]]:
    """Our params (float32 numpy) from HF tensors in torch layout; a missing tensor raises KeyError."""
    params: dict[str, dict[str, np.ndarray]] = {}
    for (module, name), (hf_name, transpose) in GLOBAL_MAP.items():
        value = np.asarray(tensors[hf_name], np.float32)
        params.setdefault(module, {})[name] = value.T if transpose else value
    for (module, name), (hf_name, transpose) in LAYER_MAP.items():
        per_layer = []
        for i in range(layers):
            value = np.asarray(tensors[hf_name.format(i=i)], np.float32)
            per_layer.append(value.T if transpose else value)
        params.setdefault(LAYERS + module, {})[name] = np.stack(per_layer)
    return params
