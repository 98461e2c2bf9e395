"""Bad inputs to dataset preparation: counted skips for bad lines, one clear error for unusable files.

Whatever fails, no dataset (and no half-written one) is left behind, and the script exits 1 with one line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from mesh_transformer import data, prepare
from mesh_transformer.data import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [json.dumps({"text": f"good document {i}", "meta": {}}).encode() for i in range(3)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    prepare.train_tokenizer(iter(["good document bad text", "other words"] * 20), 280).save(path)
    return path


def bad_lines_file(tmp_path) -> str:
    lines = [
        GOOD[0],
        b'{"text": "truncated docum',  # a line cut off mid-JSON
        b"not json at all",
        json.dumps({"meta": {"no": "text"}}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps(["text"]).encode(),
        b'{"text": "bad \xff\xfe utf8"}',
        b'{"text": "lone surrogate \\ud800"}',
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": "  \n "}).encode(),
        GOOD[1],
        b"",  # blank lines are not documents and not errors
        GOOD[2],
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def assert_nothing_written(tmp_path, out: str) -> None:
    assert not os.path.exists(out)
    leftovers = [n for n in os.listdir(os.path.dirname(out)) if ".partial-" in n]
    assert not leftovers, leftovers


def test_bad_lines_are_counted_and_skipped(tmp_path, tokenizer_path):
    source = bad_lines_file(tmp_path)
    index = data.prepare_dataset(
        [source], str(tmp_path / "out"), tokenizer_path=tokenizer_path, val_fraction=0
    )
    assert index["documents"] == 3
    assert index["skipped"] == {"bad_json": 2, "missing_text": 3, "invalid_utf8": 2, "empty": 2}
    assert index["skipped_examples"]["bad_json"] == f"{source}:2"
    stream = data._TokenStream(str(tmp_path / "out"), index, "train")
    tokens = stream.windows(np.array([0]), stream.tokens)[0].tolist()
    text = data.load_tokenizer(str(tmp_path / "out")).decode(tokens)  # EOS is special: decode drops it
    assert text == "good document 0good document 1good document 2"


def test_strict_makes_the_first_bad_line_fatal(tmp_path, tokenizer_path):
    source = bad_lines_file(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=rf"{source}:2: not a JSON object .*--strict"):
        data.prepare_dataset([source], out, tokenizer_path=tokenizer_path, strict=True)
    assert_nothing_written(tmp_path, out)


def test_invalid_utf8_and_empty_text_files_are_skipped(tmp_path, tokenizer_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"good document")
    (tmp_path / "in" / "b.txt").write_bytes(b"bad \xc3\x28 text")
    (tmp_path / "in" / "c.txt").write_bytes(b"")
    index = data.prepare_dataset([str(tmp_path / "in")], str(tmp_path / "out"), tokenizer_path=tokenizer_path)
    assert (
        index["documents"] == 1 and index["skipped"]["invalid_utf8"] == 1 and index["skipped"]["empty"] == 1
    )


def zst(lines: list[bytes]) -> bytes:
    return zstandard.ZstdCompressor().compress(b"\n".join(lines * 200) + b"\n")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.jsonl.zst", zst(GOOD)[:20] + b"\x00" * 20 + zst(GOOD)[40:], "corrupt or truncated zstd"),
        ("truncated.jsonl.zst", zst(GOOD)[: len(zst(GOOD)) // 2], "corrupt or truncated zstd"),
        ("not_zstd.jsonl.zst", b"plain text pretending to be zstd", "corrupt or truncated zstd"),
        ("truncated.jsonl.gz", gzip.compress(b"\n".join(GOOD * 500), mtime=0)[:100], "gzip"),
        ("weights.bin", bytes(range(256)) * 8, "binary data"),
        ("binary.txt", b"PK\x03\x04\x00\x00zipfile", "binary data"),
    ],
)
def test_unusable_files_are_one_clear_error_and_leave_nothing(
    tmp_path, tokenizer_path, name, content, message
):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(GOOD * 100))
    bad = tmp_path / name
    bad.write_bytes(content)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=message) as error:
        data.prepare_dataset([str(good), str(bad)], out, tokenizer_path=tokenizer_path)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    assert_nothing_written(tmp_path, out)


def test_missing_paths_and_no_documents_are_errors(tmp_path, tokenizer_path):
    out = str(tmp_path / "out")
    for missing in [tmp_path / "nope.jsonl", tmp_path / "dir" / "*.jsonl", tmp_path / "nodir"]:
        with pytest.raises(DataError, match=re.escape(f"input not found: {missing}")):
            data.prepare_dataset([str(missing)], out, tokenizer_path=tokenizer_path)
    with pytest.raises(DataError, match="tokenizer not found"):
        data.prepare_dataset([bad_lines_file(tmp_path)], out, tokenizer_path=str(tmp_path / "tok.json"))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no usable documents.*1 empty"):
        data.prepare_dataset([str(tmp_path / "empty.jsonl")], out, tokenizer_path=tokenizer_path)
    assert_nothing_written(tmp_path, out)


def test_tokenizer_problems_are_errors(tmp_path, tokenizer_path):
    source = bad_lines_file(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="has 280 tokens but the model's n_vocab is 256"):
        data.prepare_dataset([source], out, tokenizer_path=tokenizer_path, max_vocab=256)
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match="not a usable tokenizer.json"):
        data.prepare_dataset([source], out, tokenizer_path=str(tmp_path / "junk.json"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        data.prepare_dataset([source], out, tokenizer_path=str(tmp_path / "noeos.json"))
    assert_nothing_written(tmp_path, out)


def test_existing_output_is_never_overwritten(tmp_path, tokenizer_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not empty"):
        data.prepare_dataset([bad_lines_file(tmp_path)], str(out), tokenizer_path=tokenizer_path)
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_reports_a_summary(tmp_path, tokenizer_path):
    result = run_script(
        "--input",
        bad_lines_file(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--tokenizer",
        tokenizer_path,
        "--val-fraction",
        "0.5",
    )
    assert result.returncode == 0, result.stderr
    assert "3 documents" in result.stdout and "skipped 2 (bad_json)" in result.stdout
    assert os.path.exists(tmp_path / "out" / "index.json")


@pytest.mark.parametrize("case", ["missing", "corrupt", "strict", "vocab"])
def test_script_errors_are_one_line_and_exit_1(tmp_path, tokenizer_path, case):
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    args = {
        "missing": ["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", tokenizer_path],
        "corrupt": ["--input", str(tmp_path / "corrupt.jsonl.zst"), "--tokenizer", tokenizer_path],
        "strict": ["--input", bad_lines_file(tmp_path), "--tokenizer", tokenizer_path, "--strict"],
        "vocab": ["--input", bad_lines_file(tmp_path), "--tokenizer", tokenizer_path, "--max-vocab", "100"],
    }[case]
    result = run_script(*args, "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip() and "preparing" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path, str(tmp_path / "out"))
