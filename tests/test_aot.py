"""The real train step compiles for TPU pods from this CPU machine (libtpu's compiler, no TPU), fits, and
matches its golden shardings; the ZeRO switches change memory, not results. The 6B's generation programs
compile for a v3-8.

Golden files: regenerate with
python scripts/aot_compile.py --config configs/6B_roto_256.json --topology v3:8x16 \
    --write-shardings tests/golden/shardings_6B_roto_256.json   (and the same for configs/20B_v3_256.json and
configs/gpt-neox-20b.json)
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mesh_transformer import aot, engine, sharding
from mesh_transformer.config import ConfigError, from_dict, load_config
from mesh_transformer.memory import GiB, abstract_params
from mesh_transformer.models import model_for
from mesh_transformer.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
SHIPPED = {"6B_roto_256": "v3:8x16", "20B_v3_256": "v3:8x16", "gpt-neox-20b": "v3:8x16"}
ZERO3 = ("20B_v3_256", "gpt-neox-20b")  # params split over dp too


def shipped_config(name, **changes):
    return load_config(os.path.join(ROOT, "configs", f"{name}.json")).replace(**changes)


class Compiled(dict):
    """Each shipped config compiled for its pod when a test first asks for it (a minute or two each), once:
    each compilation counts toward the first test that needs it, not all of them toward the first test."""

    def __missing__(self, name: str) -> aot.AotResult:
        self[name] = aot.compile_step(shipped_config(name), SHIPPED[name])
        return self[name]


@pytest.fixture(scope="module")
def compiled():
    return Compiled()


def test_6B_step_compiles_for_a_v3_256_and_fits(compiled):
    result = compiled["6B_roto_256"]
    assert result.device_count == 256 and result.device_kind == "TPU v3"
    assert result.fits, aot.report(result)
    assert result.memory.total < 16 * GiB
    # the train state is donated: the new state is written over the old one, not beside it
    assert result.memory.aliased > 0.99 * result.memory.outputs
    assert "fits: " in aot.report(result)


def test_6B_decode_compiles_for_a_v3_8_with_each_layer_split_over_mp():
    """Generation's programs for the 6B (bfloat16 weights, 8 slots of 1,088 positions) on a v3-8, the model
    split over mp 8 as in training: one weight array per layer, the cache's heads split, all of it in 16
    GiB; prefilling 8 prompts of 64 tokens into the slots fits too."""
    config = shipped_config("6B_roto_256")
    mesh = engine.sampling_mesh(config.mp, aot.tpu_devices("v3:2x2"))
    shape = model_for(config)
    stacked = engine.inference_params_target(shape, abstract_params(config), mesh)
    layers = jax.eval_shape(shape.decode_layout, stacked)
    specs = sharding.param_specs(layers, sharding.logical_rules())
    params = jax.tree.map(
        lambda p, spec: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, spec)),
        layers,
        specs,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    assert specs["gptj/layer_27/fc_in"]["w"] == PartitionSpec(None, "mp")
    assert params["gptj/layer_27/fc_in"]["w"].dtype == jnp.bfloat16

    B, P, S = 8, 64, 1088
    empty = engine._empty_state.lower(shape=shape, mesh=mesh, batch=B, slots=S).compile()
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        empty.out_info,
        empty.output_shardings,
    )
    assert state.cache.k_BHKS[0].shape == (B, 16, 256, S)
    assert state.cache.k_BHKS[0].sharding.spec == PartitionSpec(None, "mp")
    row = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=sharding.row_sharding(mesh, len(shp)))  # noqa: E731
    i32 = jnp.int32
    settings = tuple(row((B,), dtype) for dtype in engine._SETTINGS_DTYPES)
    programs = dict(shape=shape, mesh=mesh, vocab_size=50257)
    arrivals = (
        row((B, P), i32),
        row((B,), i32),
        row((B,), i32),
        row((B, 2), jnp.uint32),
        row((B,), jnp.uint32),
    )
    insert = engine._insert.lower(params, state, jnp.int32(B), *arrivals, settings, eos_id=50256, **programs)
    memory = insert.compile().memory_analysis()
    assert memory.argument_size_in_bytes + memory.temp_size_in_bytes < 16 * GiB

    decode = engine._decode.lower(
        params,
        state,
        row((B,), i32),
        row((B,), bool),
        jnp.int32(0),
        eos_id=50256,
        steps=32,
        **programs,
    ).compile()
    memory = decode.memory_analysis()
    per_core = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    assert 1.5 * GiB < per_core < 16 * GiB  # weights alone are 12 GB over 8 cores


def test_20B_fits_a_v3_256_only_with_params_split_over_dp(compiled):
    assert compiled["20B_v3_256"].fits, aot.report(compiled["20B_v3_256"])
    without = aot.compile_step(shipped_config("20B_v3_256", shard_params_over_dp=False), "v3:8x16")
    assert not without.fits
    assert without.required > 16 * GiB
    with pytest.raises(aot.StepDoesNotFit, match=r"needs [\d.]+ GiB per device, more than the 16 GiB"):
        aot.require_fit(without, echo=lambda _: None)


def test_gpt_neox_20B_step_compiles_for_a_v3_256_and_fits(compiled):
    """GPT-NeoX-20B (two LayerNorms, biases, untied embed_out, 25% rotary) with params and moments over dp."""
    result = compiled["gpt-neox-20b"]
    assert result.device_count == 256 and result.device_kind == "TPU v3"
    assert result.config.architecture == "gpt_neox" and result.config.shard_params_over_dp
    assert result.fits, aot.report(result)
    assert result.memory.total < 16 * GiB
    assert result.memory.aliased > 0.99 * result.memory.outputs


@pytest.mark.parametrize("name", ZERO3)
def test_20B_gathers_its_params_one_layer_at_a_time(compiled, name):
    result = compiled[name]
    c = result.config
    stacked_layers_per_mp_shard = c.layers * 12 * c.d_model**2 * 4 // c.mp
    # Gathering the whole stack at once would need at least this much; one layer at a time needs far less.
    assert result.memory.temporaries < stacked_layers_per_mp_shard / 2
    # ...and the all-gathers of layer weights sit inside the layer loops (while bodies), not before them.
    hlo = result.compiled.as_text()
    bodies = set(re.findall(r"\bwhile\([^)]*\).*?body=%?([\w.\-]+)", hlo))
    computations = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S))
    gathered_in_loops = [
        name for name in bodies if re.search(r"bf16\[[^\]]*6144[^\]]*\][^\n]* all-gather", computations[name])
    ]
    assert gathered_in_loops, "no per-layer all-gather of bf16 layer weights inside a while body"


@pytest.mark.parametrize("name", SHIPPED)
def test_dry_run_estimate_within_25_percent_of_the_compiler(compiled, name):
    result = compiled[name]
    assert abs(result.estimate_error()) < 0.25, aot.report(result)


@pytest.mark.parametrize("name", SHIPPED)
def test_compiled_shardings_match_golden(compiled, name):
    with open(os.path.join(GOLDEN, f"shardings_{name}.json")) as f:
        golden = json.load(f)
    assert aot.state_shardings(compiled[name].compiled) == golden


def test_golden_shardings_split_every_big_leaf():
    """The golden files themselves: no layer weight or moment is replicated over mp, ZeRO ones over dp."""
    for name in SHIPPED:
        with open(os.path.join(GOLDEN, f"shardings_{name}.json")) as f:
            golden = json.load(f)
        for path, spec in golden.items():
            big = r"_proj|fc_in|fc_out|embeddings|lm_head'\]\['w|query_key_value|dense|embed_in|embed_out"
            if re.search(big, path) and "['b']" not in path:
                assert "'mp'" in spec, (name, path, spec)
            if name in ZERO3 and "['w']" in path:
                assert "'dp'" in spec, (name, path, spec)


def run_script(*args, prelude="pass"):
    code = (
        f"import runpy, sys; {prelude}; sys.argv = ['aot_compile.py', *{list(args)!r}]; "
        f"runpy.run_path({os.path.join(ROOT, 'scripts', 'aot_compile.py')!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_missing_libtpu_is_one_clear_line():
    done = run_script(
        "--config",
        "configs/6B_roto_256.json",
        "--topology",
        "v3:8x16",
        prelude="sys.modules['libtpu'] = None",
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: libtpu is not installed; the TPU compiler comes with it: pip install -e '.[tpu]'"
    ]


def test_unknown_topology_is_one_clear_line():
    done = run_script("--config", "configs/6B_roto_256.json", "--topology", "v9:8x16")
    assert done.returncode == 1
    # libtpu itself may log start-up warnings about the missing TPU VM before our one line
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith("error: unknown TPU topology 'v9:8x16'") and "v3:8x16" in errors[0]
    with pytest.raises(aot.UnknownTopology, match="expected a name such as v3:8x16"):
        aot.tpu_devices("v3-256")


def test_topology_with_other_device_count_names_both():
    with pytest.raises(ConfigError, match="v3:4x4 has 32 devices but the config's tpu_size is 256"):
        aot.compile_step(shipped_config("6B_roto_256"), "v3:4x4")


def test_zero_switches_need_d_model_divisible_by_dp():
    with pytest.raises(ConfigError, match=r"d_model \(4096\) must be divisible by dp \(3\)"):
        shipped_config("6B_roto_256", tpu_size=24, shard_optimizer_over_dp=True)


# ----- the ZeRO switches on the 8-device CPU mesh: same numbers, different layouts -----

TINY = dict(
    layers=2, d_model=64, n_heads=4, n_vocab=128, seq=16, pe_rotary_dims=8, tpu_size=8, cores_per_replica=2,
    per_replica_batch=2, gradient_accumulation_steps=2, warmup_steps=0, anneal_steps=10, lr=1e-2,
    end_lr=1e-3, weight_decay=0.1, total_steps=12, compute_dtype="float32",
)  # fmt: skip
SWITCHES = {
    "off": {},
    "zero1": {"shard_optimizer_over_dp": True},
    "zero3": {"shard_optimizer_over_dp": True, "shard_params_over_dp": True},
}


def loss_grads_and_step(switches):
    config = from_dict({**TINY, **switches})
    trainer = Trainer(config, sharding.make_mesh(config.dp, config.mp, jax.devices()))
    state = trainer.init_state(0)
    batch = np.random.default_rng(0).integers(0, 128, (2, 8, 17), dtype=np.int32)

    def loss_and_grads(params, tokens_BT1):
        with sharding.activation_sharding(trainer.mesh):
            return jax.value_and_grad(trainer._loss, has_aux=True)(params, tokens_BT1)

    (_, ce), grads = jax.jit(loss_and_grads)(
        state.params, jax.device_put(batch[0], trainer.eval_batch_sharding)
    )
    specs = {k: tuple(s.spec) for k, s in trainer.state_shardings.params["gptj/layers/block/fc_in"].items()}
    mu = trainer.state_shardings.opt_state[1].mu["gptj/layers/block/fc_in"]["w"].spec
    state, metrics = trainer.step(state, trainer.global_batch(batch))
    return float(ce), jax.device_get(grads), jax.device_get(metrics), jax.device_get(state.params), specs, mu


def test_zero_switches_change_layouts_not_loss_or_gradients():
    results = {name: loss_grads_and_step(switches) for name, switches in SWITCHES.items()}
    ce, grads, metrics, params, specs, mu = results["off"]
    assert specs["w"] == (None, None, "mp") and tuple(mu) == (None, None, "mp")
    assert tuple(results["zero1"][5]) == (None, "dp", "mp") and results["zero1"][4]["w"] == (None, None, "mp")
    assert results["zero3"][4]["w"] == (None, "dp", "mp")
    for name in ("zero1", "zero3"):
        ce_z, grads_z, metrics_z, params_z, _, _ = results[name]
        assert abs(ce_z - ce) < 1e-6, name
        assert abs(float(metrics_z["grad_norm"]) - float(metrics["grad_norm"])) < 1e-6, name
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_z), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5, err_msg=f"{name} {path}")
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_z), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)
