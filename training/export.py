"""The synthetic shapes set written out as files in public formats, so that it goes through the same loaders
(training/sources.py) as a user's data:

- `images/<split>-<index>.png`;
- `coco_captions_<split>.json` (COCO captions) and `coco_instances_<split>.json` (COCO instances: boxes `[x, y, w,
  h]` in pixels, one category per colour-and-shape label, masks as compressed RLE, and each image entry's `tags`,
  the extension `astrea-data label` also writes);
- `llava_<split>.json` (LLaVA conversation JSON): the training split's questions about an image as single turns
  and (every eighth image) two-turn conversations, or up to `turns_per_row` of them to a conversation in a
  shuffled order, grouped so that no turn gives a later one's answer away (`conversation_groups`); a request for
  the caption of every fourth image, a few
  text-only rows, and the held-out splits' questions one per row with their `category` (the question type, which
  evaluation groups by; "colour (unseen renderer)" and so on for the split drawn in `UNSEEN_STYLE`) and
  `subgroup` (how many objects the image has, which evaluation also reports each type by).

`export_synthetic` returns the recipe `data.sources` entries that read them back.
"""

import json
import random
from pathlib import Path

from .data import CAPTION_PROMPT, SHAPES, UNSEEN_SUFFIX, run_length_decode
from .sources import coco_rle

#: text-only rows mixed into the training conversations (no image: the LLM keeps answering from text)
TEXT_ONLY = [
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("Name a shape with no corners.", "circle"),
    ("Which shapes can appear in the pictures?", ", ".join(SHAPES)),
]


def export_split(rows, split: str, folder: Path, image_size: int, seed: int = 0, turns_per_row: int = 1) -> None:
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    order = random.Random(seed + 1)  # the question order of multi-turn rows (rng's draws stay as they were)
    coco_images, captions, instances, conversations = [], [], [], []
    categories: dict[str, int] = {}
    for index, row in enumerate(rows):
        name = f"{split}-{index:05d}.png"
        row["image"].save(images_dir / name)
        width, height = row["image"].size
        coco_images.append({"id": index, "file_name": name, "width": width, "height": height, "tags": row["tags"]})
        captions.append({"id": index, "image_id": index, "caption": row["caption"]})
        for label, box, runs in zip(row["labels"], row["boxes"], row["masks"], strict=True):
            x0, y0, x1, y1 = (v * side for v, side in zip(box, (width, height, width, height), strict=True))
            instances.append(
                {
                    "id": len(instances),
                    "image_id": index,
                    "category_id": categories.setdefault(label, len(categories) + 1),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": coco_rle(run_length_decode(runs, image_size)),
                    "iscrowd": 0,
                }
            )
        questions = list(row["questions"])
        if split == "train":
            if turns_per_row > 1:  # several of the image's questions per row, in a shuffled order
                order.shuffle(questions)
                groups = conversation_groups(questions, row["labels"], turns_per_row)
            elif index % 8 == 0:  # one per row, but every eighth image's in pairs: multi-turn rows in the mix
                groups = [questions[i : i + 2] for i in range(0, len(questions), 2)]
            else:
                groups = [[question] for question in questions]
            for number, group in enumerate(groups):
                turns = []
                for turn, qa in enumerate(group):
                    turns.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + qa["question"]})
                    turns.append({"from": "gpt", "value": qa["answer"]})
                conversations.append({"id": f"{split}-{index}-{number}", "image": name, "conversations": turns})
            if index % 4 == 0:  # a caption request: MoCo's most specific text about an image
                conversations.append(
                    {
                        "id": f"{split}-{index}-caption",
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                            {"from": "gpt", "value": row["caption"]},
                        ],
                    }
                )
            if rng.random() < 0.05:
                question, answer = rng.choice(TEXT_ONLY)
                conversations.append(
                    {
                        "id": f"{split}-{index}-text",
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                    }
                )
        else:
            for number, qa in enumerate(questions):
                conversations.append(
                    {
                        "id": f"{split}-{index}-{number}",
                        "image": name,
                        "category": qa["type"] + (UNSEEN_SUFFIX if split == "unseen" else ""),
                        "subgroup": objects_group(len(row["labels"])),
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + qa["question"]},
                            {"from": "gpt", "value": qa["answer"]},
                        ],
                    }
                )
    category_list = [{"id": number, "name": label} for label, number in categories.items()]
    write_json(folder / f"coco_captions_{split}.json", {"images": coco_images, "annotations": captions})
    write_json(
        folder / f"coco_instances_{split}.json",
        {"images": coco_images, "annotations": instances, "categories": category_list},
    )
    write_json(folder / f"llava_{split}.json", conversations)


