"""How many rows per second the training data path sustains (`make bench-data`): the loaders of
training/sources.py (LLaVA conversations, COCO instances with RLE masks, which are decoded to be checked), the
collator (chat template, tokens, labels), and the pseudo-labeller on tiny random models (its real cost is the
three real models, which are not runnable here).

    python benchmarks/data.py [--rows 20000]

Files are written to a temporary folder from the synthetic set (training/export.py), repeated to `--rows`.
Writes `benchmarks/data.json`.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "training")]  # astrea_testing; the tiny labeller models


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "data.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoProcessor

    from astrea.training.collator import AstreaCollator
    from astrea.training.data import build_dataset
    from astrea.training.export import export_synthetic
    from astrea.training.sources import BadRows, SourceArgs, read_source

    root = Path(tempfile.mkdtemp(prefix="astrea-data-bench-"))
    specs = export_synthetic(build_dataset(200, 20, 64, seed=0), root / "files")
    results = {}
    for name, spec in (("llava", specs[2]), ("coco_instances", specs[1])):
        path = Path(spec["path"])
        data = json.loads(path.read_text())
        if name == "llava":
            data = (data * (args.rows // len(data) + 1))[: args.rows]
            rows = len(data)
        else:
            copies = args.rows // len(data["images"]) + 1
            images = [{**image, "id": image["id"] + k * 100000} for k in range(copies) for image in data["images"]]
            annotations = [
                {**a, "id": a["id"] + k * 1000000, "image_id": a["image_id"] + k * 100000}
                for k in range(copies)
                for a in data["annotations"]
            ]
            data = {**data, "images": images, "annotations": annotations}
            rows = len(annotations)
        big = path.with_name(f"big-{path.name}")
        big.write_text(json.dumps(data))
        start = time.perf_counter()
        records = read_source(SourceArgs(**{**spec, "path": str(big)}), BadRows())
        results[f"{name}_rows_per_s"] = rate(rows, time.perf_counter() - start)
        results[f"{name}_rows"] = rows
        if name == "llava":
            conversations = records

    processor = AutoProcessor.from_pretrained(REPO / "examples" / "configs" / "tiny")

    class Cache:  # the collator's own work only: features are the feature cache's (see make bench-cache)
        def load(self, keys, experts=None):
            return {"caption": torch.zeros(len(keys), 1)}

    collator = AstreaCollator(processor, Cache())
    examples = [
        {"keys": ["k"] * len(r["images"]), "messages": r["messages"], "frames": r["frames"]} for r in conversations
    ]
    start = time.perf_counter()
    for index in range(0, len(examples), 32):
        collator(examples[index : index + 32])
    results["collator_rows_per_s"] = rate(len(examples), time.perf_counter() - start)

    from test_labeller import tiny_models

    from astrea.training import labeller

    models = tiny_models(root / "models")
    out = root / "labels"
    captions = specs[0]
    argv = ["label", "--path", captions["path"], "--image-root", captions["image_root"], "--out", str(out),
            "--tagger", models["tagger"], "--detector", models["detector"], "--segmenter", models["segmenter"],
            "--box-threshold", "0.0", "--tag-threshold", "0.0", "--batch-size", "16"]  # fmt: skip
    start = time.perf_counter()
    labeller.main(argv)
    results["labeller_tiny_images_per_s"] = rate(200, time.perf_counter() - start)
    results["machine"] = f"{torch.get_num_threads()} threads"
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
