"""gs:// round trip against a local gcp-storage-emulator: prepare from and into a bucket, stream batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zstandard
from helpers import gcs_emulator

from mesh_transformer import data, prepare, storage
from mesh_transformer.data import DataError, Loader, validation_batches

BUCKET = "corpus"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as url:
        yield url


def documents(n: int) -> list[str]:
    rng = np.random.default_rng(4)
    return [
        f"doc {i}: " + " ".join(rng.choice(["sky", "sea", "sand", "été", "\n"], rng.integers(1, 40)))
        for i in range(n)
    ]


def test_prepare_from_and_into_a_bucket_matches_local(tmp_path, emulator):
    docs = documents(120)
    lines = [(json.dumps({"text": d, "meta": {"pile_set_name": "test"}}) + "\n").encode() for d in docs]
    local_in = tmp_path / "in"
    local_in.mkdir()
    (local_in / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[:60])))
    (local_in / "01.jsonl").write_bytes(b"".join(lines[60:]))
    tokenizer_path = str(tmp_path / "tokenizer.json")
    prepare.train_tokenizer(iter(docs), 300).save(tokenizer_path)
    for name in ("00.jsonl.zst", "01.jsonl"):
        storage.gcs_blob(f"gs://{BUCKET}/raw/{name}").upload_from_filename(str(local_in / name))
    storage.gcs_blob(f"gs://{BUCKET}/tokenizer.json").upload_from_filename(tokenizer_path)

    options = dict(val_fraction=0.2, shard_tokens=150, seed=2)
    remote = f"gs://{BUCKET}/prepared"
    remote_index = data.prepare_dataset(
        [f"gs://{BUCKET}/raw"], remote, tokenizer_path=f"gs://{BUCKET}/tokenizer.json", **options
    )
    local = str(tmp_path / "prepared")
    local_index = data.prepare_dataset([str(local_in)], local, tokenizer_path=tokenizer_path, **options)
    assert remote_index["documents"] == local_index["documents"] == 120
    assert remote_index["splits"] == local_index["splits"]
    assert len(remote_index["splits"]["train"]["shards"]) > 3

    # Streamed from the bucket (ranged reads, rows straddling shards) = memory-mapped locally.
    kwargs = dict(
        seq=12, global_batch=4, gradient_accumulation_steps=2, seed=9, process_index=1, process_count=2
    )
    from_bucket, from_disk = Loader(remote, **kwargs), Loader(local, **kwargs)
    for _ in range(5):
        np.testing.assert_array_equal(next(from_bucket).tokens, next(from_disk).tokens)
    resumed = Loader(remote, **kwargs)
    resumed.load_state_dict(from_disk.state_dict())
    np.testing.assert_array_equal(next(resumed).tokens, next(from_disk).tokens)
    val_kwargs = dict(seq=12, global_batch=2, n_batches=2, process_index=0, process_count=1)
    for a, b in zip(
        validation_batches(remote, **val_kwargs), validation_batches(local, **val_kwargs), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert data.load_tokenizer(remote).get_vocab_size() == remote_index["vocab_size"]
    assert (
        data.resolve_training_data([remote], "unused", n_vocab=300, seq=12, tokenizer=None, seed=0) == remote
    )

    with pytest.raises(DataError, match="already holds a dataset"):
        data.prepare_dataset([f"gs://{BUCKET}/raw"], remote, tokenizer_path=tokenizer_path)


def test_bucket_errors_leave_no_index(tmp_path, emulator):
    tokenizer_path = str(tmp_path / "tokenizer.json")
    prepare.train_tokenizer(iter(documents(20)), 280).save(tokenizer_path)
    storage.gcs_blob(f"gs://{BUCKET}/bad/a.jsonl").upload_from_string(json.dumps({"text": "fine"}) + "\n")
    storage.gcs_blob(f"gs://{BUCKET}/bad/b.jsonl.zst").upload_from_string(b"\x28\xb5\x2f\xfd broken")
    with pytest.raises(DataError, match=f"gs://{BUCKET}/bad/b.jsonl.zst: corrupt"):
        data.prepare_dataset([f"gs://{BUCKET}/bad/*"], f"gs://{BUCKET}/out", tokenizer_path=tokenizer_path)
    assert not storage.path_exists(f"gs://{BUCKET}/out/index.json")
    with pytest.raises(DataError, match=f"input not found: gs://{BUCKET}/nothing-here"):
        data.prepare_dataset(
            [f"gs://{BUCKET}/nothing-here"], str(tmp_path / "o"), tokenizer_path=tokenizer_path
        )
    with pytest.raises(DataError, match="not a prepared dataset"):
        Loader(f"gs://{BUCKET}/out", seq=4, global_batch=1, process_index=0, process_count=1)


def test_parquet_and_a_datasets_folder_stream_from_a_bucket(tmp_path, emulator):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(60)
    tokenizer_path = str(tmp_path / "tokenizer.json")
    prepare.train_tokenizer(iter(docs), 300).save(tokenizer_path)
    local = tmp_path / "in"
    local.mkdir()
    pq.write_table(pa.table({"body": docs[:30]}), str(local / "a.parquet"), row_group_size=4)
    datasets.Dataset.from_dict({"body": docs[30:]}).save_to_disk(str(local / "saved"), num_shards=3)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.gcs_blob(f"gs://{BUCKET}/cols/{path.relative_to(local)}").upload_from_filename(str(path))

    options = dict(tokenizer_path=tokenizer_path, val_fraction=0.0, text_column="body")
    remote_inputs = [f"gs://{BUCKET}/cols/a.parquet", f"gs://{BUCKET}/cols/saved"]
    index = data.prepare_dataset(remote_inputs, str(tmp_path / "remote"), **options)
    data.prepare_dataset([str(local / "a.parquet"), str(local / "saved")], str(tmp_path / "local"), **options)
    assert index["documents"] == 60 and index["files"] == 4
    streams = [
        data._TokenStream(str(tmp_path / name), data.read_index(str(tmp_path / name)), "train")
        for name in ("remote", "local")
    ]
    a, b = (s.windows(np.array([0]), s.tokens)[0] for s in streams)
    np.testing.assert_array_equal(a, b)
