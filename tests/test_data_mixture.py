"""Weighted mixtures of prepared datasets: rows in proportion to the weights, each host its own rows, a
position of a few integers that resumes exactly, tokens seen per dataset; and a mixture trained and resumed
from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import TINY_MODEL

from mesh_transformer import data
from mesh_transformer.data import DataError, Loader, MixtureLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS_PER_SET = 100  # dataset d writes only words w{100 d} .. w{100 d + 99}: every token names its dataset


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(3 * WORDS_PER_SET)} | {"<unk>": 300, "<|endoftext|>": 301}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tokenizer.save(path)
    return path


def write_set(path, which: int, documents: int, seed: int = 0, examples: bool = False) -> str:
    rng = np.random.default_rng(seed + which)
    words = lambda n: " ".join(
        f"w{which * WORDS_PER_SET + int(i)}" for i in rng.integers(0, WORDS_PER_SET, n)
    )  # noqa: E731
    with open(path, "w") as f:
        for _ in range(documents):
            record = (
                {"prompt": words(5), "completion": words(20)}
                if examples
                else {"text": words(rng.integers(10, 50))}
            )
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tokenizer_path) -> list[str]:
    """Three datasets of very different sizes (the small one wraps its epochs often)."""
    tmp = tmp_path_factory.mktemp("sets")
    out = []
    for which, documents in enumerate([400, 120, 15]):
        source = write_set(tmp / f"raw{which}.jsonl", which, documents)
        out.append(str(tmp / f"set{which}"))
        data.prepare_dataset(
            [source], out[-1], tokenizer_path=tokenizer_path, val_fraction=0.1, shard_tokens=500
        )
    return out


def origin(rows: np.ndarray) -> np.ndarray:
    """The dataset each row (..., T + 1) was read from: its words' range (EOS, id 301, belongs to none)."""
    words = np.where(rows < 3 * WORDS_PER_SET, rows, 10**6)
    return words.min(axis=-1) // WORDS_PER_SET


WEIGHTS = (0.6, 0.3, 0.1)


def mixture(sets, **kwargs) -> MixtureLoader:
    options = dict(
        seq=8, global_batch=8, gradient_accumulation_steps=2, seed=3, process_index=0, process_count=1
    )
    return MixtureLoader(dict(zip(sets, WEIGHTS, strict=True)), **(options | kwargs))


