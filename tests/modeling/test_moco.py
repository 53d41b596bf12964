"""The momentum-contrastive loss (Eq. 5-8) against a hand computation, the queue and the EMA update."""

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaMoCo, RunningStandardization


def make_moco(tiny_config, **overrides) -> AstreaMoCo:
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), **overrides})
    torch.manual_seed(0)
    moco = AstreaMoCo(config)
    moco.reset_momentum_head()
    return moco


def test_loss_matches_a_hand_computation(tiny_config):
    """Rows: each image query against the momentum text keys of the batch and the queue; columns: each text through
    the online text head against the batch's image queries."""
    moco = make_moco(tiny_config, moco_lambda=0.3, moco_temperature=0.5).eval()  # eval: no EMA, no enqueue
    with torch.no_grad():
        for p in moco.text_head.parameters():
            p.add_(0.1)  # the online text head and its momentum copy now differ
    moco.enqueue(F.normalize(torch.randn(3, tiny_config.moco_embed_dim), dim=-1))
    visual, text = torch.randn(2, 32), torch.randn(2, 32)
    with torch.no_grad():
        q = [F.normalize(moco.head(v), dim=0) for v in visual]
        k = [F.normalize(moco.momentum_head(t), dim=0) for t in text]
        t = [F.normalize(moco.text_head(x), dim=0) for x in text]
    bank = k + list(moco.queue[:3])
    total = 0.0
    for i in range(2):
        row = [math.exp(float(q[i] @ key) / 0.5) for key in bank]
        column = [math.exp(float(q[j] @ t[i]) / 0.5) for j in range(2)]
        r_i, c_i = row[i] / sum(row), column[i] / sum(column)
        total += 0.3 * math.log(r_i) + 0.7 * math.log(c_i)
    loss, chance = moco(visual, text)
    assert loss.item() == pytest.approx(-total / 2, rel=1e-5)
    assert chance.item() == pytest.approx(0.3 * math.log(5) + 0.7 * math.log(2), rel=1e-6)  # uniform over 5 and 2


def test_candidates_with_the_positives_text_are_not_negatives(tiny_config):
    """Texts 7, 7, 9 in the batch and 7, 5 in the queue: sample 0's row counts its own key, key 2 and queue entry 1
    (key 1 and queue entry 0 share its text); its column counts images 0 and 2 (image 1's text is the same)."""
    moco = make_moco(tiny_config, moco_lambda=0.4, moco_temperature=0.5).eval()
    moco.enqueue(F.normalize(torch.randn(2, tiny_config.moco_embed_dim), dim=-1), torch.tensor([7, 5]))
    visual, text, ids = torch.randn(3, 32), torch.randn(3, 32), torch.tensor([7, 7, 9])
    with torch.no_grad():
        q = F.normalize(moco.head(visual), dim=-1)
        k = F.normalize(moco.momentum_head(text), dim=-1)
        t = F.normalize(moco.text_head(text), dim=-1)
    rows = (q @ torch.cat([k, moco.queue[:2]]).T / 0.5).double()
    columns = (q @ t.T / 0.5).double()
    counted_rows = {0: [0, 2, 4], 1: [1, 2, 4], 2: [0, 1, 2, 3, 4]}  # candidates each row keeps
    counted_columns = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}  # images each text's column keeps
    total, chance = 0.0, 0.0
    for i in range(3):
        log_r = rows[i, i] - rows[i, counted_rows[i]].logsumexp(0)
        log_c = columns[i, i] - columns[counted_columns[i], i].logsumexp(0)
        total += 0.4 * float(log_r) + 0.6 * float(log_c)
        chance += 0.4 * math.log(len(counted_rows[i])) + 0.6 * math.log(len(counted_columns[i]))
    loss, chance_level = moco(visual, text, ids)
    assert loss.item() == pytest.approx(-total / 3, rel=1e-5)
    assert chance_level.item() == pytest.approx(chance / 3, rel=1e-6)


