"""Examples for each phase and the collator that turns them into model inputs with cached expert features.

An example is a dict `{"key": image content hash, "prompt": str, "answer": str, "type": str}`. The collator writes
the chat (user: image + prompt; assistant: answer + EOS), expands the image placeholder, masks everything but the
answer in `labels`, pads on the right, and reads each image's expert features from the feature cache, so no
expert runs during training.
"""

import torch

from .data import CAPTION_PROMPT, box_text, grounding_pairs, grounding_prompt, region_text
from .feature_cache import FeatureCache
from .recipe import INSTRUCTION_TASKS

#: What each pre-alignment stage asks for; stage k's instruction and target cover stages 1..k (Sec. 3.1.3).
STAGE_TASKS = {"caption": "caption", "classification": "tags", "detection": "boxes", "segmentation": "regions"}


def stage_target(row: dict, stages: list[str], image_size: int) -> tuple[str, str]:
    """(instruction, target text) for a data set row at a stage covering `stages` (cumulative)."""
    parts = []
    for stage in stages:
        if stage == "caption":
            parts.append(f"Caption: {row['caption']}")
        elif stage == "classification":
            parts.append(f"Tags: {', '.join(row['tags'])}.")
        elif stage == "detection":
            boxes = "; ".join(
                f"{label} {box_text(box)}" for label, box in zip(row["labels"], row["boxes"], strict=True)
            )
            parts.append(f"Boxes: {boxes}.")
        elif stage == "segmentation":
            regions = "; ".join(
                region_text(mask, image_size, label) for label, mask in zip(row["labels"], row["masks"], strict=True)
            )
            parts.append(f"Regions: {regions}.")
    return ", ".join(STAGE_TASKS[s] for s in stages), " ".join(parts)


def prealign_examples(rows, keys: list[str], stages: list[str], image_size: int) -> list[dict]:
    """One example per image: the cumulative stage target. `rows` are the data set's rows without images and
    `keys` their images' content hashes (see `pipeline.prepare`)."""
    examples = []
    for row, key in zip(rows, keys, strict=True):
        prompt, answer = stage_target(row, stages, image_size)
        examples.append({"key": key, "prompt": prompt, "answer": answer, "type": "+".join(stages)})
    return examples


def question_examples(rows, keys: list[str]) -> list[dict]:
    """One example per question."""
    examples = []
    for row, key in zip(rows, keys, strict=True):
        for qa in row["questions"]:
            examples.append({"key": key, "prompt": qa["question"], "answer": qa["answer"], "type": qa["type"]})
    return examples


def instruction_examples(rows, keys: list[str], tasks=("questions",)) -> list[dict]:
    """Instruction-tuning examples of the chosen `tasks`, image by image: the data set's questions, "caption"
    (CAPTION_PROMPT -> the caption) and "grounding" ("Where is the <label>?" -> its box), worded as the
    evaluation splits are (astrea.evaluation.synthetic)."""
    unknown = [task for task in tasks if task not in INSTRUCTION_TASKS]
    if unknown:
        raise ValueError(f"unknown instruction task {unknown[0]!r}; tasks are {INSTRUCTION_TASKS}.")
    examples = []
    for row, key in zip(rows, keys, strict=True):
        if "questions" in tasks:
            examples.extend(question_examples([row], [key]))
        if "caption" in tasks:
            examples.append({"key": key, "prompt": CAPTION_PROMPT, "answer": row["caption"], "type": "caption"})
        if "grounding" in tasks:
            for label, box in grounding_pairs(row):
                prompt, answer = grounding_prompt(label), box_text(box)
                examples.append({"key": key, "prompt": prompt, "answer": answer, "type": "grounding"})
    return examples


MEMO_SIZE = 100_000  # tokenized texts kept per collator
MEMO_ANSWER_CHARS = 64  # answers longer than this are tokenized every time


class AstreaCollator:
    """Examples -> `input_ids`, `attention_mask`, `labels` (answer tokens only) and `expert_features`."""

    def __init__(self, processor, cache: FeatureCache, experts: tuple[str, ...] | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cache = cache
        self.experts = experts
        self._token_ids: dict[tuple[str, str], list[int]] = {}  # prompts and answers repeat: tokenize each once

    def _tokenized(self, kind: str, text: str, render) -> list[int]:
        ids = self._token_ids.get((kind, text))
        if ids is None:
            ids = self.tokenizer(render(text), add_special_tokens=False)["input_ids"]
            if len(self._token_ids) < MEMO_SIZE:
                self._token_ids[(kind, text)] = ids
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._tokenized("prompt", prompt, self.prompt_text)

    def answer_text(self, answer: str) -> str:
        return " " + answer + self.tokenizer.eos_token

    def answer_ids(self, answer: str) -> list[int]:
        if len(answer) > MEMO_ANSWER_CHARS:  # captions, boxes, regions: unique per image, not worth keeping
            return self.tokenizer(self.answer_text(answer), add_special_tokens=False)["input_ids"]
        return self._tokenized("answer", answer, self.answer_text)

    def prompt_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_tokens = self.processor.image_token * self.processor.num_image_tokens
        return text.replace(self.processor.image_token, image_tokens)

    def __call__(self, examples: list[dict]) -> dict:
        rows, labels = [], []
        for example in examples:
            prompt, answer = self.prompt_ids(example["prompt"]), self.answer_ids(example["answer"])
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        length = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([row + [pad] * (length - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows]),
            "labels": torch.tensor([label + [-100] * (length - len(label)) for label in labels]),
        }
        batch["expert_features"] = self.cache.load([example["key"] for example in examples], self.experts)
        return batch

    def generation_inputs(self, examples: list[dict]) -> dict:
        """Prompts only, padded on the left, with the cached expert features: for greedy answers."""
        texts = [self.prompt_text(example["prompt"]) for example in examples]
        batch = dict(
            self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        )
        batch["expert_features"] = self.cache.load([example["key"] for example in examples], self.experts)
        return batch


__all__ = [
    "AstreaCollator",
    "instruction_examples",
    "prealign_examples",
    "question_examples",
    "stage_target",
]
