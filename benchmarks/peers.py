"""The torch side the training benchmarks measure against: a `transformers` GPT-J of our shapes, and one
training step of any `transformers` causal LM (peft-wrapped ones too) as its users write it."""

import torch


def hf_gptj(shape: dict):
    """A randomly initialised (seed 0) `GPTJForCausalLM` of `shape` (our config keys), dropout off, untied
    output head, as our GPT-J is."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(
        vocab_size=shape["n_vocab"],
        n_positions=shape["seq"],
        n_embd=shape["d_model"],
        n_layer=shape["layers"],
        n_head=shape["n_heads"],
        rotary_dim=shape["pe_rotary_dims"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTJForCausalLM(cfg)


def torch_step(model, batch: int, seq: int, autocast_bf16: bool = False, weight_decay: float = 0.1):
    """One step of torch AdamW with gradient clipping over `model`'s trainable parameters, on a fixed batch
    of random tokens (the labels are the inputs; transformers shifts them), as a closure."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=weight_decay)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