def test_both_heads_learn_and_the_key_head_follows_the_text_head(tiny_config):
    moco = make_moco(tiny_config, moco_momentum=0.5).train()
    loss, _ = moco(torch.randn(4, 32), torch.randn(4, 32))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.text_head.parameters())
    assert all(p.grad is None for p in moco.momentum_head.parameters())


def test_the_queue_keeps_each_keys_text_id(tiny_config):
    moco = make_moco(tiny_config, moco_queue_size=3).train()
    moco(torch.randn(2, 32), torch.randn(2, 32), torch.tensor([11, 12]))
    moco(torch.randn(2, 32), torch.randn(2, 32), torch.tensor([13, 14]))
    assert moco.queue_text_ids.tolist() == [14, 12, 13]  # ring order: the 4th key overwrote the 1st
    moco(torch.randn(1, 32), torch.randn(1, 32))  # no ids: a fresh negative id, equal to no text's
    assert int(moco.queue_text_ids[1]) < 0


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
        for p in moco.text_head.parameters():
            p.add_(1.0)  # online and momentum text heads now differ
    online = [p.clone() for p in moco.text_head.parameters()]
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
        # the counts, then the keys and their text ids
        assert calls == [torch.Size([1]), torch.Size([2, tiny_config.moco_embed_dim]), torch.Size([2])]
        assert int(moco.queue_len) == 2
    finally:
        torch.distributed.destroy_process_group()


def test_loss_in_forward_is_reg_plus_mu_moco(tiny_config):
    ids = torch.tensor([prompt_ids(tiny_config, [40, 41, 42, 43]), prompt_ids(tiny_config, [50, 51, 52, 53])])
    labels = ids.masked_fill(ids == tiny_config.image_token_id, -100)
    out = AstreaForConditionalGeneration(tiny_config).train()(
        input_ids=ids, labels=labels, **random_pixels(tiny_config, 2)
    )
    assert out.loss_moco is not None and out.loss_reg is not None
    torch.testing.assert_close(out.loss, out.loss_reg + tiny_config.moco_weight * out.loss_moco)
    assert out.moco_chance.item() == pytest.approx(math.log(2))  # empty queue, two texts: 2 candidates each way
    no_moco = AstreaConfig.from_dict({**tiny_config.to_dict(), "use_moco": False})
    out = AstreaForConditionalGeneration(no_moco)(input_ids=ids, labels=labels, **random_pixels(tiny_config, 2))
    assert out.loss_moco is None
    torch.testing.assert_close(out.loss, out.loss_reg)


@pytest.mark.parametrize("train_fusion", [True, False])
def test_moco_train_fusion_decides_whether_moco_reaches_the_router_and_adapters(tiny_config, train_fusion):
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), "moco_train_fusion": train_fusion})
    ids = torch.tensor([prompt_ids(config, [40, 41, 42, 43]), prompt_ids(config, [50, 51, 52, 53])])
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).train()
    for adapter in model.model.adapters.values():  # away from the identity start, so every adapter weight matters
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    out = model(input_ids=ids, labels=labels, **random_pixels(config, 2))
    fusion = [model.model.router.weight, *(a.down.weight for a in model.model.adapters.values())]
    moco_grads = torch.autograd.grad(out.loss_moco, [*fusion, model.moco.head[0].weight], allow_unused=True)
    *fusion_grads, head_grad = moco_grads
    assert head_grad is not None and head_grad.abs().sum() > 0  # MoCo's own image head learns either way
    reached = [g is not None and bool(g.abs().sum() > 0) for g in fusion_grads]
    assert reached == [train_fusion] * len(fusion)
    torch.testing.assert_close(out.loss, out.loss_reg + config.moco_weight * out.loss_moco)


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
    # the standardization's moments are taken over both processes' pairs: 3 in the first step (one update), 1 in
    # the second (too few for a variance, no update), and the same on both
    assert ranks[0]["norm_updates"] == ranks[1]["norm_updates"] == 1
    torch.testing.assert_close(ranks[0]["image_mean"], ranks[1]["image_mean"])
    torch.testing.assert_close(ranks[0]["text_var"], ranks[1]["text_var"])


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


