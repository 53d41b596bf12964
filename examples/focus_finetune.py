"""Can a trained model learn one question type, or does it only fail to? Fine-tunes the model an `astrea-train all`
run wrote on that type's training questions alone (or on the whole mix, or alone first and then the mix) and prints
held-out accuracy on that type as it goes. docs/design.md ("Why left/right stays at chance") reports what it showed.

    python examples/focus_finetune.py --run outputs/demo --question "on the left or the right?"
    python examples/focus_finetune.py --run outputs/demo --question "on the left or the right?" --mix-from 0
    python examples/focus_finetune.py --run outputs/demo --question "on the left or the right?" --mix-from 200

`--question` picks the questions that contain it (training rows are split into single questions, as evaluation asks
them); `--mix-from N` switches to every image question from step N on (0: the mix throughout), with
`--focus-share` of each batch drawn from the chosen questions (over-sampling them). The run's recipe,
data files and feature cache are reused; nothing in the run folder is changed (the model is fine-tuned in memory).
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from astrea.training import pipeline
from astrea.training.export import synthetic_sources
from astrea.training.recipe import Recipe


def single_questions(examples: list[dict], contains: str) -> list[dict]:
    """Each image conversation's (question, answer) turns that contain `contains`, as one-question rows with the
    image before the question (the recipe's focus stage picks its questions the same way)."""
    return [example for example in pipeline.focus_examples(examples, contains) if example["keys"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an astrea-train all output folder")
    parser.add_argument("--question", required=True, help="text the chosen questions contain")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mix-from", type=int, default=None, help="train on every image question from this step")
    parser.add_argument(
        "--focus-share", type=float, default=0.0, help="in the mix, this share of each batch is chosen questions"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--eval-size", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.focus_share <= 1:
        parser.error(f"--focus-share is a share of each batch, from 0 to 1, not {args.focus_share}")
    for name in ("recipe.json", "model"):
        if not (args.run / name).exists():
            parser.error(f"{args.run / name} does not exist: --run takes a finished astrea-train all output folder")

    spec = json.loads((args.run / "recipe.json").read_text())
    if spec["data"].get("files"):  # the synthetic set the run wrote: read back as the data.sources it is
        files = args.run / spec["data"]["files"]  # (an absolute path stays as it is)
        spec["data"]["sources"] = synthetic_sources(files, unseen=(files / "llava_unseen.json").exists())
        spec["data"].update(files=None, num_unseen=0, turns_per_row=1)
    if not spec["data"].get("sources"):
        parser.error("the run did not train from data.sources or data.files, whose conversations this script reads")
    spec["model"]["pretrained"] = str(args.run / "model")
    spec["output_dir"] = tempfile.mkdtemp(prefix="focus-")
    ws = pipeline.prepare(Recipe.from_dict(spec))
    model = ws.model
    model.model.alignment = None
    model.config.use_moco = False  # the language-modelling loss alone: the question is what the LLM can learn

    training = pipeline.conversation_examples(ws.records["instruct"])
    focus = single_questions(training, args.question)
    mix = single_questions(training, "?")
    heldout = [
        example
        for example in pipeline.conversation_examples([r for r in ws.records["eval"] if "messages" in r])
        if args.question in example["messages"][-2]["content"] and "unseen" not in example["type"]
    ][: args.eval_size]
    if not focus or not heldout:
        parser.error(f"no training ({len(focus)}) or held-out ({len(heldout)}) question contains {args.question!r}")
    if min(len(focus), len(mix)) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} is more than the {min(len(focus), len(mix))} questions to draw")
    print(f"{len(focus)} training questions contain {args.question!r}, of {len(mix)}; {len(heldout)} held out")

    # everything but the frozen experts: instruction tuning's modules and the LLM, and the projectors too
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not name.startswith("model.experts.") and "momentum" not in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)  # the router's prompt dropout draws from it
    print(f"step 0: held-out accuracy {pipeline.answer_accuracy(ws, heldout):.1%}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        mixing = args.mix_from is not None and step > args.mix_from
        chosen = round(args.focus_share * args.batch_size) if mixing else args.batch_size
        batch = rng.sample(focus, chosen) + rng.sample(mix, args.batch_size - chosen)
        model.train()
        loss = model(**ws.collator(batch), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.every == 0 or step == args.steps:
            accuracy = pipeline.answer_accuracy(ws, heldout)
            source = f"mix, {args.focus_share:.0%} chosen" if mixing else "focus"
            print(
                f"step {step} ({source}): loss {loss.item():.3f}, held-out accuracy {accuracy:.1%}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
