"""Configs: the original 6B file loads unchanged, and every impossible value gets one clear message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_transformer.config import ConfigError, check_device_count, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SIX_B = ROOT / "configs" / "6B_roto_256.json"


def base(**changes):
    return {**json.loads(SIX_B.read_text()), **changes}


def test_original_6b_config_loads_unchanged():
    c = load_config(str(SIX_B))
    assert (c.layers, c.d_model, c.n_heads, c.n_vocab, c.pe_rotary_dims, c.seq) == (
        28,
        4096,
        16,
        50400,
        64,
        2048,
    )
    assert (c.dp, c.mp) == (32, 8)
    assert c.tokens_per_step == 512 * 2048
    assert c.val_set == {"pile": "pile.val.index", "owt": "openwebtext2_new_inputs.val.index"}
    assert c.lr == 1.2e-4 and c.end_lr == 1.2e-5 and c.keep_every == 10000


def test_every_shipped_config_loads():
    shipped = sorted((ROOT / "configs").glob("*.json"))
    # the configs the README's Layout names; an empty or misplaced configs/ must not pass
    assert {"6B_roto_256.json", "20B_v3_256.json", "demo.json"} <= {p.name for p in shipped}, shipped
    for path in shipped:
        c = load_config(str(path))
        assert c.layers > 0 and c.d_model > 0 and c.tpu_size % c.mp == 0, path


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(n_heads=4), "n_heads (4) must be divisible by cores_per_replica (8)"),
        (dict(n_vocab=50257), "n_vocab (50257) must be divisible by cores_per_replica (8)"),
        (dict(pe_rotary_dims=512), "pe_rotary_dims (512) must not exceed the head dimension"),
        (dict(pe_rotary_dims=63), "pe_rotary_dims must be a positive even number"),
        (dict(val_every=0), "'val_every' must be a positive integer"),
        (dict(ckpt_every=0), "'ckpt_every' must be a positive integer"),
        (dict(keep_every=0), "'keep_every' must be a positive integer"),
        (dict(val_set="pile.val.index"), "'val_set' must be a dict"),
        (dict(learning_rate=1e-4), "unknown config key(s): learning_rate"),
        (dict(layers="28"), "'layers' must be an integer"),
        (dict(tpu_size=100), "tpu_size (100) must be divisible by cores_per_replica (8)"),
        (dict(compute_dtype="int8"), "compute_dtype must be one of"),
        (dict(remat="some"), "remat must be one of"),
        (dict(norm="rmsnorm"), "'norm' must be \"layernorm\""),
    ],
)
def test_bad_values_get_one_clear_message(changes, message):
    with pytest.raises(ConfigError) as err:
        from_dict(base(**changes))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key():
    raw = base()
    del raw["d_model"]
    with pytest.raises(ConfigError, match="missing required config key"):
        from_dict(raw)


def test_device_count_must_match_tpu_size_unless_overridden(tmp_path):
    c = load_config(str(SIX_B))
    with pytest.raises(ConfigError, match="tpu_size is 256 but 8 devices .* --tpu-size 8"):
        check_device_count(c, 8)
    check_device_count(load_config(str(SIX_B), tpu_size=8), 8)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "config file not found"),
        ("{ not json", "is not valid JSON"),
        ('{"layers": 2, "unknown_key": 1}', "unknown config key(s): unknown_key"),
    ],
)
def test_device_train_bad_config_is_one_line_and_nonzero(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        [sys.executable, str(ROOT / "device_train.py"), "--config", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dry_run_of_6b_prints_mesh_params_and_memory():
    result = subprocess.run(
        [sys.executable, str(ROOT / "device_train.py"), "--config", str(SIX_B), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "mesh: dp=32 x mp=8 (256 devices)" in result.stdout
    assert "parameters: 6,050,882,784" in result.stdout
    assert "total" in result.stdout and "GiB" in result.stdout
