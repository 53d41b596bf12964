"""A few optimizer steps: the loss goes down, frozen parts stay put, gradient checkpointing works."""

import torch
from astrea_testing import prompt_ids, random_pixels


def fixed_batch(config):
    ids = torch.tensor([prompt_ids(config, [40, 41, 42, 43, 44, 2]), prompt_ids(config, [50, 51, 52, 53, 54, 2])])
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels, **random_pixels(config, 2)}


def test_loss_goes_down_and_only_trainable_parts_change(tiny_model, tiny_config):
    model = tiny_model.train()
    batch = fixed_batch(tiny_config)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if n.startswith(("model.projectors", "model.router"))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss_reg.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert any(n.startswith("model.experts") for n in frozen)
    for name, before in frozen.items():
        if name.startswith("moco.momentum_head"):
            continue  # moved by EMA, not by gradients
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    assert all(not torch.equal(before, dict(model.named_parameters())[n]) for n, before in trained.items())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, tiny_config):
    batch = fixed_batch(tiny_config)
    model = tiny_model.train()
    model.config.use_moco = False  # MoCo's EMA/queue would make the two passes differ

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.model.language_model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
