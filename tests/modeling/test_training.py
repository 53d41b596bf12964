"""A few optimizer steps: the loss goes down, frozen parts stay put, gradient checkpointing works."""

import pytest
import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea.modeling_astrea import pack_rows_of


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


def test_skip_logits_gives_the_same_loss_and_gradients(tiny_model, tiny_config):
    """`skip_logits=True` runs the LM head only where a label is scored: the same L_reg (with and without the
    Trainer's `num_items_in_batch`) and the same gradients as the full logits, and no logits returned."""
    batch = fixed_batch(tiny_config)
    batch["labels"][1, -3:] = -100  # rows with different numbers of scored tokens
    model = tiny_model.train()
    model.config.use_moco = False  # MoCo's EMA/queue would make the two passes differ

    def run(**kwargs):
        model.zero_grad()
        output = model(**batch, **kwargs)
        output.loss.backward()
        return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for counted in ({}, {"num_items_in_batch": torch.tensor(20)}):
        full, full_grads = run(**counted)
        skipped, skipped_grads = run(skip_logits=True, **counted)
        assert full.logits is not None and skipped.logits is None
        torch.testing.assert_close(skipped.loss, full.loss)
        assert full_grads.keys() == skipped_grads.keys() and "lm_head.weight" in full_grads
        for name in full_grads:
            torch.testing.assert_close(skipped_grads[name], full_grads[name], msg=name)
    with pytest.raises(ValueError, match="needs `labels`"):
        model(input_ids=batch["input_ids"], skip_logits=True)


def test_branches_are_computed_as_their_conversations_alone(tiny_model, tiny_config):
    """One row holding two conversations about an image as branches after the shared image (`branch_ids`) gives
    each branch the logits its conversation gets as a row of its own, and the same summed loss; the image's tokens
    pass through the LLM once."""
    prefix = prompt_ids(tiny_config, [7])
    first, second = [40, 41, 42], [50, 51, 52, 53]
    pixels = random_pixels(tiny_config, 1)
    model = tiny_model.eval()
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([prefix + branch]), **pixels, use_cache=False).logits[0, len(prefix) :]
            for branch in (first, second)
        ]
        ids = torch.tensor([prefix + first + second])
        branch_ids = torch.tensor([[0] * len(prefix) + [1] * len(first) + [2] * len(second)])
        packed = model(input_ids=ids, **pixels, branch_ids=branch_ids, use_cache=False).logits[0]
        plain = model(input_ids=ids, **pixels, use_cache=False).logits[0]  # the second branch sees the first
    torch.testing.assert_close(packed[branch_ids[0] == 1], alone[0])
    torch.testing.assert_close(packed[branch_ids[0] == 2], alone[1])
    assert not torch.allclose(plain[branch_ids[0] == 2], alone[1], atol=1e-4)
    with pytest.raises(ValueError, match="generate without them"):
        model(input_ids=ids, **pixels, branch_ids=branch_ids, use_cache=True)


def test_pack_rows_of_places_every_real_token_once():
    """First fit decreasing into sequences no longer than the batch's rows: every real token of every row once, in
    its row's order, rows never split, fewer sequences than rows; None when no two rows fit together."""
    mask = torch.zeros(5, 8, dtype=torch.long)
    for row, (start, length) in enumerate([(0, 5), (0, 3), (0, 8), (6, 2), (0, 1)]):  # row 3 is padded on the left
        mask[row, start : start + length] = 1
    packed = pack_rows_of(mask)
    assert packed.shape == (3, 8)  # [row 2], [row 0, row 1], [row 3, row 4]
    real = packed[packed >= 0]
    assert sorted(real.tolist()) == torch.nonzero(mask.flatten()).squeeze(1).tolist()
    for sequence in packed:
        rows = (sequence[sequence >= 0] // 8).tolist()
        assert rows == sorted(rows, key=rows.index)  # each row's tokens together
        for row in set(rows):
            tokens = sequence[sequence >= 0][torch.tensor(rows) == row]
            assert torch.equal(tokens, torch.nonzero(mask[row]).squeeze(1) + 8 * row)  # all of it, in order
    assert pack_rows_of(torch.ones(3, 4, dtype=torch.long)) is None  # no two rows fit together
    assert pack_rows_of(torch.zeros(3, 4, dtype=torch.long)) is None  # every row is padding


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_same_loss_gradients_and_logits(tiny_model, tiny_config, attention):
    """`pack_rows=True`: the LLM reads the rows packed (two short rows share a sequence, one of them padded on the
    left, the other holding two branches), and the loss, every gradient and the logits on real tokens are those of
    the padded batch, with SDPA and with eager attention (which adds its mask to the scores)."""
    prefix = len(prompt_ids(tiny_config, []))
    texts = [[40 + i % 20 for i in range(prefix + 8)] + [2], [50, 51, 2], [60, 61, 62, 2]]  # rows 1 and 2 fit in one
    rows = [prompt_ids(tiny_config, text) for text in texts]
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        where = slice(length - len(row), length) if index == 1 else slice(0, len(row))  # row 1 padded on the left
        ids[index, where] = torch.tensor(row)
        attention_mask[index, where] = 1
    branch_ids = torch.zeros_like(ids)
    branch_ids[2, prefix : prefix + 2], branch_ids[2, prefix + 2 : prefix + 4] = 1, 2  # row 2: two branches
    labels = ids.masked_fill((ids == tiny_config.image_token_id) | (attention_mask == 0), -100)
    labels[:, 0] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "branch_ids": branch_ids,
        **random_pixels(tiny_config, len(rows)),
    }
    assert pack_rows_of(attention_mask).shape[0] == 2  # something is packed
    model = tiny_model.train()
    model.model.language_model.config._attn_implementation = attention
    assert model.model.language_model.config._attn_implementation == attention
    model.config.use_moco = False  # MoCo's EMA/queue would make the two passes differ

    def run(**kwargs):
        model.zero_grad()
        output = model(**batch, use_cache=False, **kwargs)
        output.loss.backward()
        return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded, padded_grads = run()
    packed, packed_grads = run(pack_rows=True)
    torch.testing.assert_close(packed.loss, padded.loss)
    real = attention_mask.bool()
    torch.testing.assert_close(packed.logits[real], padded.logits[real])
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], msg=name)
    del batch["branch_ids"]
    with pytest.raises(ValueError, match="generate without it"):
        model(**batch, pack_rows=True, use_cache=True)
    with pytest.raises(ValueError, match="ask for the layers' outputs without it"):
        model(**batch, pack_rows=True, use_cache=False, output_hidden_states=True)
    model.model.language_model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    with pytest.raises(ValueError, match="load the model with attn_implementation='sdpa' or 'eager'"):
        model(**batch, pack_rows=True, use_cache=False)


def test_the_trainer_packs_rows_when_its_phase_says_so():
    """`AstreaSFTTrainer(pack_rows=...)` (a phase's `pack_rows`, as `run_stage` passes it) reaches the model's forward;
    without it the model is not asked to pack."""
    from collections import defaultdict
    from types import SimpleNamespace

    from astrea.training.pipeline import AstreaSFTTrainer

    calls = []

    class Model:
        training = True

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(loss=torch.tensor(1.0))

    for pack in (True, False):
        trainer = SimpleNamespace(pack_rows=pack, _metrics=defaultdict(lambda: defaultdict(list)))
        AstreaSFTTrainer.compute_loss(trainer, Model(), {"input_ids": torch.ones(1, 3, dtype=torch.long)})
        assert calls[-1].get("pack_rows", False) is pack
