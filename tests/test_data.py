"""Data pipeline: preparation round trip, disjoint per-process loading, O(1) resume, fixed validation."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import numpy as np
import pytest
import zstandard

from mesh_transformer import data, prepare
from mesh_transformer.data import DataError, Loader, validation_batches

WORDS = ["alpha", "beta", "gamma", "delta", "naïve", "café", "日本語", "emoji🙂", "x", "def", "return", "\n"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Distinct documents of varied length, so every window of the packed stream is unique."""
    rng = np.random.default_rng(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 60))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    prepare.train_tokenizer(iter(make_documents(200, seed=99)), 300).save(path)
    return path


def write_jsonl(path, documents, compress=None) -> str:
    body = "".join(json.dumps({"text": d, "meta": {"i": i}}) + "\n" for i, d in enumerate(documents)).encode()
    if compress == "zst":
        body = zstandard.ZstdCompressor().compress(body)
    elif compress == "gz":
        body = gzip.compress(body)
    path.write_bytes(body)
    return str(path)


def expected_stream(tokenizer_path: str, documents: list[str]) -> np.ndarray:
    tokenizer, _ = prepare.read_tokenizer_file(tokenizer_path)
    eos = prepare.eos_id_of(tokenizer, tokenizer_path)
    ids: list[int] = []
    for d in documents:
        ids += tokenizer.encode(d, add_special_tokens=False).ids + [eos]
    return np.array(ids)


def split_stream(dataset: str, split: str) -> np.ndarray:
    index = data.read_index(dataset)
    stream = data._TokenStream(dataset, index, split)
    return stream.windows(np.array([0]), stream.tokens)[0]


def prepared(tmp_path, tokenizer_path, documents, **kwargs) -> str:
    out = str(tmp_path / "dataset")
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    data.prepare_dataset([source], out, tokenizer_path=tokenizer_path, **kwargs)
    return out


# ----------------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_gives_back_document_tokens_in_order_with_eos_between(tmp_path, tokenizer_path):
    documents = make_documents(40)
    out = prepared(tmp_path, tokenizer_path, documents, val_fraction=0.2, shard_tokens=97, seed=3)
    index = data.read_index(out)
    train, val = index["splits"]["train"], index["splits"]["validation"]
    assert len(train["shards"]) > 3 and train["documents"] > 0 and val["documents"] > 0
    assert train["documents"] + val["documents"] == 40 == index["documents"]

    tokenizer = data.load_tokenizer(out)
    eos = index["eos_id"]
    decoded = {}
    for split in ("train", "validation"):
        stream = split_stream(out, split)
        assert stream[-1] == eos
        pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
        decoded[split] = [tokenizer.decode(p[:-1].tolist()) for p in pieces]
    # Every document lands in exactly one split, in input order within it.
    assert sorted(decoded["train"] + decoded["validation"]) == sorted(documents)
    assert decoded["train"] == [d for d in documents if d in set(decoded["train"])]
    kept = [d for d in documents if d in set(decoded["train"])]
    np.testing.assert_array_equal(split_stream(out, "train"), expected_stream(tokenizer_path, kept))


