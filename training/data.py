"""The synthetic shapes data set: images the project draws itself, with every label the recipe needs.

Each image holds 1-3 shapes of several kinds, colours, sizes and positions on a varied background (flat, gradient,
or noise), and comes with a caption, tags, boxes (normalised x0, y0, x1, y1), masks (run-length encoded), and
question/answer pairs of six types: colour, shape, count, presence, position, largest. `build_dataset` returns a
`datasets.DatasetDict` with `train` and `test` (held-out) splits; the same seed always gives the same data.
"""

import math
import random

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.18, "medium": 0.28, "large": 0.40}  # side as a fraction of the image
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ("colour", "shape", "count", "presence", "position", "largest")
#: Instructions beyond the questions (instruction data `tasks`, and the evaluation splits that test them)
CAPTION_PROMPT = "Describe the image briefly."

FEATURES = Features(
    {
        "image": Image(),
        "caption": Value("string"),
        "tags": List(Value("string")),
        "boxes": List(List(Value("float32"))),
        "labels": List(Value("string")),
        "masks": List(List(Value("int32"))),
        "questions": List({"type": Value("string"), "question": Value("string"), "answer": Value("string")}),
    }
)


def _background(rng: random.Random, size: int) -> PILImage.Image:
    kind = rng.choice(("flat", "gradient", "noise"))
    base = np.array([rng.randint(150, 250) for _ in range(3)], dtype=np.float32)
    if kind == "flat":
        array = np.broadcast_to(base, (size, size, 3))
    elif kind == "gradient":
        other = np.array([rng.randint(150, 250) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        array = np.broadcast_to(base * (1 - t) + other * t, (size, size, 3))
    else:
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
        array = base + noise
    return PILImage.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = w / 3, h / 3
        return [
            (x0 + a, y0),
            (x1 - a, y0),
            (x1 - a, y0 + b),
            (x1, y0 + b),
            (x1, y1 - b),
            (x1 - a, y1 - b),
            (x1 - a, y1),
            (x0 + a, y1),
            (x0 + a, y1 - b),
            (x0, y1 - b),
            (x0, y0 + b),
            (x0 + a, y0 + b),
        ]
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(shape, box), fill=fill)


def run_length_encode(mask: np.ndarray) -> list[int]:
    """Flattened (row-major) binary mask -> [start, length, start, length, ...] of its runs of ones."""
    flat = np.concatenate([[0], mask.flatten().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).flatten().tolist()


def run_length_decode(runs: list[int], size: int) -> np.ndarray:
    mask = np.zeros(size * size, dtype=bool)
    for start, length in zip(runs[::2], runs[1::2], strict=True):
        mask[start : start + length] = True
    return mask.reshape(size, size)


def _overlaps(box, boxes, margin: float) -> bool:
    return any(
        box[0] < b[2] + margin and b[0] < box[2] + margin and box[1] < b[3] + margin and b[1] < box[3] + margin
        for b in boxes
    )


def _place(rng: random.Random, count: int, size: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Sizes and non-overlapping boxes (in pixels) for `count` objects of distinct sizes."""
    for _ in range(100):
        placed = []
        for size_name in rng.sample(list(SIZES), count):
            side = SIZES[size_name] * size
            for _ in range(50):
                x0, y0 = rng.uniform(1, size - side - 1), rng.uniform(1, size - side - 1)
                box = (x0, y0, x0 + side, y0 + side)
                if not _overlaps(box, [b for _, b in placed], margin=2):
                    placed.append((size_name, box))
                    break
        if len(placed) == count:
            return placed
    raise RuntimeError("could not place the objects")  # unreachable with the sizes above


def _describe(obj) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _questions(rng: random.Random, objects: list[dict], every_object: bool = False) -> list[dict]:
    """Questions about one image. Colour and shape questions ask about one random object, or about every object
    (`every_object`) that its shape (colour) names unambiguously; the random draws are the same either way."""
    questions = []
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    chosen = rng.choice(objects)
    for target in objects if every_object else [chosen]:
        if shapes.count(target["shape"]) == 1:
            questions.append(
                {"type": "colour", "question": f"What colour is the {target['shape']}?", "answer": target["colour"]}
            )
        if colours.count(target["colour"]) == 1:
            questions.append(
                {
                    "type": "shape",
                    "question": f"What shape is the {target['colour']} object?",
                    "answer": target["shape"],
                }
            )
    questions.append(
        {"type": "count", "question": "How many objects are there?", "answer": NUMBER_WORDS[len(objects)]}
    )
    if rng.random() < 0.5:
        asked, answer = rng.choice(objects), "yes"
    else:
        present = {(o["colour"], o["shape"]) for o in objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        asked, answer = {"colour": colour, "shape": shape}, "no"
    questions.append({"type": "presence", "question": f"Is there a {_describe(asked)}?", "answer": answer})
    if len(objects) >= 2:
        a, b = rng.sample(objects, 2)
        if len({_describe(o) for o in objects}) == len(objects) and abs(a["center"][0] - b["center"][0]) > 0.1:
            side = "left" if a["center"][0] < b["center"][0] else "right"
            questions.append(
                {
                    "type": "position",
                    "question": f"Is the {_describe(a)} left or right of the {_describe(b)}?",
                    "answer": side,
                }
            )
        largest = max(objects, key=lambda o: o["area"])
        questions.append({"type": "largest", "question": "Which object is the largest?", "answer": _describe(largest)})
    return questions


def draw_example(rng: random.Random, size: int = 64, every_object: bool = False) -> dict:
    """One image and all its labels (`every_object`: see `_questions`)."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    objects = []
    for size_name, box in _place(rng, rng.randint(1, 3), size):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        _draw(draw, shape, box, COLOURS[colour])
        mask_image = PILImage.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(mask_image), shape, box, 255)
        mask = np.asarray(mask_image) > 0
        ys, xs = np.nonzero(mask)
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size_name,
                "mask": run_length_encode(mask),
                "box": [round(v / size, 3) for v in box],
                "area": float(mask.mean()),
                "center": (float(xs.mean()) / size, float(ys.mean()) / size),
            }
        )
    objects.sort(key=lambda o: o["center"][0])  # left to right, so captions read the way the image does
    names = [f"a {o['size']} {_describe(o)}" for o in objects]
    caption = (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]) + "."
    return {
        "image": image,
        "caption": caption[0].upper() + caption[1:],
        "tags": sorted({o["shape"] for o in objects} | {o["colour"] for o in objects}),
        "boxes": [o["box"] for o in objects],
        "labels": [_describe(o) for o in objects],
        "masks": [o["mask"] for o in objects],
        "questions": _questions(rng, objects, every_object),
    }


