"""Preparation on a Ray cluster (a private local one here): the parts spread over the workers, one worker
killed mid-part and its part retried, and a dataset byte for byte the one a single process prepares."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import pytest
from helpers import gcs_emulator
from test_data import make_documents, tokenizer_path, write_jsonl  # noqa: F401

from mesh_transformer import data, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same_tree(a: str, b: str) -> bool:
    comparison = filecmp.dircmp(a, b)
    if comparison.left_only or comparison.right_only or comparison.diff_files or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, comparison.common_files, shallow=False)
    return (
        not mismatch
        and not errors
        and all(same_tree(os.path.join(a, d), os.path.join(b, d)) for d in comparison.common_dirs)
    )


@pytest.mark.slow
def test_ray_preparation_survives_a_dead_worker_and_equals_one_process(tmp_path, tokenizer_path):  # noqa: F811
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", make_documents(120, seed=i)) for i in range(6)]
    options = dict(tokenizer_path=tokenizer_path, val_fraction=0.1, part_bytes=20_000)
    single = str(tmp_path / "single")
    index = data.prepare_dataset(inputs, single, **options)
    assert index["parts"] >= 3

    with gcs_emulator(tmp_path, "bkt"):
        command = [sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), "--input", *inputs]
        command += ["--tokenizer", tokenizer_path, "--val-fraction", "0.1", "--part-mb", "0.02"]
        command += ["--ray-address", "local", "--workers", "2"]
        environment = dict(os.environ, MESH_TRANSFORMER_PREPARE_FAULT="die:1")
        result = subprocess.run(
            [*command, "--output", "gs://bkt/ray"],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # the worker did die: Ray's own lines (on stdout or stderr) say so and that the part was retried
        assert (
            "worker died" in result.stdout + result.stderr
            and "will be retried" in result.stdout + result.stderr
        )
        # the bucket's dataset, copied down, is the single process's, file for file
        copy = tmp_path / "copy"
        bucket, _ = storage.split_gcs("gs://bkt/ray")
        for blob in storage.gcs_client().list_blobs(bucket, prefix="ray/"):
            target = copy / blob.name[len("ray/") :]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
    assert same_tree(single, str(copy))


def test_a_local_output_that_a_node_cannot_see_is_one_clear_error(tmp_path, tokenizer_path):  # noqa: F811
    from mesh_transformer import prepare, prepare_cluster

    source = write_jsonl(tmp_path / "in.jsonl", make_documents(5))
    settings = prepare.Settings(
        tokenizer_json=open(tokenizer_path).read(), eos_id=0, dtype="uint16", seq=16, val_fraction=0.0,
        seed=0, strict=False, shard_tokens=100, text_column="text",
    )  # fmt: skip
    part = prepare.Part(0, ((source, os.path.getsize(source)),))
    staging = tmp_path / "staging"  # as another machine sees the driver's staging dir: not at all
    with pytest.raises(data.DataError, match="is not visible on Ray node .*prepare into gs://"):
        prepare_cluster._prepare_task(part, settings, str(staging), None, False)
    staging.mkdir()
    (staging / prepare_cluster._MARKER).touch()
    result = prepare_cluster._prepare_task(part, settings, str(staging), None, False)
    assert (
        result["splits"]["train"]["documents"] == 5 and (staging / "train" / "shard_00000_00000.bin").exists()
    )
