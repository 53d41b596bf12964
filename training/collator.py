"""Examples for each phase and the collator that turns them into model inputs with cached expert features.

An example is a conversation, `{"keys": [image content hashes], "messages": [{"role", "content"}], "type": str}`,
each image an `<image>` marker in a user turn (sources.py reads LLaVA and TRL data into this form), or its
single-turn shorthand `{"key", "prompt", "answer", "type"}` (one image, then the prompt; the synthetic set's
examples). The collator writes the conversation with the processor's chat template, expands each image
placeholder, puts labels on every assistant turn (its text and end-of-turn token) and nowhere else (system
prompt, user turns, images, the template's own words), pads on the right, and reads the images' expert features
from the feature cache, so no expert runs during training. Rows without images, with several or with a video (one
image per frame, as the processor writes it) mix freely in a batch.
"""

import re

import numpy as np
import torch

from .data import CAPTION_PROMPT, box_text, grounding_pairs, grounding_prompt, mask_text, region_text
from .feature_cache import FeatureCache
from .recipe import INSTRUCTION_TASKS

#: What each pre-alignment stage asks for; stage k's instruction and target cover stages 1..k (Sec. 3.1.3).
STAGE_TASKS = {"caption": "caption", "classification": "tags", "detection": "boxes", "segmentation": "regions"}


def stage_target(row: dict, stages: list[str], image_size: int, regions: list[str] | None = None) -> tuple[str, str]:
    """(instruction, target text) for a data set row at a stage covering `stages` (cumulative). `regions`: the
    masks already in words (else the row's masks are the synthetic set's `image_size` run-length masks)."""
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
            if regions is None:
                masks = zip(row["labels"], row["masks"], strict=True)
                regions = [region_text(mask, image_size, label) for label, mask in masks]
            parts.append(f"Regions: {'; '.join(regions)}.")
    return ", ".join(STAGE_TASKS[s] for s in stages), " ".join(parts)


def annotation_target(record: dict, stages: list[str]) -> tuple[str, str] | None:
    """`stage_target` for an annotation record (sources.py: boxes normalised, COCO masks at the image's size);
    None when the record lacks a target the stages need (a caption-only image at the detection stage)."""
    from .sources import decode_mask

    has = {
        "caption": bool(record["caption"]),
        "classification": bool(record["tags"]),
        "detection": bool(record["boxes"]),
        "segmentation": bool(record["masks"]) and all(mask is not None for mask in record["masks"]),
    }
    if not all(has[stage] for stage in stages):
        return None
    regions = None
    if "segmentation" in stages:
        masks = zip(record["labels"], record["masks"], strict=True)
        regions = [mask_text(decode_mask(mask, record["height"], record["width"]), label) for label, mask in masks]
    return stage_target(record, stages, 0, regions)


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
ROW_MEMO_TOKENS = 16_000_000  # whole rows kept per collator, in tokens (about 200 MB of int32 arrays)
MEMO_TEXT_CHARS = 256  # longer texts (captions, boxes, regions, long turns) are tokenized every time
SENTINEL = "\u2063ASTREA-TURN\u2063"  # stands in for an assistant turn's text when the template is rendered
IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"


def as_conversation(example: dict) -> tuple[list[str], list[dict], tuple[int, ...]]:
    """(image keys, messages, frames per video) of an example in any form (of an example with `branches`, its
    first branch)."""
    if "branches" in example:
        return list(example.get("keys") or []), list(example["branches"][0]), tuple(example.get("frames") or ())
    if "messages" in example:
        return list(example.get("keys") or []), list(example["messages"]), tuple(example.get("frames") or ())
    messages = [{"role": "user", "content": "<image>\n" + example["prompt"]}]
    if "answer" in example:  # (a shorthand for generation may have none)
        messages.append({"role": "assistant", "content": example["answer"]})
    return [example["key"]], messages, ()


def padded(rows: list, value, dtype=np.int64) -> torch.Tensor:
    """Rows of different lengths, padded on the right with `value` to the longest: [len(rows), longest]."""
    out = np.full((len(rows), max(map(len, rows), default=0)), value, dtype=dtype)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return torch.from_numpy(out)


