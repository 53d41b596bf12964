"""Run by test_model_conventions.py under `torchrun --nproc_per_node 2` (gloo on CPU): loads a saved Astrea with
transformers' tensor parallelism (`tp_plan="auto"`) and writes each rank's logits for fixed inputs."""

import sys
from pathlib import Path

import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaForConditionalGeneration

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.distributed.init_process_group("gloo")
model = AstreaForConditionalGeneration.from_pretrained(folder, tp_plan="auto").eval()
batch = {"input_ids": torch.tensor([prompt_ids(model.config, [40, 41, 42])]), **random_pixels(model.config, 1)}
with torch.no_grad():
    logits = model(**batch).logits
rank = torch.distributed.get_rank()
torch.save({"logits": logits, "tied": model.lm_head.weight is model.get_input_embeddings().weight}, out / f"{rank}.pt")
torch.distributed.destroy_process_group()
