"""Run by test_data_and_cache.py under `torchrun --standalone --nproc_per_node 2` (gloo on CPU): both processes
fill one feature cache (a shared folder) with the same images, then read every entry; writes what each process's
experts ran on and read."""

import json
import sys
from pathlib import Path

import torch
from astrea_testing import TINY
from PIL import Image

from astrea.processing import AstreaImageProcessor
from astrea.training.feature_cache import FeatureCache, image_key
from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration

out = Path(sys.argv[1])
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
config = AstreaConfig.from_pretrained(TINY)
torch.manual_seed(0)
model = AstreaForConditionalGeneration(config).eval()
processor = AstreaImageProcessor.from_model_config(config, detection_size=64)
images = [Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 7 * i)) for i in range(8)]
encoded = []
model.model.experts["caption"].register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
cache = FeatureCache.for_model(out / "cache", model, processor)
stats = cache.fill(model, processor, images, batch_size=3)
loaded = cache.load([image_key(image) for image in images])  # every entry, whichever process wrote it
(out / f"{rank}.json").write_text(
    json.dumps({"encoded": sum(encoded), "stats": stats, "rows": {k: v.shape[0] for k, v in loaded.items()}})
)
torch.distributed.destroy_process_group()
