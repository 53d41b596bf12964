"""Run by test_moco.py under `torchrun --standalone --nproc_per_node 2` (gloo on CPU): two training steps of the
same tiny Astrea on each process with different numbers of image-text pairs (rank 0: 2 then 1; rank 1: 1 then none,
a text-only batch), each forward followed by backward; writes each rank's MoCo queue."""

import sys
from pathlib import Path

import torch
from astrea_testing import TINY, prompt_ids, random_pixels

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration

out = Path(sys.argv[1])
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
config = AstreaConfig.from_pretrained(TINY)
torch.manual_seed(0)
model = AstreaForConditionalGeneration(config).train()


def batch(samples: int, images: bool) -> dict:
    text = [[40 + rank, 41, 42 + i] for i in range(samples)]
    ids = torch.tensor([prompt_ids(config, t) if images else [1, *t] for t in text])
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    pixels = random_pixels(config, samples, seed=rank) if images else {}
    return {"input_ids": ids, "labels": labels, **pixels}


steps = [batch(2, True), batch(1, True)] if rank == 0 else [batch(1, True), batch(1, False)]
moco_losses = []
for inputs in steps:
    output = model(**inputs)
    output.loss.backward()
    moco_losses.append(None if output.loss_moco is None else float(output.loss_moco))
torch.save(
    {
        "queue": model.moco.queue.clone(),
        "queue_len": int(model.moco.queue_len),
        "moco": moco_losses,
        "norm_updates": int(model.moco.image_norm.updates),
        "image_mean": model.moco.image_norm.mean.clone(),
        "text_var": model.moco.text_norm.var.clone(),
    },
    out / f"{rank}.pt",
)
torch.distributed.destroy_process_group()