def test_the_text_side_is_the_llm_reading_the_text_without_the_images(tiny_config):
    """MoCo's text for a sample is the LLM's last hidden states over its text alone (image placeholders and padding
    taken out), pooled over the answer tokens; equal texts get equal ids whatever the image and padding."""
    from modeling_astrea.modeling_astrea import text_hash

    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).eval()
    first = prompt_ids(tiny_config, [40, 41, 42, 43])
    second = [0, 0] + prompt_ids(tiny_config, [40, 41, 42, 43])  # the same text, padded on the left
    ids = torch.tensor([first + [0, 0], second])
    attention = torch.tensor([[1] * len(first) + [0, 0], [0, 0] + [1] * len(first)])
    labels = torch.full_like(ids, -100)
    labels[0, len(first) - 2 : len(first)] = ids[0, len(first) - 2 : len(first)]  # answer: the last 2 tokens (42, 43)
    labels[1, -2:] = ids[1, -2:]
    features = torch.randn(2, tiny_config.num_image_tokens, tiny_config.text_config.hidden_size)
    visual, text, text_ids = model._moco_pairs(ids, labels, features, attention)
    alone = torch.tensor([[t for t in first if t != tiny_config.image_token_id]])
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=alone).last_hidden_state[0]
    torch.testing.assert_close(text[0], hidden[-2:].mean(dim=0))
    torch.testing.assert_close(text[1], text[0])
    assert text_ids[0] == text_ids[1] == text_hash(alone[0].tolist())
    torch.testing.assert_close(visual, features.mean(dim=1))
    other = torch.tensor([prompt_ids(tiny_config, [40, 41, 42, 44])])
    _, _, other_id = model._moco_pairs(
        other, other.masked_fill(other == tiny_config.image_token_id, -100), features[:1]
    )
    assert other_id[0] != text_ids[0]
    # retrieval reads a text as the keys are read: the momentum head on the LLM's pooled hidden states
    torch.testing.assert_close(
        model.get_text_embeddings(alone), model.moco.embed_texts(hidden.mean(dim=0, keepdim=True))
    )


def test_with_the_task_aware_router_the_image_side_is_the_image_routed_without_the_prompt(tiny_config):
    """With `router_prompt` the language model reads visual tokens mixed by the question, but MoCo's image side is
    the image routed without it (as `get_image_embeddings` embeds it for retrieval): the same for two questions
    about one image, though their LM tokens differ."""
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), "router_prompt": True, "router_prompt_dropout": 0.0})
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).train()
    model.moco.update_in_forward = False
    torch.nn.init.normal_(model.model.prompt_router.weight, std=5.0)  # a router that follows the question
    pixels = random_pixels(config, 1)
    seen = []
    model._moco_pairs = lambda ids, labels, images, mask, moco_text=None: seen.append(images.detach().clone()) or None
    lm_tokens = []
    for question in ([40, 41, 42, 43], [60, 61, 62, 63]):
        ids = torch.tensor([prompt_ids(config, question)])
        labels = ids.masked_fill(ids == config.image_token_id, -100)
        labels[0, :-1] = -100  # the last token is the answer
        out = model(input_ids=ids, labels=labels, **pixels)
        lm_tokens.append(out.image_hidden_states.detach())
    assert not torch.allclose(lm_tokens[0], lm_tokens[1])  # the LM's tokens follow the question
    torch.testing.assert_close(seen[0], seen[1])  # MoCo's do not
    alone = model.get_image_features(**pixels, return_dict=True).pooler_output
    torch.testing.assert_close(seen[0], alone)
    assert not torch.allclose(seen[0], lm_tokens[0])
    # both mixtures come from one pass: each projector and adapter runs once per forward
    calls = []
    for module in [*model.model.projectors.values(), *model.model.adapters.values()]:
        module.register_forward_hook(lambda module, args, output: calls.append(module))
    model(input_ids=ids, labels=labels, **pixels)
    assert len(calls) == 2 * len(model.model.projectors) and len(set(map(id, calls))) == len(calls)


