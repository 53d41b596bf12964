"""FSDP2 on 2 CPU processes (gloo) with training/recipes/accelerate/fsdp.yaml's settings, through accelerate's own
FSDP2 preparation (switched on by hand: on the CPU accelerate runs an FSDP config as DDP), against the same steps in
one process."""

import importlib.util
from pathlib import Path

import torch
from astrea_testing import torchrun_two

RANKS = Path(__file__).with_name("fsdp_ranks.py")


def load_ranks_script():
    spec = importlib.util.spec_from_file_location("fsdp_ranks", RANKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp2_with_frozen_experts_shards_by_no_split_modules_and_matches_one_process(tmp_path):
    """Instruction tuning's parameters (experts frozen; LLM, projectors, router and adapters trained) sharded over 2
    processes, each on its half of every global batch (halves with unequal label-token counts): the units are the
    model's `_no_split_modules`, every parameter is split between the processes, the losses, the first step's
    gradients and the final weights are one process's on the whole batches, and the frozen experts are untouched."""
    script = load_ranks_script()
    result = torchrun_two(RANKS, tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    weights = torch.load(tmp_path / "weights.pt")

    model = script.build_model()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=script.LEARNING_RATE)
    losses = []
    for step in range(script.STEPS):
        output = model(**script.global_batch(model.config, step))  # the mean over the whole batch's label tokens
        output.loss.backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())

    # the units: every module of a `_no_split_modules` class, the input embedding and the LM head (accelerate's
    # own), the root; and the classes: the LLM's decoder layer, each expert and its blocks
    no_split = model._no_split_modules
    expected = {name for name, module in model.named_modules() if type(module).__name__ in no_split}
    expected |= {"", "model.language_model.embed_tokens", "lm_head"}
    assert set(ranks[0]["units"]) == set(ranks[1]["units"]) == expected
    blocks = {"SiglipEncoderLayer", "SwinStage", "BertLayer", "GroundingDinoEncoderLayer", "Sam2MultiScaleBlock"}
    experts = {type(expert).__name__ for expert in model.model.experts.values()}
    assert {"LlamaDecoderLayer"} | blocks | experts <= no_split

    # sharded: every parameter a DTensor split on its first dimension, the two processes' parts adding up
    names = [name for name, _ in model.named_parameters()]
    for name in names:
        (split0, local0, full), (split1, local1, _) = ranks[0]["sharded"][name], ranks[1]["sharded"][name]
        assert split0 and split1, name
        assert local0[0] + local1[0] == full[0] and local0[1:] == local1[1:] == full[1:], name

    # the same training, with float32 sums in another order: the losses agree to 1e-6 (measured: equal), the first
    # step's gradients (up to 1.5) to 1e-6 + 1e-5 relative (measured: 3e-7 apart at most). AdamW moves each trained
    # weight by about its learning rate (1e-2) a step, and turns those differences, where a gradient is near 0, into
    # weight differences up to 2e-5 after 3 steps (measured, LLM attention projections): atol 1e-4 is 1% of a step
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), rtol=1e-6, atol=1e-6)
    assert ranks[0]["grads"].keys() == grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    state = model.state_dict()
    assert weights.keys() == state.keys()
    momentum = {name for name in state if name.startswith("moco.momentum_head.")}
    for name, tensor in state.items():
        if name not in momentum:
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-4, msg=name)
    # MoCo's momentum update on the shards (Eq. 8, from a zeroed momentum head): (1 - m) x the online text head
    m = model.config.moco_momentum
    for name in momentum:
        expected = (1 - m) * state[name.replace("momentum_head", "text_head")]
        torch.testing.assert_close(weights[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    changed = {name for name in names if not torch.equal(weights[name], initial[name])} - momentum
    assert changed == set(grads)  # every trained parameter moved; the frozen experts did not change a bit
    assert all(torch.equal(weights[name], initial[name]) for name in state if name.startswith("model.experts."))