def test_loader_epoch_covers_every_window_of_the_stream_once(tmp_path, tokenizer_path):
    documents = make_documents(30)
    out = prepared(tmp_path, tokenizer_path, documents, val_fraction=0.0, shard_tokens=50)
    stream = expected_stream(tokenizer_path, documents)
    seq = 7
    windows = [tuple(stream[r * seq : r * seq + seq + 1]) for r in range((len(stream) - 1) // seq)]
    loader = Loader(out, seq=seq, global_batch=1, process_index=0, process_count=1)
    assert loader.batches_per_epoch == len(windows)
    rows = [tuple(next(loader).tokens[0, 0]) for _ in range(len(windows))]
    assert sorted(rows) == sorted(windows)
    assert rows != windows  # shuffled
    assert loader.state_dict()["epoch"] == 0


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<|endoftext|>": 70_001}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "big.json"))
    documents = ["w69999 w1 w65536", "w2 w66000", "w3"]
    out = prepared(tmp_path, str(tmp_path / "big.json"), documents, val_fraction=0.0)
    assert data.read_index(out)["dtype"] == "uint32"
    np.testing.assert_array_equal(
        split_stream(out, "train"), [69999, 1, 65536, 70001, 2, 66000, 70001, 3, 70001]
    )


def test_input_formats_and_directories_give_identical_tokens(tmp_path, tokenizer_path):
    documents = make_documents(12)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "in" / "a.jsonl.zst", documents[:4], "zst")
    write_jsonl(tmp_path / "in" / "b.json.zst", documents[4:6], "zst")
    write_jsonl(tmp_path / "in" / "c.jsonl.gz", documents[6:8], "gz")
    write_jsonl(tmp_path / "in" / "sub" / "d.jsonl", documents[8:10])
    (tmp_path / "in" / "sub" / "e.txt").write_text(documents[10])
    (tmp_path / "in" / "sub" / "f.md").write_text(documents[11])  # any other name is plain text
    (tmp_path / "in" / ".hidden").write_bytes(b"\x00\x01")  # hidden files are not inputs
    out = str(tmp_path / "out")
    index = data.prepare_dataset([str(tmp_path / "in")], out, tokenizer_path=tokenizer_path, val_fraction=0.0)
    assert index["documents"] == 12 and index["files"] == 6
    np.testing.assert_array_equal(split_stream(out, "train"), expected_stream(tokenizer_path, documents))

    globbed = str(tmp_path / "globbed")
    index = data.prepare_dataset(
        [str(tmp_path / "in" / "*.zst")], globbed, tokenizer_path=tokenizer_path, val_fraction=0.0
    )
    assert index["documents"] == 6


def test_worker_processes_give_the_same_dataset_as_one_process(tmp_path, tokenizer_path):
    documents = make_documents(300)
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    old_chunk = prepare.CHUNK_CHARS
    prepare.CHUNK_CHARS = 500  # many chunks, so the two workers interleave
    try:
        for workers in (1, 2):
            data.prepare_dataset(
                [source],
                str(tmp_path / f"w{workers}"),
                tokenizer_path=tokenizer_path,
                workers=workers,
                val_fraction=0.1,
            )
    finally:
        prepare.CHUNK_CHARS = old_chunk
    for split in ("train", "validation"):
        np.testing.assert_array_equal(
            split_stream(str(tmp_path / "w1"), split), split_stream(str(tmp_path / "w2"), split)
        )


def test_small_corpus_still_gets_a_validation_split(tmp_path, tokenizer_path):
    out = prepared(tmp_path, tokenizer_path, make_documents(2), val_fraction=0.01)
    index = data.read_index(out)
    assert index["splits"]["validation"]["documents"] == 1 and index["splits"]["train"]["documents"] == 1


def test_trained_tokenizer_is_copied_and_used(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(50))
    out = str(tmp_path / "out")
    index = data.prepare_dataset([source], out, train_tokenizer_vocab=320, val_fraction=0.0)
    assert index["vocab_size"] <= 320
    tokenizer = data.load_tokenizer(out)
    np.testing.assert_array_equal(
        split_stream(out, "train"), expected_stream(os.path.join(out, "tokenizer.json"), make_documents(50))
    )
    assert tokenizer.token_to_id("<|endoftext|>") == index["eos_id"]


# ----------------------------------------------------------------------------------------------------------
# Loader: processes, resume, validation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_path) -> str:
    tmp = tmp_path_factory.mktemp("ds")
    return prepared(tmp, tokenizer_path, make_documents(300), val_fraction=0.1, shard_tokens=1000)


def test_two_processes_read_disjoint_rows_that_together_form_the_global_batch(dataset):
    kwargs = dict(seq=16, global_batch=8, gradient_accumulation_steps=2, seed=5)
    whole = Loader(dataset, process_index=0, process_count=1, **kwargs)
    parts = [Loader(dataset, process_index=p, process_count=2, **kwargs) for p in range(2)]
    seen = []
    for _ in range(whole.batches_per_epoch // 2):
        expected = next(whole).tokens
        got = [next(p).tokens for p in parts]
        assert got[0].shape == (2, 4, 17) and got[0].dtype == np.int32
        np.testing.assert_array_equal(np.concatenate(got, axis=1), expected)
        seen += [tuple(r) for g in got for r in g.reshape(-1, 17)]
    # Every window is read at most as often as it occurs in the stream: once, by one process.
    stream = split_stream(dataset, "train")
    windows = Counter(tuple(stream[r * 16 : r * 16 + 17]) for r in range(whole.rows))
    assert not Counter(seen) - windows
    assert len(seen) == whole.batches_per_epoch // 2 * 2 * 8


def test_resume_after_k_batches_continues_exactly(dataset):
    kwargs = dict(
        seq=16, global_batch=6, gradient_accumulation_steps=3, seed=1, process_index=1, process_count=2
    )
    uninterrupted = Loader(dataset, **kwargs)
    k = uninterrupted.batches_per_epoch // 3 + 2  # crosses an epoch boundary
    for _ in range(k):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    assert state["epoch"] == 1 and all(isinstance(v, int) for v in state.values())
    resumed = Loader(dataset, **(kwargs | {"seed": 999}))  # the state's seed wins
    resumed.load_state_dict(state)
    for _ in range(3):
        np.testing.assert_array_equal(next(resumed).tokens, next(uninterrupted).tokens)


def test_epochs_and_seeds_give_different_orders(dataset):
    def first_batches(seed, skip_epochs):
        loader = Loader(dataset, seq=16, global_batch=4, seed=seed, process_index=0, process_count=1)
        loader.load_state_dict({"seed": seed, "epoch": skip_epochs, "position": 0})
        return next(loader).tokens

    assert not np.array_equal(first_batches(0, 0), first_batches(0, 1))
    assert not np.array_equal(first_batches(0, 0), first_batches(1, 0))
    np.testing.assert_array_equal(first_batches(2, 3), first_batches(2, 3))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    order = data._permute(np.arange(n), n, seed=7, epoch=2)
    assert sorted(order.tolist()) == list(range(n))


def test_validation_batches_are_fixed_and_split_between_processes(dataset):
    first = validation_batches(dataset, seq=16, global_batch=4, n_batches=3, process_index=0, process_count=1)
    again = validation_batches(dataset, seq=16, global_batch=4, n_batches=3, process_index=0, process_count=1)
    halves = [
        validation_batches(dataset, seq=16, global_batch=4, n_batches=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert len(first) == 3 and first[0].shape == (4, 17) and first[0].dtype == np.int32
    for b in range(3):
        np.testing.assert_array_equal(first[b], again[b])
        np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), first[b])
    val = split_stream(dataset, "validation")
    np.testing.assert_array_equal(first[0][1], val[16:33])


def test_loader_defaults_to_the_jax_process(dataset):
    loader = Loader(dataset, seq=16, global_batch=2)
    assert next(loader).tokens.shape == (1, 2, 17)
    assert loader.vocab_size == data.read_index(dataset)["vocab_size"] and loader.eos_id >= 0


def test_too_small_dataset_and_bad_batch_are_clear_errors(tmp_path, tokenizer_path, dataset):
    out = prepared(tmp_path, tokenizer_path, make_documents(3), val_fraction=0.0)
    with pytest.raises(DataError, match="too small"):
        Loader(out, seq=64, global_batch=8, process_index=0, process_count=1)
    with pytest.raises(DataError, match="no validation data"):
        validation_batches(out, seq=8, global_batch=2, n_batches=1, process_index=0, process_count=1)
    with pytest.raises(DataError, match="multiple of the 3 processes"):
        Loader(dataset, seq=16, global_batch=4, process_index=0, process_count=3)
    loader = Loader(dataset, seq=16, global_batch=4, process_index=0, process_count=1)
    with pytest.raises(DataError, match="not valid"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="not a prepared dataset"):
        Loader(str(tmp_path), seq=16, global_batch=4, process_index=0, process_count=1)


# ----------------------------------------------------------------------------------------------------------
# resolve_training_data


def test_resolve_prepares_once_and_reuses(tmp_path, tokenizer_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(50))
    model_dir = str(tmp_path / "run")
    with pytest.raises(DataError, match="--tokenizer"):
        data.resolve_training_data([source], model_dir, n_vocab=512, seq=16, tokenizer=None, seed=0)
    with pytest.raises(DataError, match="missing.jsonl"):
        data.resolve_training_data(
            [str(tmp_path / "missing.jsonl")],
            model_dir,
            n_vocab=512,
            seq=16,
            tokenizer=tokenizer_path,
            seed=0,
        )
    path = data.resolve_training_data(
        [source], model_dir, n_vocab=512, seq=16, tokenizer=tokenizer_path, seed=0
    )
    assert path == os.path.join(model_dir, "dataset")
    stamp = os.stat(os.path.join(path, "index.json")).st_mtime_ns
    again = data.resolve_training_data(
        [source], model_dir, n_vocab=512, seq=16, tokenizer=tokenizer_path, seed=0
    )
    assert again == path and os.stat(os.path.join(path, "index.json")).st_mtime_ns == stamp
    # A prepared directory is used as it is; a model too small for its vocabulary is refused.
    assert (
        data.resolve_training_data([path], "elsewhere", n_vocab=512, seq=16, tokenizer=None, seed=0) == path
    )
    with pytest.raises(DataError, match="n_vocab is 100"):
        data.resolve_training_data([path], "elsewhere", n_vocab=100, seq=16, tokenizer=None, seed=0)
    # Other inputs into the same model_dir do not silently reuse (or overwrite) the old dataset.
    other = write_jsonl(tmp_path / "other.jsonl", make_documents(5, seed=1))
    with pytest.raises(DataError, match="other inputs"):
        data.resolve_training_data([other], model_dir, n_vocab=512, seq=16, tokenizer=tokenizer_path, seed=0)


def test_demo_corpus_prepares_and_is_cached(tmp_path):
    files = data.default_corpus_files()
    assert files == sorted(files) and len(files) > 50
    path = data.resolve_training_data(None, str(tmp_path), n_vocab=1024, seq=128, tokenizer=None, seed=0)
    index = data.read_index(path)
    assert index["vocab_size"] <= 1024 and index["splits"]["train"]["tokens"] > 500_000
    assert (
        data.resolve_training_data(None, str(tmp_path), n_vocab=1024, seq=128, tokenizer=None, seed=0) == path
    )
    assert next(Loader(path, seq=128, global_batch=16)).tokens.max() < index["vocab_size"]
    assert len(validation_batches(path, seq=128, global_batch=16, n_batches=4)) == 4


def test_progress_bar_runs_forward_and_ends_at_the_input_bytes(tmp_path, tokenizer_path, monkeypatch):
    import tqdm

    files = [write_jsonl(tmp_path / f"part{i}.jsonl", make_documents(150, seed=i)) for i in range(3)]
    total = sum(os.path.getsize(f) for f in files)
    shown: list[float] = []

    class RecordingBar(tqdm.tqdm):
        def update(self, n=1):
            assert n >= 0, f"the bar went back by {-n} bytes"
            super().update(n)
            shown.append(self.n)

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)  # many chunks per file
    data.prepare_dataset(files, str(tmp_path / "out"), tokenizer_path=tokenizer_path, progress=True)
    assert len(shown) > 10 and shown == sorted(shown)
    assert shown[-1] == total


# ----------------------------------------------------------------------------------------------------------
# Splits that the hash alone would leave empty


@pytest.mark.parametrize("seed", range(4))
def test_one_large_document_is_cut_so_that_both_splits_get_windows(tmp_path, tokenizer_path, seed):
    text = " ".join(make_documents(300, seed=seed))  # one .txt file is one document
    (tmp_path / "corpus.txt").write_text(text)
    out = str(tmp_path / "out")
    index = data.prepare_dataset(
        [str(tmp_path / "corpus.txt")],
        out,
        tokenizer_path=tokenizer_path,
        seq=64,
        val_fraction=0.01,
        seed=seed,
    )
    train, val = split_stream(out, "train"), split_stream(out, "validation")
    whole = expected_stream(tokenizer_path, [text])
    assert len(val) == max(-(-len(whole) // 100), 65)  # val_fraction of the tokens, at least one window
    assert len(train) >= 65 and not index["warnings"]
    # the document's end goes to validation; the train part ends with an EOS of its own
    eos = index["eos_id"]
    np.testing.assert_array_equal(np.concatenate([train[:-1], val]), whole)
    assert train[-1] == eos and index["splits"]["validation"]["documents"] == 1


def test_documents_all_hashed_to_validation_go_to_train_first(tmp_path, tokenizer_path):
    documents = make_documents(3)
    out = prepared(tmp_path, tokenizer_path, documents, val_fraction=0.9, seq=8, seed=1)
    index = data.read_index(out)
    # seed 1 sends all three documents to validation; train gets them and validation the last one
    assert index["splits"]["train"]["documents"] == 2 and index["splits"]["validation"]["documents"] == 1
    np.testing.assert_array_equal(split_stream(out, "train"), expected_stream(tokenizer_path, documents[:2]))


def test_inputs_too_small_for_both_splits_say_so(tmp_path, tokenizer_path):
    out = prepared(tmp_path, tokenizer_path, ["a tiny corpus"], val_fraction=0.1, seq=64)
    tokens = data.read_index(out)["tokens"]
    assert data.read_index(out)["warnings"] == [
        f"the train split holds {tokens} tokens, less than one window of seq + 1 = 65 tokens (the inputs "
        f"give {tokens} tokens in all); use more data or a smaller --seq",
        "the validation split holds 0 tokens, less than one window of seq + 1 = 65 tokens (the inputs give "
        f"{tokens} tokens in all); use more data or a smaller --seq, or --val-fraction 0",
    ]


def tiny_train_config(tmp_path) -> str:
    from helpers import TINY_MODEL

    config = dict(TINY_MODEL, tpu_size=8, cores_per_replica=2, per_replica_batch=2, total_steps=2)
    config.update(warmup_steps=1, anneal_steps=2, compute_dtype="float32", remat="none", val_batches=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
def test_a_corpus_that_is_one_text_file_trains_from_the_command_line(tmp_path):
    import subprocess
    import sys

    text = "".join(open(f, encoding="utf-8").read() for f in data.default_corpus_files()[:40])[:600_000]
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "small.txt").write_text("far too little text to train on")
    tokenizer = str(tmp_path / "tokenizer.json")
    prepare.train_tokenizer(iter([text[:100_000]]), 384).save(tokenizer)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "device_train.py")

    def train(corpus: str, model_dir: str) -> subprocess.CompletedProcess:
        command = [sys.executable, script, "--config", tiny_train_config(tmp_path), "--model-dir", model_dir]
        command += ["--data", corpus, "--tokenizer", tokenizer, "--no-progress", "--sample-tokens", "0"]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    result = train(str(tmp_path / "corpus.txt"), str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    index = data.read_index(str(tmp_path / "run" / "dataset"))
    assert min(s["tokens"] for s in index["splits"].values()) >= 17 and not index["warnings"]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [m for m in logged if "loss" in m]  # events (the checkpoint's commit) come between them
    assert [m["step"] for m in steps] == [1, 2]
    assert "val/default/loss" in steps[-1]

    result = train(str(tmp_path / "small.txt"), str(tmp_path / "small_run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("warning: the validation split holds 0 tokens")
    assert lines[1].startswith("error: ") and "train split is too small" in lines[1]
