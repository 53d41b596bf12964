"""Decode speed with the image's expert features computed once (what generate() does) vs recomputed per token.

    python benchmarks/generate_reuse.py [--model examples/configs/tiny] [--new-tokens 32] [--repeats 5]

"Recomputed" is a greedy loop over the same KV cache that also reruns the four experts and the fusion at every
decode step: the cost generate() avoids by encoding images once at prefill. Prints the median of the repeats.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "configs" / "tiny")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(AstreaConfig.from_pretrained(args.model)).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    inputs = processor(images=[Image.new("RGB", (64, 48), "red")], text=["<image> Describe."], return_tensors="pt")
    pixels = {k: v for k, v in inputs.items() if "pixel" in k}
    n = args.new_tokens

    def reuse():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def recompute():
        out = model(**inputs, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        for _ in range(n - 1):
            model.get_image_features(**pixels)  # the per-step expert run that generate() avoids
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        timings = {}
        for name, fn in (("reuse", reuse), ("recompute", recompute)):
            fn()  # warm-up
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
            timings[name] = statistics.median(runs)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model.name}: {params / 1e6:.2f}M parameters, {n} new tokens, median of {args.repeats}")
    for name, seconds in timings.items():
        print(f"  experts {name:9s}: {n / seconds:8.1f} tokens/s ({seconds * 1000:.1f} ms)")
    print(f"  speed-up from reuse: {timings['recompute'] / timings['reuse']:.2f}x")


if __name__ == "__main__":
    main()
