"""Chat with Astrea about one image from the command line: multi-turn, streamed, experts run once.

    python examples/chat.py --image photo.jpg [--model outputs/tiny-random] [--max-new-tokens 64]

Type a question per line; an empty line or end of input quits. The image goes through the four experts once,
on the first turn; every later turn reuses the experts' features (`expert_features`) instead of running the
experts again, and routes them afresh for its own question (a task-aware router reads it). Answers stream token
by token (`TextIteratorStreamer`, through app.py's `stream_generate`).
If answering fails (the experts or generation: out of memory, say), the error is one line on stderr and the
exit status is 1.
"""

import argparse
import sys
from pathlib import Path

import torch
from app import GenerationError, encode_image, stream_generate  # examples/app.py (gradio only in its web UI)
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import modeling_astrea  # noqa: F401  (registers Astrea with the Auto classes)

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="the image to talk about")
    parser.add_argument("--model", type=Path, default=REPO / "outputs" / "tiny-random", help="model folder")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    images_encoded = []
    model.model.experts["caption"].register_forward_hook(lambda m, a, o: images_encoded.append(a[0].shape[0]))

    image_inputs = processor.image_processor(Image.open(args.image), return_tensors="pt")
    num_tiles = int(image_inputs.pop("num_tiles").sum())
    expert_features = None
    messages = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        question = sys.stdin.readline().strip()
        if not question:
            break
        content = [{"type": "text", "text": question}]
        if not messages:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        expanded = processor.image_token * (processor.num_image_tokens * num_tiles)
        prompt = prompt.replace(processor.image_token, expanded)
        inputs = processor.tokenizer(prompt, return_tensors="pt")

        print("astrea> ", end="", flush=True)
        answer = ""
        try:
            with torch.no_grad():
                if expert_features is None:
                    expert_features = encode_image(model, experts_only=True, **image_inputs)  # the experts' only run
                features = model.get_image_features(  # the router, for this turn's prompt
                    expert_features=expert_features,
                    prompt_input_ids=inputs["input_ids"],
                    prompt_attention_mask=inputs["attention_mask"],
                    return_dict=True,
                )
            pieces = stream_generate(
                model,
                processor.tokenizer,
                **inputs,
                mm_encoder_outputs={"image": features},
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
            for piece in pieces:
                answer += piece
                print(piece, end="", flush=True)
        except GenerationError as error:
            print(flush=True)
            print(f"chat.py: {' '.join(str(error).split())}", file=sys.stderr)  # one line, however long
            raise SystemExit(1) from None
        print()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    print(f"[{len(messages) // 2} turns; the experts encoded {sum(images_encoded)} image(s) in all]")


if __name__ == "__main__":
    main()
