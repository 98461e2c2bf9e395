"""Fine-tuning sets and packed documents: prompt/completion examples are prepared with a loss mask that
training and validation apply (checked against `transformers` GPT-J with ignored labels), and the
document mask gives every document of a packed row the logits it gets alone."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_data import make_documents, split_stream, tokenizer_path  # noqa: F401
from test_model import gptj_of, random_hf_model

from mesh_transformer import data, evaluation, prepare, sharding
from mesh_transformer.config import from_dict
from mesh_transformer.data import Batch
from mesh_transformer.hf import params_from_hf
from mesh_transformer.models import build, model_for
from mesh_transformer.train import Trainer, cross_entropy

VOCAB = 320  # the random transformers model's; room for the test tokenizer's 300
HF_SHAPE = dict(n_embd=32, n_head=4, n_layer=1, rotary_dim=4, vocab=VOCAB)  # small: one compile is seconds


def examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    documents = make_documents(2 * n, seed)
    return [(documents[2 * i] + " Q:", " A: " + documents[2 * i + 1]) for i in range(n)]


def write_mixed(path, texts: list[str], pairs: list[tuple[str, str]]) -> str:
    """Plain documents first (so the first shards need no mask), then fine-tuning examples."""
    lines = [{"text": t} for t in texts] + [{"prompt": p, "completion": c} for p, c in pairs]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_examples_are_prepared_with_a_loss_mask_on_their_completions(tmp_path, tokenizer_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 200)  # the plain documents come in chunks of their own
    texts, pairs = make_documents(6, seed=3), examples(20)
    source = write_mixed(tmp_path / "mixed.jsonl", texts, pairs)
    out = str(tmp_path / "out")
    index = data.prepare_dataset(
        [source], out, tokenizer_path=tokenizer_path, val_fraction=0.0, shard_tokens=64
    )
    assert index["examples"] == 20 and index["documents"] == 26
    shards = index["splits"]["train"]["shards"]
    assert "loss_mask" not in shards[0] and "loss_mask" in shards[-1]  # masks start with the first example

    tokenizer, _ = prepare.read_tokenizer_file(tokenizer_path)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    eos = index["eos_id"]
    tokens, mask = [], []
    for text in texts:
        ids = encode(text) + [eos]
        tokens += ids
        mask += [1] * len(ids)
    for prompt, completion in pairs:
        tokens += encode(prompt) + encode(completion) + [eos]
        mask += [0] * len(encode(prompt)) + [1] * (len(encode(completion)) + 1)
    np.testing.assert_array_equal(split_stream(out, "train"), tokens)
    stream = data._TokenStream(out, index, "train")
    np.testing.assert_array_equal(stream.loss_mask_windows(np.array([0]), stream.tokens)[0], mask)

    # the loader and the validation batches carry the mask of exactly the windows they read
    loader = data.Loader(
        out, seq=16, global_batch=4, gradient_accumulation_steps=2, process_index=0, process_count=1
    )
    for _ in range(3):
        batch = next(loader)
        assert batch.loss_mask.shape == batch.tokens.shape == (2, 4, 17) and batch.segment_ids is None
        for row_tokens, row_mask in zip(
            batch.tokens.reshape(-1, 17), batch.loss_mask.reshape(-1, 17), strict=True
        ):
            starts = [
                o for o in range(0, len(tokens) - 16, 16) if list(tokens[o : o + 17]) == list(row_tokens)
            ]
            assert any(list(mask[o : o + 17]) == list(row_mask) for o in starts)
    plain = data.prepare_dataset(
        [write_mixed(tmp_path / "plain.jsonl", texts, [])],
        str(tmp_path / "plain"),
        tokenizer_path=tokenizer_path,
    )
    assert plain["examples"] == 0 and not any("loss_mask" in s for s in plain["splits"]["train"]["shards"])


def tiny_trainer(dp: int = 2, mp: int = 2, **changes) -> Trainer:
    keys = dict(layers=1, d_model=32, n_heads=4, n_vocab=VOCAB, seq=24, pe_rotary_dims=4, z_loss=0.0)
    keys.update(compute_dtype="float32", remat="none", tpu_size=dp * mp, cores_per_replica=mp)
    keys.update(per_replica_batch=4 // dp)
    keys.update(changes)
    config = from_dict(keys)
    return Trainer(config, sharding.make_mesh(dp, mp, jax.devices()[: dp * mp]))


@pytest.fixture(scope="module")
def one_device() -> Trainer:
    """The trainer most tests share (each Trainer compiles its own step)."""
    return tiny_trainer(dp=1, mp=1)


def masked_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (4, 25), dtype=np.int32)
    mask = np.zeros((4, 25), np.uint8)
    for row, start in enumerate([3, 10, 0, 20]):  # a prompt of `start` tokens, then the completion
        mask[row, start:] = 1
    return tokens, mask


def test_masked_loss_and_gradients_equal_transformers_with_ignored_labels():
    hf = random_hf_model(**HF_SHAPE)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    trainer = tiny_trainer()
    params = jax.device_put(
        params_from_hf(tensors, model_for(trainer.config)), trainer.state_shardings.params
    )
    tokens, mask = masked_batch()

    def loss(p, b):
        with sharding.activation_sharding(trainer.mesh):
            return jax.value_and_grad(trainer._loss, has_aux=True)(p, b)

    batch = Batch(tokens, mask)
    (_, ours), grads = jax.jit(loss)(params, jax.device_put(batch, trainer.eval_batch_sharding))

    labels = torch.from_numpy(np.where(mask > 0, tokens, -100)).long()
    theirs = hf(torch.from_numpy(tokens).long(), labels=labels).loss
    theirs.backward()
    hf_grads = params_from_hf(
        {k: p.grad.numpy() for k, p in hf.named_parameters()}, model_for(trainer.config)
    )
    assert float(ours) == pytest.approx(float(theirs.detach()), rel=1e-5)
    for (path, ours_g), theirs_g in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(grads)),
        jax.tree_util.tree_leaves(hf_grads),
        strict=True,
    ):
        np.testing.assert_allclose(ours_g, theirs_g, atol=2e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_masked_targets_get_zero_gradient(one_device):
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 24, VOCAB))
    tokens, mask = masked_batch()
    grad_BTV = jax.grad(lambda x: sum(cross_entropy(x, tokens[:, 1:], mask[:, 1:] > 0)))(logits)
    counted = mask[:, 1:] > 0
    assert np.all(np.asarray(grad_BTV)[~counted] == 0.0)
    assert np.all(np.abs(np.asarray(grad_BTV)[counted]).sum(-1) > 0)

    # A step never looks at a masked target: changing the last tokens (targets only, never inputs) where
    # the mask is 0 leaves the step unchanged; where it is 1 it does not.
    trainer = one_device
    state = jax.device_get(trainer.init_state(0))

    def step(tokens_ABT1, mask_ABT1):
        batch = trainer.global_batch(Batch(tokens_ABT1[None], mask_ABT1[None]))
        new, metrics = trainer.step(jax.device_put(state, trainer.state_shardings), batch)
        return float(metrics["loss"]), jax.device_get(new.params)

    mask[:, -1] = [0, 1, 0, 1]
    base = step(tokens, mask)
    changed = tokens.copy()
    changed[[0, 2], -1] = (changed[[0, 2], -1] + 1) % VOCAB
    same = step(changed, mask)
    assert same[0] == base[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, same[1], base[1])
    changed[1, -1] = (changed[1, -1] + 1) % VOCAB
    assert step(changed, mask)[0] != base[0]


def test_gradient_accumulation_with_a_mask_weights_every_counted_target_alike(one_device):
    big = one_device
    accumulated = Trainer(big.config.replace(gradient_accumulation_steps=2, per_replica_batch=1), big.mesh)
    state = jax.device_get(big.init_state(1))
    tokens, mask = masked_batch(seed=4)  # the rows count 22, 15, 25 and 5 targets: unequal micro-batches
    one, m_one = big.step(
        jax.device_put(state, big.state_shardings), big.global_batch(Batch(tokens[None], mask[None]))
    )
    two, m_two = accumulated.step(
        jax.device_put(state, accumulated.state_shardings),
        accumulated.global_batch(Batch(tokens.reshape(2, 2, 25), mask.reshape(2, 2, 25))),
    )
    assert float(m_one["loss"]) == pytest.approx(float(m_two["loss"]), abs=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
        jax.device_get(one.params),
        jax.device_get(two.params),
    )


def test_validation_loss_of_a_fine_tuning_set_counts_completion_tokens_only(
    tmp_path,
    tokenizer_path,  # noqa: F811
    one_device,
):
    source = write_mixed(tmp_path / "ft.jsonl", [], examples(80, seed=5))
    dataset = str(tmp_path / "ft")
    data.prepare_dataset([source], dataset, tokenizer_path=tokenizer_path, val_fraction=0.5, seed=1)
    trainer = one_device
    params = trainer.init_state(2).params
    validator = evaluation.Validator(trainer, {"ft": dataset}, 3, training_dataset=dataset)
    got = validator.losses(params)["val/ft/loss"]

    forward = jax.jit(build(model_for(trainer.config)).apply)
    host_params = jax.device_get(params)
    nll, counted = 0.0, 0
    for batch in data.validation_examples(
        dataset, seq=24, global_batch=4, n_batches=3, process_index=0, process_count=1
    ):
        logp = np.asarray(jax.nn.log_softmax(forward(host_params, None, jnp.asarray(batch.tokens[:, :-1]))))
        picked = np.take_along_axis(logp, batch.tokens[:, 1:, None], axis=-1)[..., 0]
        nll -= float(np.sum(picked * batch.loss_mask[:, 1:]))
        counted += int(batch.loss_mask[:, 1:].sum())
    assert 0 < counted < 3 * 4 * 24  # some targets are prompts
    assert got == pytest.approx(nll / counted, rel=1e-5)


def packed(documents: list[list[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    row = [t for d in documents for t in [*d, eos]]
    tokens = np.array([row], np.int32)
    return tokens, data.segment_ids(tokens, eos)


def test_document_mask_gives_each_packed_document_its_logits_alone():
    hf = random_hf_model(**HF_SHAPE)
    c = hf.config
    shape = gptj_of(c)
    params = params_from_hf({k: v.detach().numpy() for k, v in hf.state_dict().items()}, shape)
    apply = jax.jit(build(shape).apply)
    rng = np.random.default_rng(0)
    eos = VOCAB - 1
    documents = [rng.integers(0, eos, n).tolist() for n in (7, 12, 1, 9)]
    tokens, segments = packed(documents, eos)
    together = np.asarray(apply(params, None, tokens, None, segments))[0]
    across = np.asarray(apply(params, None, tokens))[0]  # GPT-J's default: attends across documents
    start = 0
    for document in documents:
        alone_ids = np.array([[*document, eos]], np.int32)
        alone = np.asarray(apply(params, None, alone_ids))[0]
        with torch.no_grad():
            theirs = hf(torch.from_numpy(alone_ids).long()).logits.numpy()[0]
        piece = together[start : start + len(document) + 1]
        np.testing.assert_allclose(piece, alone, atol=2e-5, rtol=0)
        np.testing.assert_allclose(piece, theirs, atol=1e-4, rtol=0)
        if start:  # without the mask, later documents see the earlier ones
            assert np.abs(across[start : start + len(document) + 1] - alone).max() > 1e-2
        start += len(document) + 1


def test_with_the_document_mask_a_packed_row_trains_as_its_documents_alone(one_device):
    """Packed in one row with segment ids, or each document in its own row (padding masked out of the
    loss), the same targets give the same loss and gradients."""
    trainer = one_device  # the loss reads segment ids from the batch; document_mask makes the loader add them
    eos = VOCAB - 1
    rng = np.random.default_rng(1)
    documents = [rng.integers(0, eos, n).tolist() for n in (9, 6, 7)]  # 25 tokens with their EOS
    tokens, segments = packed(documents, eos)
    # each document alone in a row, with its EOS and the next document's first token as its last target
    rows, masks = np.full((3, 25), eos, np.int32), np.zeros((3, 25), np.uint8)
    start = 0
    for i, document in enumerate(documents):
        n = len(document) + 1 + (i < 2)
        rows[i, :n] = tokens[0, start : start + n]
        masks[i, 1:n] = 1
        start += len(document) + 1
    loss_and_grads = jax.jit(jax.value_and_grad(trainer._loss, has_aux=True))
    params = jax.device_get(trainer.init_state(0).params)
    (_, packed_loss), packed_grads = loss_and_grads(
        params, Batch(tokens, np.ones_like(tokens, np.uint8), segments)
    )
    (_, alone_loss), alone_grads = loss_and_grads(params, Batch(rows, masks))
    assert float(packed_loss) == pytest.approx(float(alone_loss), rel=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), packed_grads, alone_grads
    )