class AstreaCollator:
    """Examples -> `input_ids`, `attention_mask`, `labels` (assistant turns only) and `expert_features`."""

    def __init__(self, processor, cache: FeatureCache, experts: tuple[str, ...] | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cache = cache
        self.experts = experts
        self._memo: dict[tuple, object] = {}  # rendered and tokenized texts repeat: each is made once
        self._rows: dict[tuple, tuple[np.ndarray, ...]] = {}  # and so do whole rows, once an epoch
        self._row_tokens = 0

    def _memoised(self, key: tuple, make):
        value = self._memo.get(key)
        if value is None:
            value = make()
            if len(self._memo) < MEMO_SIZE:
                self._memo[key] = value
        return value

    def _ids(self, text: str) -> list[int]:
        make = lambda: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return make() if len(text) > MEMO_TEXT_CHARS else self._memoised(("ids", text), make)

    def _render(self, messages: list[dict], generation_prompt: bool, frames: tuple[int, ...] = ()) -> str:
        """The chat template's text for these messages (image and video markers as parts), placeholders expanded:
        a video to one image per frame (`frames`: each video's frame count, in order), as the processor does."""
        key = ("render", generation_prompt, frames, *((m["role"], m["content"]) for m in messages))

        def make():
            parts = [{"role": m["role"], "content": content_parts(m["content"])} for m in messages]
            text = self.processor.apply_chat_template(parts, add_generation_prompt=generation_prompt)
            image = self.processor.image_token
            pieces = text.split(VIDEO_MARKER)
            text = pieces[0] + "".join(image * n + piece for n, piece in zip(frames, pieces[1:], strict=False))
            return text.replace(image, image * self.processor.num_image_tokens)

        return self._memoised(key, make)

    def _assistant_wrapping(self, history: list[dict], frames: tuple[int, ...] = ()) -> tuple[str, str]:
        """What the template writes around an assistant turn after `history`: (before its text, after it)."""
        prompt = self._render(history, True, frames)
        full = self._render([*history, {"role": "assistant", "content": SENTINEL}], False, frames)
        if not full.startswith(prompt) or full.count(SENTINEL) != 1:
            raise ValueError(
                "The chat template does not write a conversation as its earlier turns followed by the next one; "
                "Astrea's collator needs that to put labels on the assistant turns."
            )
        before, after = full[len(prompt) :].split(SENTINEL)
        return before, after

    def tokenize(self, messages: list[dict], frames: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a conversation; it ends with the last assistant turn's end-of-turn token."""
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        ids, labels, written = [], [], ""
        eos = self.tokenizer.eos_token
        for index, message in enumerate(messages[: last + 1]):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], True, frames)
            if not prompt.startswith(written):
                raise ValueError(
                    "The chat template rewrites earlier turns when a turn is added; see _assistant_wrapping."
                )
            before, after = self._assistant_wrapping(messages[:index], frames)
            # the turn's labelled text runs to the end-of-turn token; what follows it (a newline) is context
            turn = before + message["content"] + after
            end = turn.rfind(eos) + len(eos) if eos and eos in after else len(turn)
            context = self._ids(prompt[len(written) :])
            answer = self._ids(turn[:end])
            ids += context + answer
            labels += [-100] * len(context) + answer
            written = prompt + turn[:end]
            if index < last and end < len(turn):
                tail = self._ids(turn[end:])
                ids += tail
                labels += [-100] * len(tail)
                written += turn[end:]
        return ids, labels

    def length(self, example: dict) -> int:
        """Tokens of an example's row (for checking against a maximum length, and for length grouping)."""
        return len(self._row_arrays(example)[0])

    def row(self, example: dict) -> tuple[list[int], list[int], list[int]]:
        """(input ids, labels, branch ids) of an example's row. An example with `branches` (conversations about
        the same images, `pipeline.image_bundles`) is one row: the tokens its conversations share (the images and
        what comes before the first question) once, then each conversation's own tokens as branch 1, 2, ...; the
        model keeps the branches from seeing each other (`branch_attention`), so each is computed exactly as it
        would be alone. Branch ids are 0 elsewhere."""
        return tuple(part.tolist() for part in self._row_arrays(example))

    def _row_arrays(self, example: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`row` as int32 arrays, made once per distinct row (while ROW_MEMO_TOKENS lasts); not to be changed."""
        if "branches" in example:
            conversations, frames = example["branches"], tuple(example.get("frames") or ())
        else:
            _, messages, frames = as_conversation(example)
            conversations = [messages]
        key = (frames, *(tuple((m["role"], m["content"]) for m in messages) for messages in conversations))
        row = self._rows.get(key)
        if row is None:
            made = self._row(conversations, frames, example.get("keys"))
            row = tuple(np.asarray(part, dtype=np.int32) for part in made)
            if self._row_tokens + len(row[0]) <= ROW_MEMO_TOKENS:
                self._rows[key] = row
                self._row_tokens += len(row[0])
        return row

    def _row(self, conversations: list, frames: tuple[int, ...], keys) -> tuple[list[int], list[int], list[int]]:
        if len(conversations) == 1:
            ids, labels = self.tokenize(list(conversations[0]), frames)
            return ids, labels, [0] * len(ids)
        rendered = [self.tokenize(list(messages), frames) for messages in conversations]
        shared = 0
        first = rendered[0][0]
        while shared < len(first) and all(len(ids) > shared and ids[shared] == first[shared] for ids, _ in rendered):
            shared += 1
        # a branch starts with a token no label scores (in the row, the token before it is another branch's), and
        # holds at least one token of its own
        while shared > 0 and any(len(ids) == shared or labels[shared] != -100 for ids, labels in rendered):
            shared -= 1
        image = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        if any(image in ids[shared:] for ids, _ in rendered):
            raise ValueError(
                f"The conversations bundled about images {keys} differ before their last image, so "
                "they cannot share it; bundle only conversations that open with the same images."
            )
        ids, labels = list(first[:shared]), list(rendered[0][1][:shared])
        branch_ids = [0] * shared
        for number, (branch, branch_labels) in enumerate(rendered, start=1):
            ids += branch[shared:]
            labels += branch_labels[shared:]
            branch_ids += [number] * (len(branch) - shared)
        return ids, labels, branch_ids

    def _features(self, keys: list[str]) -> dict:
        return {"expert_features": self.cache.load(keys, self.experts)} if keys else {}

    def __call__(self, examples: list[dict]) -> dict:
        rows, labels, branches, keys = [], [], [], []
        for example in examples:
            ids, row_labels, branch_ids = self._row_arrays(example)
            rows.append(ids)
            labels.append(row_labels)
            branches.append(branch_ids)
            keys += as_conversation(example)[0]
        batch = {
            "input_ids": padded(rows, self.tokenizer.pad_token_id),
            "attention_mask": padded([np.ones(len(row), dtype=np.int64) for row in rows], 0),
            "labels": padded(labels, -100),
        }
        if any(row.any() for row in branches):
            batch["branch_ids"] = padded(branches, 0)
        return batch | self._moco_texts(examples) | self._features(keys)

    def _moco_texts(self, examples: list[dict]) -> dict:
        """Examples with a `moco_text` (an image's caption; pipeline.with_moco_captions): MoCo's text written as
        retrieval reads a caption, the answer to CAPTION_PROMPT in the chat template, with the caption and its
        end-of-turn token to pool over (`moco_pool_mask`). Rows without one are all padding and keep their own
        text; no entries at all when no example has one."""
        texts = [example.get("moco_text") for example in examples]
        if not any(texts):
            return {}
        rows, pools = [], []
        for text in texts:
            ids, labels = ([], []) if not text else self.tokenize(caption_request(text))
            rows.append(ids)
            pools.append([label != -100 for label in labels])
        return {
            "moco_input_ids": padded(rows, self.tokenizer.pad_token_id),
            "moco_attention_mask": padded([[1] * len(row) for row in rows], 0),
            "moco_pool_mask": padded(pools, False, np.bool_),
        }

    def generation_inputs(self, examples: list[dict]) -> dict:
        """The conversations up to their last assistant turn (which the model is to write), padded on the left,
        with the cached expert features: for greedy answers. A shorthand example needs only `key` and `prompt`."""
        texts, keys = [], []
        for example in examples:
            if len(example.get("branches") or ()) > 1:
                raise ValueError("generation_inputs takes one conversation an example, not `branches`.")
            example_keys, messages, frames = as_conversation(example)
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            texts.append(self._render(messages[: answers[-1]] if answers else messages, True, frames))
            keys += example_keys
        batch = dict(
            self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        )
        return batch | self._features(keys)


def caption_request(caption: str) -> list[dict]:
    """A caption as the answer to CAPTION_PROMPT (no image): how MoCo and retrieval read an image's caption."""
    return [{"role": "user", "content": CAPTION_PROMPT}, {"role": "assistant", "content": caption}]


def content_parts(content: str) -> list[dict]:
    """A turn's text with `<image>` / `<video>` markers -> typed parts (the chat template writes each image or video
    part itself, with the newline that follows a marker in LLaVA data)."""
    parts = []
    for piece in re.split(f"({IMAGE_MARKER}|{VIDEO_MARKER})", content):
        if piece in (IMAGE_MARKER, VIDEO_MARKER):
            parts.append({"type": piece.strip("<>")})
            continue
        if parts and parts[-1]["type"] != "text":
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


__all__ = [
    "AstreaCollator",
    "as_conversation",
    "content_parts",
    "instruction_examples",
    "prealign_examples",
    "question_examples",
    "stage_target",
]