#: question types whose answer an earlier turn of the same conversation could give away: the colour or the shape of
#: an object another turn describes, whether a described object is there, how many objects turns have named
GIVEN_AWAY = ("count", "colour", "shape", "presence")


def question_objects(qa: dict, labels: list[str]) -> set[str]:
    """The image's objects (their "colour shape" labels) that a turn about them could give a `GIVEN_AWAY` question's
    answer away for: a colour or shape question's object (the one its question and answer describe together), and
    for a presence question every object of the colour or the shape it asks about (answered "no", that an object of
    its colour has another shape is the answer). Empty for count questions and the other types."""
    words = set(qa["question"].rstrip("?").split())
    objects = set()
    for label in labels:
        colour, shape = label.split(" ", 1)
        if qa["type"] == "colour" and qa["answer"] == colour and shape in words:
            objects.add(label)
        elif qa["type"] == "shape" and qa["answer"] == shape and colour in words:
            objects.add(label)
        elif qa["type"] == "presence" and (colour in words or shape in words):
            objects.add(label)
    return objects


def conversation_groups(questions: list[dict], labels: list[str], turns: int) -> list[list[dict]]:
    """An image's questions (in their order) as conversations of up to `turns` questions in which no earlier turn
    gives a later answer away: every conversation opens with its `GIVEN_AWAY` questions (a count question first),
    no two of them about the same object (`question_objects`), and its other questions (left/right, which is
    largest: answers that no description gives) follow, at most one question comparing two objects' places in each
    (the same pair asked the other way round has the opposite answer). Every question is asked once."""
    groups: list[tuple[list[dict], set[str]]] = []  # the questions; the objects they are about, "position" if asked
    first = sorted((q for q in questions if q["type"] in GIVEN_AWAY), key=lambda q: q["type"] != "count")
    rest = [q for q in questions if q["type"] not in GIVEN_AWAY]
    for qa in first + rest:
        about = question_objects(qa, labels) | ({"position"} if qa["type"] == "position" else set())
        for asked, objects in groups:
            if len(asked) < turns and not about & objects:
                asked.append(qa)
                objects |= about
                break
        else:
            groups.append(([qa], about))
    return [asked for asked, _ in groups]


def objects_group(count: int) -> str:
    """A held-out row's `subgroup`: how many objects its image has ("1 object", "3 objects"), which evaluation
    reports each question type by (colour questions about one object need no finding by shape; docs/design.md)."""
    return f"{count} object" + ("" if count == 1 else "s")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def export_synthetic(
    dataset, folder: str | Path, image_size: int = 64, seed: int = 0, turns_per_row: int = 1
) -> list[dict]:
    """Write the synthetic set's splits (a DatasetDict with train, test and optionally unseen) under `folder`; the
    `data.sources` of a recipe that trains on them (pre-alignment from the training split's COCO files, instruction
    tuning from its conversations, evaluation on the held-out splits'). `turns_per_row` > 1: each training image's
    questions are shuffled and asked that many to a conversation (the image's visual tokens then serve several
    answers), except presence questions, asked alone; 1: one question per row, every eighth image's in pairs."""
    folder = Path(folder)
    splits = [split for split in ("train", "test", "unseen") if split in dataset]
    for split in splits:
        export_split(dataset[split], split, folder, image_size, seed, turns_per_row)
    return synthetic_sources(folder, unseen="unseen" in splits)


def synthetic_sources(folder: str | Path, unseen: bool = False) -> list[dict]:
    """The `data.sources` entries of the files `export_synthetic` writes under `folder` (`unseen`: with the
    unseen-renderer split's questions, which evaluation reports as "<type> (unseen renderer)")."""
    folder = Path(folder)
    root = str(folder / "images")

    def source(fmt: str, name: str, phases: list[str]) -> dict:
        return {"format": fmt, "path": str(folder / name), "image_root": root, "phases": phases}

    return [
        source("coco_captions", "coco_captions_train.json", ["prealign"]),
        source("coco_instances", "coco_instances_train.json", ["prealign"]),
        source("llava", "llava_train.json", ["instruct"]),
        source("coco_instances", "coco_instances_test.json", ["eval"]),
        source("coco_captions", "coco_captions_test.json", ["eval"]),
        source("llava", "llava_test.json", ["eval"]),
    ] + ([source("llava", "llava_unseen.json", ["eval"])] if unseen else [])


__all__ = ["export_synthetic", "synthetic_sources"]
