"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU)."""

import json
import sys
from pathlib import Path

import torch

from astrea.training import pipeline
from astrea.training.recipe import Recipe

out = Path(sys.argv[1])
recipe = Recipe.from_dict(
    {
        "output_dir": str(out / "run"),
        "cache_dir": str(out / "cache"),
        "data": {"num_train": 8, "num_test": 2},
        "instruct": {"steps": 2, "batch_size": 2, "save_steps": 100, "logging_steps": 1},
    }
)
ws = pipeline.prepare(recipe)
pipeline.instruct(ws)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
(out / f"rank{rank}.json").write_text(json.dumps({"world": world, "queue_len": int(ws.model.moco.queue_len)}))
