"""Ask an Astrea model a question about an image (`make ask`).

    python examples/ask.py [--model outputs/tiny-random] [--image path.png] [--question "..."]
    python examples/ask.py --model outputs/demo/model      # the model `make demo` trained

Without a trained checkpoint it first writes a randomly initialised tiny model (the shipped config, processor
and tokenizer in examples/configs/tiny plus seeded random weights) to `outputs/tiny-random`, so the answer is
noise; what it shows is the whole path: processor -> four experts -> router -> LLM -> generate(), and the
router's share per expert (paper Fig. 2).
"""

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny"


def write_random_tiny_model(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = AstreaForConditionalGeneration(AstreaConfig.from_pretrained(TINY_CONFIG))
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(TINY_CONFIG).save_pretrained(folder)


def example_image() -> Image.Image:
    image = Image.new("RGB", (96, 72), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 10, 40, 42), fill=(200, 30, 30))
    draw.rectangle((52, 24, 88, 60), fill=(30, 60, 200))
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "outputs" / "tiny-random", help="model folder")
    parser.add_argument("--image", type=Path, help="image file (default: a drawn red circle and blue square)")
    parser.add_argument("--question", default="What shapes are in the image?")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()

    if not (args.model / "config.json").exists():
        print(f"No model at {args.model}: writing a randomly initialised tiny Astrea there.")
        write_random_tiny_model(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()

    image = Image.open(args.image) if args.image else example_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")

    with torch.no_grad():
        features = model.get_image_features(**{k: v for k, v in inputs.items() if "pixel" in k}, return_dict=True)
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]

    print(f"Q: {args.question}")
    print(f"A: {answer!r}")
    print(f"{new_tokens} tokens in {seconds:.2f}s; {model.config.num_image_tokens} visual tokens per image")
    share = features.router_probs.mean(dim=(0, 1))
    print("router share per expert:", ", ".join(f"{n} {p:.2f}" for n, p in zip(EXPERT_NAMES, share, strict=True)))


if __name__ == "__main__":
    main()