def test_fusion_returns_the_unprompted_mixture_from_the_same_projections(tiny_config):
    """`fuse_expert_features(..., unprompted=True)`: the prompted tokens as without the flag, and beside them the
    tokens that no prompt gives; without a prompt the two are the same."""
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), "router_prompt": True})
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).model.eval()
    torch.nn.init.normal_(model.prompt_router.weight, std=5.0)
    for adapter in model.adapters.values():  # leave the identity start so the mixture depends on the routing
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    features = model.get_expert_features(**random_pixels(config, 2))
    prompt = torch.randn(2, config.text_config.hidden_size)
    both = model.fuse_expert_features(features, prompt, unprompted=True)
    torch.testing.assert_close(both.pooler_output, model.fuse_expert_features(features, prompt).pooler_output)
    torch.testing.assert_close(both.unprompted_pooler_output, model.fuse_expert_features(features).pooler_output)
    assert not torch.allclose(both.pooler_output, both.unprompted_pooler_output)
    alone = model.fuse_expert_features(features, unprompted=True)
    assert alone.unprompted_pooler_output is alone.pooler_output
    assert model.fuse_expert_features(features, prompt).unprompted_pooler_output is None


def test_a_moco_text_of_its_own_replaces_the_rows_text(tiny_config):
    """With `moco_input_ids` (e.g. the image's caption), a row's MoCo text is that text read alone and pooled over
    its `moco_pool_mask`, and its id is that text's: two conversations about images with the same caption are not
    each other's negatives. A row whose MoCo attention mask is all zeros keeps its own instruction and answer."""
    from modeling_astrea.modeling_astrea import text_hash

    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).eval()
    first = prompt_ids(tiny_config, [40, 41, 42, 43])
    second = prompt_ids(tiny_config, [40, 45, 46, 47])
    ids = torch.tensor([first, second, first])
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    features = torch.randn(3, tiny_config.num_image_tokens, tiny_config.text_config.hidden_size)
    caption = [50, 51, 52, 53, 54]
    moco_ids = torch.tensor([caption, caption, [0] * 5])
    moco_attention = torch.tensor([[1] * 5, [1] * 5, [0] * 5])
    moco_pool = torch.tensor([[False, False, True, True, True]] * 2 + [[False] * 5])
    _, text, text_ids = model._moco_pairs(ids, labels, features, None, (moco_ids, moco_attention, moco_pool))
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=torch.tensor([caption])).last_hidden_state[0]
    torch.testing.assert_close(text[0], hidden[2:].mean(dim=0))
    torch.testing.assert_close(text[1], text[0])
    assert text_ids[0] == text_ids[1] == text_hash(caption)
    _, own_text, own_ids = model._moco_pairs(ids[2:], labels[2:], features[2:])
    torch.testing.assert_close(text[2], own_text[0])
    assert text_ids[2] == own_ids[0] != text_ids[0]
    # the forward pass takes the collator's names for them
    model.train()
    output = model(
        input_ids=ids,
        labels=labels,
        expert_features={
            name: torch.randn(3, tiny_config.num_image_tokens, width)
            for name, width in tiny_config.expert_hidden_sizes.items()
        },
        moco_input_ids=moco_ids,
        moco_attention_mask=moco_attention,
        moco_pool_mask=moco_pool,
    )
    assert torch.isfinite(output.loss_moco)


def test_standardization_starts_as_the_identity_then_follows_the_batches_moments():
    norm = RunningStandardization(3, momentum=0.25)
    rows = torch.randn(5, 3)
    assert torch.equal(norm(rows), rows)  # nothing learnt yet: the identity
    first = torch.randn(64, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 7.0])
    norm.update(first)  # the first batch's moments, whole
    torch.testing.assert_close(norm(first).mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm(first).std(dim=0), torch.ones(3), atol=1e-4, rtol=0)
    second = torch.randn(16, 3) * 2 + 3
    norm.update(second)  # a quarter of the way to the second batch's
    torch.testing.assert_close(norm.mean, first.mean(0) + 0.25 * (second.mean(0) - first.mean(0)))
    torch.testing.assert_close(norm.var, first.var(0) + 0.25 * (second.var(0) - first.var(0)))
    norm.update(torch.randn(1, 3))  # one row has no variance to take
    norm.update(torch.randn(0, 3))
    assert int(norm.updates) == 2
    torch.testing.assert_close(norm(second[:1]), (second[:1] - norm.mean) / norm.var.sqrt())  # a batch of one


