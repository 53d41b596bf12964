"""Run by test_fsdp.py under `torchrun --standalone --nproc_per_node 2` (gloo on CPU): instruction tuning's
trainable parts (experts frozen) sharded with FSDP2 the way `accelerate launch --config_file fsdp.yaml` shards them,
a few AdamW steps with each process on its half of a global batch, then the gathered weights. Also imported by the
test for the same steps in one process on the whole batch."""

import os
import sys
from pathlib import Path

import torch
from astrea_testing import REPO, TINY, prompt_ids, random_pixels

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration

FSDP_YAML = REPO / "training" / "recipes" / "accelerate" / "fsdp.yaml"
STEPS = 3
LEARNING_RATE = 1e-2
#: per sample, how many of its 5 text tokens are labelled: the two halves of a step differ (unequal token counts)
LABELLED = [[5, 4, 2, 1], [3, 5, 4, 4], [1, 2, 5, 3]]


def build_model() -> AstreaForConditionalGeneration:
    """The tiny Astrea with instruction tuning's trainable parts. MoCo off and every residual gate open: MoCo's
    loss depends on each process's own batch, and each process would draw its own gates."""
    from astrea.training.pipeline import set_trainable

    config = AstreaConfig.from_pretrained(TINY)
    config.use_moco, config.residual_prob = False, 1.0
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config)
    set_trainable(model, [model.model.router, model.model.adapters, model.model.projectors], language_model=True)
    return model


def global_batch(config: AstreaConfig, step: int) -> dict:
    labelled = LABELLED[step]
    ids = torch.tensor([prompt_ids(config, [40 + step, 41 + i, 42, 43, 44]) for i in range(len(labelled))])
    labels = ids.clone()
    for row, count in enumerate(labelled):
        labels[row, : ids.shape[1] - count] = -100
    return {"input_ids": ids, "labels": labels, **random_pixels(config, len(labelled), seed=step)}


def label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())  # after the causal shift, as the loss counts them


def accelerate_fsdp_env() -> dict[str, str]:
    """The FSDP settings `accelerate launch --config_file fsdp.yaml` hands its workers (2 processes, no mixed
    precision: bf16 would not match the float32 single process)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    argv = ["--config_file", str(FSDP_YAML), "--num_processes", "2", "--mixed_precision", "no", "unused.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def main(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(accelerate_fsdp_env())
    accelerator = Accelerator(cpu=True)  # MULTI_CPU: gloo, as `accelerate launch` on a CPU-only machine
    # accelerate turns FSDP on for accelerators only (on the CPU it runs the config as DDP): switch it on as it
    # would, with the plugin the config's settings give (AcceleratorState copies PartialState's type when created)
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()
    AcceleratorState().distributed_type = PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_model()
    with torch.no_grad():  # MoCo's two heads differ, so that its momentum update (below) changes something
        for parameter in model.moco.momentum_head.parameters():
            parameter.zero_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model, optimizer = accelerator.prepare(model, optimizer)

    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    sharded = {
        name: [isinstance(p, DTensor) and p.placements == (Shard(0),), tuple(p.to_local().shape), tuple(p.shape)]
        for name, p in model.named_parameters()
    }
    losses = []
    for step in range(STEPS):
        batch = global_batch(model.config, step)
        half = len(LABELLED[step]) // world
        mine = {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}
        # each process's loss is its token sum over the whole batch's label tokens; FSDP averages the gradients
        # over the processes, so the loss is scaled by their number (as transformers' Trainer does)
        output = model(**mine, num_items_in_batch=torch.tensor(label_tokens(batch)))
        accelerator.backward(output.loss * world)
        if step == 0:  # the first step's gradients, whole (the shards of every process gathered)
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        loss = output.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(float(loss))
    # Eq. 8 on the sharded heads, outside any forward, as the Trainer's MomentumUpdate callback makes it at a step's
    # start (made inside a forward, on the gathered copies FSDP2 hands the forward, it would be lost)
    model.moco.update_in_forward = False
    model.moco.momentum_update()
    full = accelerator.get_state_dict(model)
    torch.save({"units": units, "sharded": sharded, "losses": losses, "grads": grads}, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(full, out / "weights.pt")
    # both processes tear the process group down together: rank 1, done first (no weights to write), destroying it
    # while rank 0 was still writing once aborted in gloo's teardown ("terminate called without an active exception")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
