"""The feature cache at the real-scale recipes' sizes (`make bench-cache`): bytes per image, fill (write) and read
throughput, the in-memory index, and the cost of the experts' fingerprints at each start.

    python benchmarks/feature_cache.py [--config examples/configs/astrea-13b] [--images 512] [--dir DIR]

The expert feature shapes come from the config itself (the common grid, and each expert's feature width); the
model is built on the meta device (no memory) for its parameter shapes. The features written are random tensors
of those shapes, the real experts not being runnable here; storage, index and reads do not depend on the values.
Fingerprints are timed on real-sized weight tensors of every expert parameter. Writes
`benchmarks/feature_cache.json`. The folder should be on the disk the cache will live on (`--dir`, default a
temporary folder); reads right after a fill come from the page cache, cold reads depend on the storage.
"""

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from astrea.training.feature_cache import FeatureCache, weight_summary
from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]


def feature_shapes(config: AstreaConfig) -> dict[str, tuple[int, int]]:
    """{expert: (tokens, channels)} of what the cache stores per image, and the model on the meta device."""
    with torch.device("meta"):
        model = AstreaForConditionalGeneration(config)
    tokens = config.image_grid_size**2
    return {name: (tokens, config.expert_hidden_sizes[name]) for name in EXPERT_NAMES}, model


def fingerprint_seconds(model) -> dict[str, float]:
    """Seconds to hash each expert's weights as `expert_fingerprint` does, on real-sized tensors (allocated and
    written before the clock starts, as loaded weights would be)."""
    out = {}
    for name in EXPERT_NAMES:
        weights = {key: torch.ones(t.shape) for key, t in model.model.experts[name].state_dict().items()}
        seconds = []
        for _ in range(2):  # the faster of two passes: the first also pays for the process's first touches
            start = time.perf_counter()
            digest = hashlib.sha256()
            for key, tensor in weights.items():
                digest.update(f"{key}:{tuple(tensor.shape)}".encode())
                digest.update(weight_summary(tensor).numpy().tobytes())
            seconds.append(time.perf_counter() - start)
        out[name] = round(min(seconds), 3)
        del weights
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "configs" / "astrea-13b"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per write and per read batch")
    parser.add_argument("--dir", help="where to write the cache (a temporary folder by default)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "feature_cache.json")
    args = parser.parse_args(argv)

    config = AstreaConfig.from_pretrained(args.config)
    shapes, meta_model = feature_shapes(config)
    root = Path(args.dir or tempfile.mkdtemp(prefix="astrea-cache-bench-"))
    cache = FeatureCache(root / "cache", {name: "bench" for name in EXPERT_NAMES}, dtype="float16", shard_mb=1024)
    keys = [f"{index:032x}" for index in range(args.images)]
    generator = torch.Generator().manual_seed(0)
    batches = [keys[i : i + args.batch] for i in range(0, len(keys), args.batch)]

    written = 0.0
    for batch in batches:  # what fill does after the experts: one row per image and expert
        features = {name: torch.randn(len(batch), *shape, generator=generator) for name, shape in shapes.items()}
        start = time.perf_counter()
        for name, rows in features.items():
            for key, row in zip(batch, rows, strict=True):
                cache.put(name, key, row)
        written += time.perf_counter() - start
    start = time.perf_counter()
    cache.flush()
    written += time.perf_counter() - start

    start = time.perf_counter()
    reader = FeatureCache(root / "cache", cache.fingerprints)  # a new process opening the cache: reads the indexes
    open_seconds = time.perf_counter() - start
    order = keys[:]
    random.Random(0).shuffle(order)
    read_times = []
    for i in range(0, len(order), args.batch):  # a training epoch's random batches, all four experts
        start = time.perf_counter()
        reader.load(order[i : i + args.batch])
        read_times.append(time.perf_counter() - start)

    bytes_per_image = cache.disk_bytes() / args.images
    results = {
        "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO) else args.config,
        "feature_shapes": {name: list(shape) for name, shape in shapes.items()},
        "stored_dtype": "float16",
        "images": args.images,
        "bytes_per_image": int(bytes_per_image),
        "bytes_per_image_by_expert": {name: 2 * shape[0] * shape[1] for name, shape in shapes.items()},
        "terabytes_per_million_images": round(bytes_per_image * 1e6 / 1e12, 2),
        "write_images_per_s": round(args.images / written, 1),
        "write_mb_per_s": round(cache.disk_bytes() / written / 2**20, 1),
        "read_images_per_s": round(args.batch / statistics.median(read_times), 1),
        "read_mb_per_s": round(args.batch * bytes_per_image / statistics.median(read_times) / 2**20, 1),
        "open_seconds": round(open_seconds, 4),
        "fingerprint_seconds": fingerprint_seconds(meta_model),
        "machine": f"{torch.get_num_threads()} threads, {sys.platform}",
    }
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