def test_rows_come_from_each_dataset_in_proportion(sets):
    loader = mixture(sets)
    counts, seen, small_rows = np.zeros(3), 0, []
    for _ in range(150):  # 2,400 rows; the small dataset's epoch is a few dozen rows
        batch = next(loader)
        assert batch.tokens.shape == (2, 8, 9) and batch.loss_mask is None
        for micro in batch.tokens:
            counts += np.bincount(origin(micro), minlength=3)
            seen += len(micro)
            small_rows += [tuple(r) for r in micro[origin(micro) == 2]]
            # after every micro-batch each dataset has had its share to within a row
            assert np.abs(counts - np.array(WEIGHTS) * seen).max() <= 1.0, (counts, seen)
    assert loader.tokens_seen() == {f"set{i}": int(counts[i]) * 8 for i in range(3)}
    # each epoch of a dataset reads all of its windows once, in a new order
    n = loader.rows[2]
    epochs = [small_rows[e * n : (e + 1) * n] for e in range(len(small_rows) // n)]
    assert len(epochs) >= 3 and all(len(set(e)) == n and set(e) == set(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1]


def test_each_process_reads_its_own_rows_of_the_same_batches(sets):
    whole = mixture(sets)
    halves = [mixture(sets, process_index=p, process_count=2) for p in range(2)]
    for _ in range(20):
        expected = next(whole).tokens
        np.testing.assert_array_equal(np.concatenate([next(h).tokens for h in halves], axis=1), expected)


def test_a_position_of_a_few_integers_resumes_exactly_mid_epoch(sets):
    uninterrupted = mixture(sets)
    for _ in range(40):  # the big dataset in its first epoch, the small one in the middle of a later one
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    drawn = [entry["drawn"] for entry in state["mixture"]]
    assert drawn[0] < uninterrupted.rows[0] and drawn[2] > uninterrupted.rows[2]
    assert drawn[2] % uninterrupted.rows[2] and drawn[0] % uninterrupted.rows[0]
    assert all(
        isinstance(v, int) for e in state["mixture"] for k, v in e.items() if k not in ("path", "weight")
    )
    resumed = mixture(sets, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert not resumed.mixture_changed
    for _ in range(5):
        a, b = next(resumed), next(uninterrupted)
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert resumed.tokens_seen() == uninterrupted.tokens_seen()


def test_new_weights_continue_each_dataset_where_it_was(sets):
    before = mixture(sets)
    for _ in range(5):
        next(before)
    state = before.state_dict()
    changed = MixtureLoader(
        {sets[0]: 0.5, sets[1]: 0.5}, seq=8, global_batch=8, gradient_accumulation_steps=2, seed=3,
        process_index=0, process_count=1,
    )  # fmt: skip
    changed.load_state_dict(state)
    assert changed.mixture_changed and list(changed.since) == [0, 0]
    assert list(changed.drawn) == [e["drawn"] for e in state["mixture"][:2]]
    rows = next(changed).tokens.reshape(-1, 9)
    np.testing.assert_array_equal(np.bincount(origin(rows), minlength=3), [8, 8, 0])
    # dataset 0 goes on with the rows an unchanged mixture would have given it next
    continued = [tuple(r) for r in rows[origin(rows) == 0]]
    ahead = [
        tuple(r) for _ in range(4) for r in next(before).tokens.reshape(-1, 9) if origin(r[None])[0] == 0
    ]
    assert continued == ahead[: len(continued)]


def test_positions_of_one_dataset_and_of_a_mixture_are_not_confused(sets):
    single = Loader(sets[0], seq=8, global_batch=8, process_index=0, process_count=1)
    with pytest.raises(DataError, match="trained on one dataset"):
        mixture(sets).load_state_dict(single.state_dict())
    with pytest.raises(DataError, match="trained on a mixture"):
        single.load_state_dict(mixture(sets).state_dict())


def test_mixtures_check_their_datasets(tmp_path, sets):
    with pytest.raises(DataError, match="not a prepared dataset"):
        data.resolve_mixture({sets[0]: 1, str(tmp_path): 1}, n_vocab=512)
    other = str(tmp_path / "other")
    data.prepare_dataset([write_set(tmp_path / "o.jsonl", 0, 30)], other, train_tokenizer_vocab=300)
    with pytest.raises(DataError, match="another tokenizer"):
        data.resolve_mixture({sets[0]: 1, other: 1}, n_vocab=512)
    with pytest.raises(DataError, match="n_vocab is 100"):
        data.resolve_mixture({sets[0]: 1}, n_vocab=100)
    assert data.resolve_mixture({sets[0]: 3, sets[1]: 1}, n_vocab=512) == {sets[0]: 0.75, sets[1]: 0.25}


def prepare_script(*args: str) -> None:
    command = [sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_mixture_with_a_fine_tuning_set_trains_and_resumes_from_the_command_line(tmp_path, tokenizer_path):
    """A text dataset and a prompt/completion set, mixed 3:1, with the document mask on: tokens seen per
    dataset and validation loss of each are logged, and a second run resumes the mixture's position."""
    text, tuning = str(tmp_path / "text"), str(tmp_path / "tuning")
    prepare_script(
        "--input", write_set(tmp_path / "t.jsonl", 0, 300), "--output", text, "--tokenizer", tokenizer_path
    )
    prepare_script(
        "--input", write_set(tmp_path / "e.jsonl", 1, 300, examples=True), "--output", tuning,
        "--tokenizer", tokenizer_path, "--val-fraction", "0.2",
    )  # fmt: skip
    config = dict(TINY_MODEL, tpu_size=8, cores_per_replica=2, per_replica_batch=2, total_steps=5)
    config.update(warmup_steps=1, anneal_steps=4, compute_dtype="float32", remat="none", ckpt_every=2)
    config.update(val_batches=1, val_every=3, document_mask=True, train_set={text: 3, tuning: 1})
    (tmp_path / "mix.json").write_text(json.dumps(config))
    model_dir = str(tmp_path / "run")

    def train(steps: int) -> None:
        command = [
            sys.executable,
            os.path.join(REPO, "device_train.py"),
            "--config",
            str(tmp_path / "mix.json"),
        ]
        command += ["--model-dir", model_dir, "--steps", str(steps), "--no-progress", "--sample-tokens", "0"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    train(3)
    checkpoint = json.load(open(os.path.join(model_dir, "step_3", "checkpoint.json")))
    position = checkpoint["extra"]["loader"]
    assert [e["path"] for e in position["mixture"]] == [text, tuning]
    assert sum(e["drawn"] for e in position["mixture"]) == 3 * 8  # 3 steps of 8 rows
    train(5)
    logged = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    steps = [m for m in logged if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    assert any(m.get("event") == "resume" and m["step"] == 3 for m in logged)
    last = steps[-1]
    assert last["tokens_seen/text"] + last["tokens_seen/tuning"] == last["tokens_seen"] == 5 * 8 * 16
    assert last["tokens_seen/text"] == 30 * 16  # 30 of the 40 rows: 3:1
    assert {"val/text/loss", "val/tuning/loss"} <= set(steps[2]) and np.isfinite(steps[2]["val/tuning/loss"])
