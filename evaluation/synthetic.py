"""The synthetic shapes set (astrea.training.data) as benchmarks in `astrea.evaluation.benchmark`'s format.

One folder, images in `images/`, one JSONL file per split and `all.jsonl` with every split:

    vqa              the held-out questions (colour, shape, count, presence, position, largest as categories)
    multiple_choice  the colour and shape questions with four options each
    yes_no           two presence questions per image, one "yes" and one "no" (so MME's acc+ means something)
    caption          "Describe the image briefly." against the image's caption
    grounding        "Where is the <object>?" against its box, for each object its name picks out
    retrieval        each image and its caption

    astrea-eval synthetic --output outputs/benchmarks/synthetic            # held-out images of the demo's data
    astrea-eval synthetic --from-dataset DATA --output DIR                 # a data.path folder's test split
    astrea-eval synthetic --unseen-renderer --output DIR                   # drawn in settings training never uses
"""

import json
import random
from pathlib import Path

from astrea.training.data import (
    CAPTION_PROMPT,
    COLOURS,
    SHAPES,
    build_dataset,
    grounding_pairs,
    grounding_prompt,
)

SPLITS = ("vqa", "multiple_choice", "yes_no", "caption", "grounding", "retrieval")
NUM_OPTIONS = 4


def _options(rng: random.Random, answer: str, pool) -> tuple[list[str], str]:
    options = [answer, *rng.sample([value for value in pool if value != answer], NUM_OPTIONS - 1)]
    rng.shuffle(options)
    return options, chr(ord("A") + options.index(answer))


def _absent(rng: random.Random, labels: list[str]) -> str:
    present = set(labels)
    return rng.choice([f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present])


def synthetic_rows(rows, images: list, seed: int = 0) -> dict[str, list[dict]]:
    """{split: benchmark rows} for data set rows (without their image column) and one image reference per row
    (a path, or anything the caller resolves, such as a feature-cache key). Seeded: the same input always gives
    the same options and absent objects."""
    rng = random.Random(seed)
    splits = {name: [] for name in SPLITS}
    for index, (row, image) in enumerate(zip(rows, images, strict=True)):
        base = {"image": image, "image_id": str(index)}
        for number, qa in enumerate(row["questions"]):
            item = {"question": qa["question"], "category": qa["type"]}
            splits["vqa"].append(
                {"id": f"vqa-{index}-{number}", "task": "vqa", **base, **item, "answers": [qa["answer"]]}
            )
            if qa["type"] in ("colour", "shape"):
                options, letter = _options(rng, qa["answer"], COLOURS if qa["type"] == "colour" else SHAPES)
                splits["multiple_choice"].append(
                    {
                        "id": f"mc-{index}-{number}",
                        "task": "multiple_choice",
                        **base,
                        **item,
                        "options": options,
                        "answers": [letter],
                    }
                )
        for answer, label in (("yes", rng.choice(row["labels"])), ("no", _absent(rng, row["labels"]))):
            splits["yes_no"].append(
                {
                    "id": f"yes_no-{index}-{answer}",
                    "task": "yes_no",
                    **base,
                    "question": f"Is there a {label}?",
                    "answers": [answer],
                    "category": "presence",
                }
            )
        splits["caption"].append(
            {
                "id": f"caption-{index}",
                "task": "caption",
                **base,
                "question": CAPTION_PROMPT,
                "answers": [row["caption"]],
            }
        )
        for number, (label, box) in enumerate(grounding_pairs(row)):
            splits["grounding"].append(
                {
                    "id": f"grounding-{index}-{number}",
                    "task": "grounding",
                    **base,
                    "question": grounding_prompt(label),
                    "box": [float(v) for v in box],
                    "category": f"{len(row['labels'])} objects",
                }
            )
        splits["retrieval"].append(
            {"id": f"retrieval-{index}", "task": "retrieval", **base, "answers": [row["caption"]]}
        )
    return splits


def write_synthetic_benchmark(
    output_dir: str | Path,
    num_images: int = 300,
    image_size: int = 64,
    seed: int = 0,
    from_dataset: str | Path | None = None,
    unseen_renderer: bool = False,
) -> dict[str, int]:
    """Write the benchmark folder; returns {file name: rows}. Without `from_dataset` the images are the held-out
    split of `build_dataset(seed=seed)` (the demo recipe's held-out images for seed 0), or with `unseen_renderer`
    its `unseen` split (drawn with renderer settings that training never uses; the demo's for seed 0)."""
    if from_dataset is not None:
        from datasets import load_from_disk

        if not Path(from_dataset).exists():
            raise ValueError(f"--from-dataset {from_dataset} does not exist.")
        from datasets import DatasetDict

        dataset = load_from_disk(str(from_dataset))
        if not isinstance(dataset, DatasetDict) or "test" not in dataset:
            raise ValueError(f"--from-dataset {from_dataset} must be a DatasetDict folder with a 'test' split.")
        test = dataset["test"]
        missing = [c for c in ("image", "caption", "labels", "boxes", "questions") if c not in test.column_names]
        if missing:
            raise ValueError(f"--from-dataset {from_dataset}: the test split lacks the columns {missing}.")
    else:
        if num_images < 1:
            raise ValueError(f"--num-images must be at least 1, got {num_images}.")
        if unseen_renderer:
            test = build_dataset(0, 0, image_size, seed, num_unseen=num_images)["unseen"]
        else:
            test = build_dataset(num_train=0, num_test=num_images, image_size=image_size, seed=seed)["test"]
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for index, image in enumerate(test["image"]):
        name = f"images/{index:05d}.png"
        image.convert("RGB").save(output_dir / name)
        names.append(name)
    splits = synthetic_rows(test.remove_columns("image"), names, seed)
    written = {}
    for name, split_rows in [*splits.items(), ("all", [row for rows in splits.values() for row in rows])]:
        with open(output_dir / f"{name}.jsonl", "w") as handle:
            for row in split_rows:
                handle.write(json.dumps(row) + "\n")
        written[f"{name}.jsonl"] = len(split_rows)
    return written


__all__ = ["SPLITS", "synthetic_rows", "write_synthetic_benchmark"]
