"""Checkpoints: resharding round trips, one copy per replica, async host copies, retention, slim, faults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesh_transformer.checkpoint import (
    COMMIT_MARKER,
    CheckpointError,
    CheckpointManager,
    load_params,
    save_params,
    slim_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
LAYERS, D_MODEL, N_VOCAB = 2, 8, 16

# Partition specs of the small GPT-J-shaped params: model-parallel on the output (or vocab) dimension.
PARAM_SPECS = {
    "transformer/embed": {"w": P("mp", None)},
    "transformer/layers/attn/q_proj": {"w": P(None, None, "mp")},
    "transformer/layers/mlp/fc_in": {"w": P(None, None, "mp"), "b": P(None, "mp")},
    "transformer/layers/ln": {"scale": P(), "offset": P()},
    "transformer/head": {"w": P(None, "mp"), "b": P("mp")},
}
PARAM_SHAPES = {
    "transformer/embed": {"w": (N_VOCAB, D_MODEL)},
    "transformer/layers/attn/q_proj": {"w": (LAYERS, D_MODEL, D_MODEL)},
    "transformer/layers/mlp/fc_in": {"w": (LAYERS, D_MODEL, 4 * D_MODEL), "b": (LAYERS, 4 * D_MODEL)},
    "transformer/layers/ln": {"scale": (LAYERS, D_MODEL), "offset": (LAYERS, D_MODEL)},
    "transformer/head": {"w": (D_MODEL, N_VOCAB), "b": (N_VOCAB,)},
}


class TrainState(NamedTuple):
    step: jax.Array
    params: dict[str, dict[str, jax.Array]]
    opt_state: Any


def make_mesh(dp: int, mp: int, devices: list | None = None) -> Mesh:
    devices = jax.devices()[: dp * mp] if devices is None else devices
    return Mesh(np.array(devices).reshape(dp, mp), ("dp", "mp"))


def _optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


def state_specs() -> TrainState:
    """Partition specs of the whole state; the Adam moments of the embedding are also split over dp."""
    shapes = jax.eval_shape(lambda: _optimizer().init(_host_params(0)))
    specs = jax.tree.map(lambda _: P(), shapes)
    clip, (adam, *rest) = specs
    mu = dict(PARAM_SPECS, **{"transformer/embed": {"w": P("dp", "mp")}})
    opt = (clip, (adam._replace(count=P(), mu=mu, nu=PARAM_SPECS), *rest))
    return TrainState(step=P(), params=PARAM_SPECS, opt_state=opt)


def _host_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: {k: rng.standard_normal(shape).astype(np.float32) for k, shape in leaves.items()}
        for m, leaves in PARAM_SHAPES.items()
    }


def host_state(seed: int) -> TrainState:
    """A state with distinct values in every leaf (Adam moments included), as numpy arrays."""
    params = _host_params(seed)
    opt = _optimizer().init(params)
    clip, (adam, *rest) = opt
    adam = adam._replace(
        count=np.int32(seed + 7),
        mu=jax.tree.map(lambda p: np.float32(0.5) * p + 1, params),
        nu=jax.tree.map(lambda p: p * p, params),
    )
    return TrainState(step=np.int32(seed), params=params, opt_state=(clip, (adam, *rest)))


def place(host: TrainState, mesh: Mesh) -> TrainState:
    return jax.tree.map(
        lambda spec, x: jax.device_put(np.asarray(x), NamedSharding(mesh, spec)),
        state_specs(),
        host,
        is_leaf=lambda x: isinstance(x, P),
    )


def target_for(mesh: Mesh) -> TrainState:
    host = host_state(0)
    return jax.tree.map(
        lambda spec, x: jax.ShapeDtypeStruct(
            np.shape(x), np.asarray(x).dtype, sharding=NamedSharding(mesh, spec)
        ),
        state_specs(),
        host,
        is_leaf=lambda x: isinstance(x, P),
    )


def assert_trees_equal(actual: Any, expected: Any) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_a == tree_e
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[str, TrainState]:
    """A state saved as step 5 from mesh (2, 4)."""
    model_dir = str(tmp_path / "run")
    manager = CheckpointManager(model_dir)
    host = host_state(5)
    manager.save(5, place(host, make_mesh(2, 4)), {"loader": {"index": 3}, "seed": 1})
    manager.wait()
    return model_dir, host


@pytest.mark.parametrize("dp,mp", [(2, 4), (4, 2), (8, 1), (1, 1)])
def test_restore_reshards_onto_any_mesh(saved: tuple[str, TrainState], dp: int, mp: int) -> None:
    model_dir, host = saved
    mesh = make_mesh(dp, mp)
    target = target_for(mesh)
    state, extra = CheckpointManager(model_dir).restore(target)
    assert extra == {"loader": {"index": 3}, "seed": 1}
    assert_trees_equal(state, host)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding


def test_each_piece_is_written_once_whatever_its_replicas(saved: tuple[str, TrainState]) -> None:
    model_dir, host = saved
    step_dir = Path(model_dir) / "step_5"
    meta = json.loads((step_dir / "checkpoint.json").read_text())
    files = sorted(step_dir.glob("*.safetensors"))
    assert len(files) == sum(len(r["boxes"]) for r in meta["leaves"])
    # Replicated leaves are saved once; the embedding moments split over dp x mp are saved as 8 pieces.
    boxes = {r["path"]: r["boxes"] for r in meta["leaves"]}
    assert len(boxes[".params['transformer/layers/ln']['scale']"]) == 1
    assert len(boxes[".params['transformer/embed']['w']"]) == 4
    assert len(boxes[".opt_state[1][0].mu['transformer/embed']['w']"]) == 8
    data_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host))
    piece_bytes = sum(safetensors.numpy.load_file(str(f))["data"].nbytes for f in files)  # plain safetensors
    assert piece_bytes == data_bytes


def test_save_returns_with_host_copies_so_arrays_can_be_freed(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    host = host_state(3)
    state = place(host, make_mesh(2, 4))
    manager.save(3, state, {})
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what a donating train step does to the buffers the writer must not touch
    manager.wait()
    assert manager.latest_step() == 3
    restored, _ = manager.restore(target_for(make_mesh(4, 2)))
    assert_trees_equal(restored, host)


def test_prepared_buffers_are_the_ones_saves_copy_into(tmp_path: Path) -> None:
    """prepare() maps the host buffers ahead of the first save; saves then copy into exactly those, and
    values written after one save do not leak into the next."""
    manager = CheckpointManager(str(tmp_path), keep_n=2)
    mesh = make_mesh(2, 4)
    manager.prepare(place(host_state(1), mesh))
    manager._preparing.join()
    prepared = {key: id(buffer) for key, buffer in manager._host_buffers.items()}
    assert prepared
    for seed in (4, 5):
        manager.save(seed, place(host_state(seed), mesh), {})
        manager.wait()
        assert {key: id(buffer) for key, buffer in manager._host_buffers.items()} == prepared
    for seed in (4, 5):
        restored, _ = manager.restore(target_for(make_mesh(4, 2)), step=seed)
        assert_trees_equal(restored, host_state(seed))


def test_uncommitted_checkpoint_is_ignored_and_rewritten(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    mesh = make_mesh(2, 4)
    for step in (1, 2):
        manager.save(step, place(host_state(step), mesh), {"at": step})
    manager.wait()
    (tmp_path / "step_2" / COMMIT_MARKER).unlink()  # as if killed before the marker
    (tmp_path / "step_2" / "00001.00000.safetensors").write_bytes(b"half")
    fresh = CheckpointManager(str(tmp_path))
    assert fresh.latest_step() == 1
    state, extra = fresh.restore(target_for(mesh))
    assert extra == {"at": 1}
    assert_trees_equal(state, host_state(1))
    fresh.save(2, place(host_state(2), mesh), {"at": 2})
    fresh.wait()
    assert_trees_equal(fresh.restore(target_for(mesh))[0], host_state(2))


def test_retention_keeps_newest_and_every_kth_step(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), keep_n=2, keep_every=4)
    state = place(host_state(0), make_mesh(2, 4))
    os.makedirs(tmp_path / "step_0")  # an interrupted save from an earlier run: cleaned up
    for step in range(1, 10):
        manager.save(step, state, {})
    manager.wait()
    assert manager.committed_steps() == [4, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_8", "step_9"]


def test_saving_a_committed_step_again_leaves_it_untouched(saved: tuple[str, TrainState]) -> None:
    model_dir, host = saved
    manager = CheckpointManager(model_dir)
    manager.save(5, place(host_state(6), make_mesh(2, 4)), {"other": True})
    manager.wait()
    state, extra = manager.restore(target_for(make_mesh(2, 4)))
    assert_trees_equal(state, host)
    assert extra["seed"] == 1


def test_numpy_leaves_and_single_device_arrays_round_trip(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    tree = {"count": np.int64(42), "scale": np.float32(0.25), "x": jax.numpy.arange(6, dtype=jax.numpy.int32)}
    manager.save(0, tree, {})
    manager.wait()
    target = {"count": np.int64(0), "scale": np.float32(0), "x": jax.ShapeDtypeStruct((6,), np.int32)}
    restored, _ = manager.restore(target)
    assert isinstance(restored["count"], np.ndarray) and restored["count"] == 42
    assert restored["scale"] == np.float32(0.25)
    np.testing.assert_array_equal(restored["x"], np.arange(6))


def test_failed_background_write_is_raised_by_wait(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    manager = CheckpointManager(str(blocker / "run"))
    manager.save(1, place(host_state(1), make_mesh(2, 4)), {})
    with pytest.raises(CheckpointError, match="saving a checkpoint to .*file/run failed"):
        manager.wait()
    assert manager.latest_step() is None


def test_extra_that_is_not_json_is_refused_at_save(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        manager.save(1, {"x": np.float32(1)}, {"rng": object()})


def test_bad_retention_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="keep_n=0"):
        CheckpointManager(str(tmp_path), keep_n=0)
    with pytest.raises(CheckpointError, match="keep_every=0"):
        CheckpointManager(str(tmp_path), keep_every=0)


# ------------------------------------------------------------------ faults ---------------------------------


def _piece(model_dir: str, path: str) -> Path:
    step_dir = Path(model_dir) / "step_5"
    meta = json.loads((step_dir / "checkpoint.json").read_text())
    index = [r["path"] for r in meta["leaves"]].index(path)
    return step_dir / f"{index:05d}.00001.safetensors"


EMBED = ".params['transformer/embed']['w']"


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-5])


def _flip_last_byte(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate, r"00001\.safetensors: holds \d+ data bytes, expected \d+; the piece file is truncated"),
        (_flip_last_byte, r"00001\.safetensors: checksum mismatch"),
        (Path.unlink, r"00001\.safetensors: missing"),
        (lambda f: f.write_bytes(b"\x10"), r"00001\.safetensors: truncated \(1 bytes\)"),
        (lambda f: f.write_bytes(b"\xff" * 16), r"00001\.safetensors: truncated header"),
    ],
    ids=["truncated", "flipped-byte", "missing-shard", "stub", "bad-header"],
)
def test_damaged_piece_is_named_in_one_clear_error(
    saved: tuple[str, TrainState], damage, message: str
) -> None:
    model_dir, _ = saved
    damage(_piece(model_dir, EMBED))
    with pytest.raises(CheckpointError, match=message):
        CheckpointManager(model_dir).restore(target_for(make_mesh(4, 2)))


def test_damaged_metadata_is_named(saved: tuple[str, TrainState]) -> None:
    model_dir, _ = saved
    (Path(model_dir) / "step_5" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step_5/checkpoint\.json: not valid JSON"):
        CheckpointManager(model_dir).restore(target_for(make_mesh(2, 4)))


def test_checkpoint_of_another_model_shape_is_refused(saved: tuple[str, TrainState]) -> None:
    model_dir, _ = saved
    target = target_for(make_mesh(2, 4))
    wider = jax.ShapeDtypeStruct(
        (N_VOCAB, 2 * D_MODEL), np.float32, sharding=target.params["transformer/embed"]["w"].sharding
    )
    params = dict(target.params, **{"transformer/embed": {"w": wider}})
    with pytest.raises(
        CheckpointError,
        match=r"step_5: \.params\['transformer/embed'\]\['w'\] has shape \(16, 8\), the target expects "
        r"\(16, 16\)",
    ):
        CheckpointManager(model_dir).restore(target._replace(params=params))
    fewer = {k: v for k, v in target.params.items() if k != "transformer/head"}
    with pytest.raises(
        CheckpointError, match=r"holds \.params\['transformer/head'\]\['b'\], which the target lacks"
    ):
        load_params(model_dir, fewer)


def test_restore_from_empty_model_dir_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no committed checkpoint"):
        CheckpointManager(str(tmp_path / "none")).restore(target_for(make_mesh(2, 4)))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_params(str(tmp_path / "none"), target_for(make_mesh(2, 4)).params)


def test_indivisible_target_mesh_is_refused(saved: tuple[str, TrainState]) -> None:
    model_dir, _ = saved
    mesh = Mesh(np.array(jax.devices()[:3]).reshape(1, 3), ("dp", "mp"))
    with pytest.raises(CheckpointError, match=r"cannot be placed on the target mesh"):
        CheckpointManager(model_dir).restore(target_for(mesh))


# ------------------------------------------------------------------ slim -----------------------------------


def test_slim_checkpoint_holds_params_in_bfloat16_at_a_sixth_of_the_size(
    saved: tuple[str, TrainState], tmp_path: Path
) -> None:
    model_dir, host = saved
    slim_dir = tmp_path / "slim"
    slim_checkpoint(model_dir, str(slim_dir))

    def data_bytes(d: Path) -> int:  # tensor bytes; these tiny pieces would be dominated by their headers
        return sum(safetensors.numpy.load_file(str(f))["data"].nbytes for f in d.glob("*.safetensors"))

    ratio = data_bytes(slim_dir) / data_bytes(Path(model_dir) / "step_5")
    assert 1 / 6.01 < ratio < 1 / 5.99, ratio  # float32 params + two float32 moments -> bfloat16 params
    target = target_for(make_mesh(8, 1)).params
    slim_params = load_params(str(slim_dir), target)
    as_bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), host.params)
    assert_trees_equal(slim_params, as_bf16)
    assert_trees_equal(load_params(model_dir, target), host.params)  # the full checkpoint: exact
    # A slim checkpoint dropped where a full one is expected is named as such, not as a mysterious tree diff.
    shutil.copytree(slim_dir, tmp_path / "run2" / "step_7")
    with pytest.raises(CheckpointError, match=r"run2/step_7: has no \.step .*params-only slim checkpoint"):
        CheckpointManager(str(tmp_path / "run2")).restore(target_for(make_mesh(2, 4)))


def test_save_params_round_trips_in_float16_and_refuses_to_overwrite(tmp_path: Path) -> None:
    host = host_state(2).params
    params = place(host_state(2), make_mesh(4, 2)).params
    save_params(str(tmp_path / "export"), params, dtype=np.float16)
    loaded = load_params(str(tmp_path / "export"), target_for(make_mesh(1, 1)).params)
    assert_trees_equal(loaded, jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), host))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_params(str(tmp_path / "export"), params)


def test_slim_checkpoint_script(saved: tuple[str, TrainState], tmp_path: Path) -> None:
    model_dir, host = saved
    out = tmp_path / "slim"
    run = subprocess.run(
        [sys.executable, str(REPO / "slim_checkpoint.py"), model_dir, str(out), "--dtype", "float16"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert run.returncode == 0, run.stderr
    assert "float16" in run.stdout
    loaded = load_params(str(out), target_for(make_mesh(2, 4)).params)
    assert_trees_equal(loaded, jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), host.params))
    again = subprocess.run(
        [sys.executable, str(REPO / "slim_checkpoint.py"), str(tmp_path / "missing"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert again.returncode != 0
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: no checkpoint found" in lines[0], again.stderr