def test_standardization_moments_stay_float32_in_a_bf16_model(tiny_config):
    """A bf16 mean would not move at a rate of 0.05: cast with the model, the moments come back to float32."""
    norm = RunningStandardization(3).to(torch.bfloat16)
    first, second = torch.full((4, 3), 3.0) + torch.randn(4, 3), torch.full((4, 3), 3.1) + torch.randn(4, 3)
    norm.update(first.bfloat16())
    norm.update(second.bfloat16())
    assert norm.mean.dtype == norm.var.dtype == torch.float32
    batch = [rows.bfloat16().double() for rows in (first, second)]
    expected = batch[0].mean(0) + 0.05 * (batch[1].mean(0) - batch[0].mean(0))
    torch.testing.assert_close(norm.mean, expected.float())
    assert norm(second.bfloat16()).dtype == torch.bfloat16
    model = AstreaForConditionalGeneration(tiny_config)
    assert "image_norm" in model._keep_in_fp32_modules_strict  # and from_pretrained(dtype=bf16) loads them so


@pytest.mark.parametrize("standardize", [True, False])
def test_moco_heads_read_inputs_standardized_by_the_batch_in_training_and_by_running_moments_after(
    tiny_config, standardize
):
    moco = make_moco(tiny_config, moco_standardize=standardize)
    seen = {}
    moco.head[0].register_forward_pre_hook(lambda module, args: seen.update(visual=args[0]))
    moco.text_head[0].register_forward_pre_hook(lambda module, args: seen.update(text=args[0]))
    moco.momentum_head[0].register_forward_pre_hook(lambda module, args: seen.update(keys=args[0]))

    def pooled(shift: float):  # pooled features as they come: a large shared part, small differences between samples
        return shift + 0.01 * torch.randn(8, 32), 1.0 + shift + 0.1 * torch.randn(8, 32)

    def standardized(rows, mean, var):
        return (rows - mean) / var.sqrt()

    first, second = pooled(3.0), pooled(3.5)
    moco.eval()
    moco(*first)
    assert int(moco.image_norm.updates) == int(moco.text_norm.updates) == 0  # evaluation leaves the moments
    moco.train()
    moco(*first)
    moco(*second)
    close = {"atol": 1e-4, "rtol": 1e-4}  # float32's rounding of the small differences from the shared part
    if not standardize:
        assert int(moco.image_norm.updates) == int(moco.text_norm.updates) == 0
        torch.testing.assert_close(seen["visual"], second[0])
        torch.testing.assert_close(seen["text"], second[1])
        torch.testing.assert_close(seen["keys"], second[1])
        return
    # in training, each batch by its own moments, however far the running ones lag
    torch.testing.assert_close(seen["visual"], standardized(second[0], second[0].mean(0), second[0].var(0)), **close)
    torch.testing.assert_close(seen["text"], standardized(second[1], second[1].mean(0), second[1].var(0)), **close)
    torch.testing.assert_close(seen["keys"], seen["text"])  # the momentum head reads what the online one reads
    # the running moments: the first batch's, then 5% of the way to the second's
    torch.testing.assert_close(moco.image_norm.mean, first[0].mean(0) + 0.05 * (second[0].mean(0) - first[0].mean(0)))
    torch.testing.assert_close(moco.text_norm.var, first[1].var(0) + 0.05 * (second[1].var(0) - first[1].var(0)))
    moco.eval()  # retrieval: by the running moments
    with torch.no_grad():
        expected = F.normalize(moco.head(standardized(second[0], moco.image_norm.mean, moco.image_norm.var)), dim=-1)
        torch.testing.assert_close(moco.embed_images(second[0]), expected, **close)