def build_dataset(
    num_train: int = 2000, num_test: int = 300, image_size: int = 64, seed: int = 0, every_object: bool = True
) -> DatasetDict:
    """Train and held-out test splits, drawn from independent random streams of the same seed.

    With `every_object`, training images get colour and shape questions about each of their objects (more
    binding practice per image); the test split always asks about one random object per image."""

    def split(count: int, stream: int, every: bool) -> Dataset:
        rng = random.Random(seed * 1000003 + stream)
        rows = [draw_example(rng, image_size, every) for _ in range(count)]
        if not rows:  # from_list cannot tell an empty list's columns
            return Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
        return Dataset.from_list(rows, features=FEATURES)

    return DatasetDict({"train": split(num_train, 0, every_object), "test": split(num_test, 1, False)})


def grounding_prompt(label: str) -> str:
    return f"Where is the {label}?"


def box_text(box) -> str:
    """A normalised box as the model writes it: "[x0, y0, x1, y1]" with two decimals."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def grounding_pairs(row: dict) -> list[tuple[str, list[float]]]:
    """(label, box) for each object of a row that its label names unambiguously (a grounding question has one
    right box)."""
    labels = row["labels"]
    return [(label, box) for label, box in zip(labels, row["boxes"], strict=True) if labels.count(label) == 1]


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing uniformly among the answers each question type allows."""
    return {
        "colour": 1 / len(COLOURS),
        "shape": 1 / len(SHAPES),
        "count": 1 / len(NUMBER_WORDS),
        "presence": 1 / 2,
        "position": 1 / 2,
        "largest": 1 / 2.5,  # two or three candidates, equally often
    }


def region_text(mask_runs: list[int], size: int, label: str) -> str:
    """A mask (the synthetic set's run-length form) as words for the segmentation stage (see `mask_text`)."""
    return mask_text(run_length_decode(mask_runs, size), label)


def mask_text(mask: np.ndarray, label: str) -> str:
    """An [H, W] mask as words for the segmentation stage: what, how much of the image, and where its centre is
    (as fractions of the width and height)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    share = math.floor(100 * mask.mean() + 0.5)
    if not len(xs):
        return f"{label} covers 0%"
    return f"{label} covers {share}% around ({xs.mean() / width:.2f}, {ys.mean() / height:.2f})"


__all__ = [
    "CAPTION_PROMPT",
    "COLOURS",
    "QUESTION_TYPES",
    "SHAPES",
    "box_text",
    "build_dataset",
    "chance_levels",
    "draw_example",
    "grounding_pairs",
    "grounding_prompt",
    "mask_text",
    "region_text",
]
