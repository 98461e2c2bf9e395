"""Parquet, Arrow and `datasets` folders as inputs: the same tokens as JSON lines, streamed a record batch at
a time, a text column of the user's choice, and bad files stopped with one line and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import expected_stream, make_documents, split_stream, tokenizer_path, write_jsonl  # noqa: F401
from test_data_bad_input import assert_nothing_written

from mesh_transformer import data, sources
from mesh_transformer.data import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_parquet(path, columns: dict, row_group_size: int = 7) -> str:
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def prepare(inputs, out, tokenizer_path, **kwargs) -> dict:  # noqa: F811
    return data.prepare_dataset([str(i) for i in inputs], str(out), tokenizer_path=tokenizer_path, **kwargs)


def test_parquet_arrow_and_datasets_folders_give_the_tokens_of_json_lines(tmp_path, tokenizer_path):  # noqa: F811
    import datasets

    documents = make_documents(40)
    write_parquet(tmp_path / "a.parquet", {"id": list(range(20)), "body": documents[:20]})
    table = pa.table({"body": documents[20:30]})
    with pa.ipc.new_stream(str(tmp_path / "b.arrow"), table.schema) as writer:  # IPC stream format
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    with pa.ipc.new_file(str(tmp_path / "c.arrow"), table.schema) as writer:  # IPC file format
        writer.write_table(pa.table({"body": documents[30:35]}), max_chunksize=2)
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": documents[35:], "n": list(range(5))}).save_to_disk(
        str(folder), num_shards=2
    )

    inputs = [tmp_path / "a.parquet", tmp_path / "b.arrow", tmp_path / "c.arrow", folder]
    index = prepare(inputs, tmp_path / "out", tokenizer_path, val_fraction=0.0, text_column="body")
    assert index["documents"] == 40 and index["files"] == 5  # the folder is its two Arrow files
    np.testing.assert_array_equal(
        split_stream(str(tmp_path / "out"), "train"), expected_stream(tokenizer_path, documents)
    )
    # JSON lines read the same field
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    prepare([lines], tmp_path / "from_json", tokenizer_path, val_fraction=0.0, text_column="body")
    np.testing.assert_array_equal(
        split_stream(str(tmp_path / "from_json"), "train"), split_stream(str(tmp_path / "out"), "train")
    )


def test_nulls_and_empty_strings_are_counted_skips(tmp_path, tokenizer_path):  # noqa: F811
    source = write_parquet(tmp_path / "a.parquet", {"text": ["one doc", None, "", "  ", "two doc"]})
    index = prepare([source], tmp_path / "out", tokenizer_path, val_fraction=0.0)
    assert index["documents"] == 2
    assert index["skipped"]["missing_text"] == 1 and index["skipped"]["empty"] == 2
    assert index["skipped_examples"]["missing_text"] == f"{source}: row 2"


def test_parquet_is_read_a_record_batch_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh "), 20_000)) for _ in range(400)]  # 8 MB of text
    source = write_parquet(tmp_path / "big.parquet", {"text": texts}, row_group_size=20)
    size = os.path.getsize(source)
    reader = sources.Source(source, size)
    peak, count, positions = 0, 0, []
    for document in reader.documents(sources.SkipCounter(strict=True)):
        peak = max(peak, pa.total_allocated_bytes())
        count += len(document) > 0
        positions.append(reader.position)
    assert count == 400
    # a row group (20 texts, 400 kB) at a time, with its decoding buffers; never the 8 MB column
    assert peak < 8_000_000 / 4, f"{peak} bytes of Arrow memory held at once for an 8 MB column"
    assert positions == sorted(positions) and positions[-1] > 0 and reader.position == size


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_parquet", "not a Parquet file"),
        ("no_column", "no column 'text' \\(columns: id, body\\); pass --text-column"),
        ("numbers", "column 'text' holds int64, expected strings"),
        ("truncated", "not a Parquet file"),
        ("arrow_garbage", "not an Arrow IPC file"),
        ("dataset_dict", "holds several `datasets` splits \\(test, train\\); pass one split's folder"),
    ],
)
def test_unusable_columnar_inputs_are_one_line_and_leave_nothing(tmp_path, tokenizer_path, case, message):  # noqa: F811
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(5))
    if case == "dataset_dict":
        import datasets

        split = datasets.Dataset.from_dict({"text": ["a"]})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "bad"))
        bad = str(tmp_path / "bad")
    elif case == "arrow_garbage":
        bad = str(tmp_path / "bad.arrow")
        open(bad, "wb").write(b"this is not arrow at all" * 10)
    else:
        bad = str(tmp_path / "bad.parquet")
        if case == "not_parquet":
            open(bad, "w").write("plain text that is not Parquet\n" * 20)
        elif case == "no_column":
            write_parquet(bad, {"id": [1, 2], "body": ["a", "b"]})
        elif case == "numbers":
            write_parquet(bad, {"text": [1, 2, 3]})
        else:
            write_parquet(tmp_path / "whole.parquet", {"text": make_documents(50)})
            content = open(tmp_path / "whole.parquet", "rb").read()
            open(bad, "wb").write(content[: len(content) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as error:
        prepare([good, bad], out, tokenizer_path)
    assert bad in str(error.value) and "\n" not in str(error.value)
    assert_nothing_written(tmp_path, str(out))


def test_script_reads_parquet_with_a_text_column(tmp_path, tokenizer_path):  # noqa: F811
    source = write_parquet(tmp_path / "a.parquet", {"content": make_documents(30)})
    script = os.path.join(REPO, "scripts", "prepare_data.py")
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, script, "--input", source, "--tokenizer", tokenizer_path, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = run("--output", str(tmp_path / "out"), "--text-column", "content")
    assert result.returncode == 0, result.stderr
    assert "30 documents" in result.stdout
    result = run("--output", str(tmp_path / "out2"))  # default column "text": absent
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "preparing" not in line]
    assert lines == [
        f"error: {source}: no column 'text' (columns: content); pass --text-column NAME, "
        "or give 'prompt' and 'completion' columns for fine-tuning examples"
    ], result.stderr
    assert not os.path.exists(tmp_path / "out2")
