"""The momentum-contrastive loss (Eq. 5-8) against a hand computation, the queue and the EMA update."""

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaMoCo


def make_moco(tiny_config, **overrides) -> AstreaMoCo:
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), **overrides})
    torch.manual_seed(0)
    moco = AstreaMoCo(config)
    moco.reset_momentum_head()
    return moco


def test_loss_matches_a_hand_computation(tiny_config):
    moco = make_moco(tiny_config, moco_lambda=0.3, moco_temperature=0.5).eval()  # eval: no EMA, no enqueue
    moco.enqueue(F.normalize(torch.randn(3, tiny_config.moco_embed_dim), dim=-1))
    visual, text = torch.randn(2, 32), torch.randn(2, 32)
    with torch.no_grad():
        q = [F.normalize(moco.head(v), dim=0) for v in visual]
        k = [F.normalize(moco.momentum_head(t), dim=0) for t in text]
    bank = k + list(moco.queue[:3])
    total = 0.0
    for i in range(2):
        row = [math.exp(float(q[i] @ key) / 0.5) for key in bank]
        column = [math.exp(float(q[j] @ k[i]) / 0.5) for j in range(2)]
        r_i, c_i = row[i] / sum(row), column[i] / sum(column)
        total += 0.3 * math.log(r_i) + 0.7 * math.log(c_i)
    assert moco(visual, text).item() == pytest.approx(-total / 2, rel=1e-5)


def test_queue_keeps_the_newest_keys_in_ring_order(tiny_config):
    moco = make_moco(tiny_config, moco_queue_size=5)
    batches = [torch.full((2, tiny_config.moco_embed_dim), float(b)) for b in range(1, 5)]  # keys 1,1,2,2,3,3,4,4
    for batch in batches:
        moco.enqueue(batch)
    # 8 keys into 5 slots: slots 0-2 were overwritten by the 6th-8th keys (3, 4, 4), slots 3-4 hold 2, 3
    assert moco.queue[:, 0].tolist() == [3.0, 4.0, 4.0, 2.0, 3.0]
    assert int(moco.queue_ptr) == 3 and int(moco.queue_len) == 5


def test_queue_only_uses_filled_slots(tiny_config):
    moco = make_moco(tiny_config, moco_queue_size=8)
    moco.enqueue(torch.ones(3, tiny_config.moco_embed_dim))
    assert int(moco.queue_len) == 3 and int(moco.queue_ptr) == 3


def test_training_step_updates_momentum_head_by_ema_and_enqueues(tiny_config):
    moco = make_moco(tiny_config, moco_momentum=0.9).train()
    with torch.no_grad():
        for p in moco.head.parameters():
            p.add_(1.0)  # online and momentum heads now differ
    online = [p.clone() for p in moco.head.parameters()]
    before = [p.clone() for p in moco.momentum_head.parameters()]
    moco(torch.randn(4, 32), torch.randn(4, 32))
    for after, old, new in zip(moco.momentum_head.parameters(), before, online, strict=True):
        torch.testing.assert_close(after, 0.9 * old + 0.1 * new)  # Eq. 8
    assert int(moco.queue_len) == 4
    assert not any(p.requires_grad for p in moco.momentum_head.parameters())


def test_keys_are_gathered_across_processes(tiny_config):
    """With torch.distributed initialised (one gloo process here), enqueue goes through all_gather."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        moco = make_moco(tiny_config, moco_queue_size=6)
        calls = []
        original = torch.distributed.all_gather
        torch.distributed.all_gather = lambda out, x: (calls.append(x.shape), original(out, x))[1]
        try:
            moco.enqueue(torch.ones(2, tiny_config.moco_embed_dim))
        finally:
            torch.distributed.all_gather = original
        assert calls == [torch.Size([1]), torch.Size([2, tiny_config.moco_embed_dim])]  # the counts, then keys
        assert int(moco.queue_len) == 2
    finally:
        torch.distributed.destroy_process_group()


def test_loss_in_forward_is_reg_plus_mu_moco(tiny_model, tiny_config):
    ids = torch.tensor([prompt_ids(tiny_config, [40, 41, 42, 43]), prompt_ids(tiny_config, [50, 51, 52, 53])])
    labels = ids.masked_fill(ids == tiny_config.image_token_id, -100)
    out = tiny_model.train()(input_ids=ids, labels=labels, **random_pixels(tiny_config, 2))
    assert out.loss_moco is not None and out.loss_reg is not None
    torch.testing.assert_close(out.loss, out.loss_reg + tiny_config.moco_weight * out.loss_moco)
    no_moco = AstreaConfig.from_dict({**tiny_config.to_dict(), "use_moco": False})
    out = AstreaForConditionalGeneration(no_moco)(input_ids=ids, labels=labels, **random_pixels(tiny_config, 2))
    assert out.loss_moco is None
    torch.testing.assert_close(out.loss, out.loss_reg)


def test_processes_with_different_pair_counts_and_one_with_none_share_one_queue(tmp_path):
    """Two CPU processes: 2 and 1 pairs in the first step, 1 and none (a text-only batch) in the second. Keys of
    different counts are gathered, the process without pairs still joins the exchange (the others would wait for
    it forever), and both end with the same queue of the 4 keys."""
    from pathlib import Path

    from astrea_testing import torchrun_two

    result = torchrun_two(Path(__file__).with_name("moco_ranks.py"), tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["moco"][1] is not None and ranks[1]["moco"][1] is None  # rank 1's second step had no pairs
    assert ranks[0]["queue_len"] == ranks[1]["queue_len"] == 2 + 1 + 1
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])
    assert ranks[0]["queue"][:4].abs().sum(dim=1).gt(0).all()  # four real (normalised) keys


def test_with_num_items_in_batch_the_loss_is_this_micro_batchs_share(tiny_config):
    """transformers' Trainer passes the label-token count of the whole accumulated batch: L_reg becomes a token sum
    over it and MoCo is weighted by the micro-batch's share of those tokens, so micro-batch losses add up."""
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).train()
    model.moco.update_in_forward = False  # the same momentum head for both calls
    ids = torch.tensor([prompt_ids(tiny_config, [40, 41, 42, 43]), prompt_ids(tiny_config, [50, 51, 52, 53])])
    labels = ids.masked_fill(ids == tiny_config.image_token_id, -100)
    pixels = random_pixels(tiny_config, 2)
    plain = model(input_ids=ids, labels=labels, **pixels)
    model.moco.queue_len.zero_()  # the first call enqueued its keys; the second must see the same (empty) queue
    counted = model(input_ids=ids, labels=labels, **pixels, num_items_in_batch=torch.tensor(4 * 8))
    here = int((labels[..., 1:] != -100).sum())  # after the causal shift: the 4 text tokens of each sample
    torch.testing.assert_close(counted.loss_reg, plain.loss_reg * here / 32)
    torch.testing.assert_close(counted.loss_moco, plain.loss_moco)
    expected = counted.loss_reg + tiny_config.moco_weight * (here / 32) * counted.loss_moco
    torch.testing.assert_close(counted.loss, expected)
