"""The synthetic shapes data set: images the project draws itself, with every label the recipe needs.

Each image holds 1-3 shapes of several kinds, colours, sizes and positions on a varied background, drawn in a
`RenderStyle`: `CLASSIC_STYLE` (the default: light flat, gradient or noise backgrounds, exact colours and sizes) or
`BROAD_STYLE` (stripes too, darker backgrounds, jittered fills and sizes, outlines, resampled canvases). Each comes
with a caption, tags, boxes (normalised x0, y0, x1, y1), masks (run-length encoded), and question/answer pairs of
seven types: colour, shape, count, presence, side (which half of the image one object is in), position (whether one
object is left or right of another), largest. `build_dataset` returns a
`datasets.DatasetDict` with `train` and `test` (held-out) splits, and optionally an `unseen` split drawn with renderer
settings the others never use; the same seed always gives the same data.
"""

import math
import random
from dataclasses import dataclass

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
QUESTION_TYPES = ("colour", "shape", "count", "presence", "side", "position", "largest")
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


@dataclass(frozen=True)
class RenderStyle:
    """How the renderer draws: the ranges each image's settings are drawn from. The defaults (`BROAD_STYLE`) vary
    what a model could learn instead of shapes and colours (the renderer's habits); `CLASSIC_STYLE` is the narrow
    renderer the demo trains on; `UNSEEN_STYLE` draws its backgrounds (texture and brightness), outlines and canvas
    outside the ranges of both, for a held-out split that measures how much a model learnt the renderer."""

    backgrounds: tuple[str, ...] = ("flat", "gradient", "noise", "stripes")  # textures to pick from
    brightness: tuple[int, int] = (110, 250)  # background channel values
    outline: float = 0.3  # share of shapes drawn with an outline
    outline_colour: tuple[int, int, int] = (25, 25, 25)
    outline_width: tuple[int, int] = (1, 2)  # in canvas pixels
    colour_jitter: int = 25  # each object's fill: its colour's RGB plus up to this much per channel
    size_jitter: float = 0.12  # each object's side: its size class's times 1 +- this (the classes never overlap)
    canvas: tuple[float, float] = (0.75, 1.5)  # drawn on a canvas this many times the image side, then resampled


BROAD_STYLE = RenderStyle()
#: the renderer before `RenderStyle`: light flat, gradient or noise backgrounds, exact colours and sizes, no outlines
CLASSIC_STYLE = RenderStyle(
    backgrounds=("flat", "gradient", "noise"),
    brightness=(150, 250),
    outline=0.0,
    colour_jitter=0,
    size_jitter=0.0,
    canvas=(1.0, 1.0),
)
#: the styles a recipe's `data.style` names
STYLES = {"broad": BROAD_STYLE, "classic": CLASSIC_STYLE}
UNSEEN_STYLE = RenderStyle(
    backgrounds=("checker",),  # a texture training never draws
    brightness=(55, 100),  # darker than any training background
    outline=1.0,
    outline_colour=(245, 245, 245),  # white outlines; training's are dark
    outline_width=(1, 2),
    colour_jitter=25,
    size_jitter=0.12,
    canvas=(2.0, 2.5),  # smoother edges than any training canvas gives
)


def _background(rng: random.Random, size: int, style: RenderStyle) -> PILImage.Image:
    kind = rng.choice(style.backgrounds)
    low, high = style.brightness
    base = np.array([rng.randint(low, high) for _ in range(3)], dtype=np.float32)
    if kind == "flat":
        array = np.broadcast_to(base, (size, size, 3))
    elif kind == "gradient":
        other = np.array([rng.randint(low, high) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        array = np.broadcast_to(base * (1 - t) + other * t, (size, size, 3))
    elif kind == "noise":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
        array = base + noise
    elif kind in ("stripes", "checker"):
        period = max(2, round(size * rng.uniform(0.06, 0.14)))
        ys, xs = np.mgrid[0:size, 0:size]
        if kind == "checker":
            dark = (ys // period + xs // period) % 2
        else:
            dark = ((xs if rng.random() < 0.5 else ys) // period) % 2
        array = base * (1 - 0.15 * dark[..., None])
    else:
        raise ValueError(f"unknown background {kind!r}")
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


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, fill, outline=None, width: int = 0) -> None:
    lines = {"outline": outline, "width": width} if outline is not None else {}
    if shape == "circle":
        draw.ellipse(box, fill=fill, **lines)
    elif shape == "square":
        draw.rectangle(box, fill=fill, **lines)
    else:
        draw.polygon(_polygon(shape, box), fill=fill, **lines)


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


def _place(
    rng: random.Random, count: int, size: int, size_jitter: float = 0.0
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Sizes and non-overlapping boxes (in pixels) for `count` objects of distinct sizes."""
    for _ in range(100):
        placed = []
        for size_name in rng.sample(list(SIZES), count):
            side = SIZES[size_name] * size
            if size_jitter:  # (no draw without it: the classic renderer draws what it drew before RenderStyle)
                side *= 1 + rng.uniform(-size_jitter, size_jitter)
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
    """Questions about one image. Colour, shape and side questions ask about one random object, or about every object
    (`every_object`) that its shape (colour; description) names unambiguously, and `every_object` asks the position
    question both ways round (the same pair, so only where the objects are can tell the answers apart); the random
    draws are the same either way (side questions draw none)."""
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
    # where one object lies on its own (the half of the image its centre is in): the grounding that the position
    # question then compares across two objects; asked where the description is unambiguous and the side is clear
    if len({_describe(o) for o in objects}) == len(objects):
        for target in objects if every_object else [chosen]:
            if abs(target["center"][0] - 0.5) > 0.1:
                questions.append(
                    {
                        "type": "side",
                        "question": f"Is the {_describe(target)} on the left or the right?",
                        "answer": "left" if target["center"][0] < 0.5 else "right",
                    }
                )
    if len(objects) >= 2:
        a, b = rng.sample(objects, 2)
        if len({_describe(o) for o in objects}) == len(objects) and abs(a["center"][0] - b["center"][0]) > 0.1:
            for first, second in [(a, b), (b, a)] if every_object else [(a, b)]:
                side = "left" if first["center"][0] < second["center"][0] else "right"
                questions.append(
                    {
                        "type": "position",
                        "question": f"Is the {_describe(first)} left or right of the {_describe(second)}?",
                        "answer": side,
                    }
                )
        largest = max(objects, key=lambda o: o["area"])
        questions.append({"type": "largest", "question": "Which object is the largest?", "answer": _describe(largest)})
    return questions


def draw_example(
    rng: random.Random, size: int = 64, every_object: bool = False, style: RenderStyle | None = None
) -> dict:
    """One image and all its labels (`every_object`: see `_questions`), drawn in `style` (`CLASSIC_STYLE` by
    default)."""
    style = style or CLASSIC_STYLE
    # a setting that does not vary draws no random number, so CLASSIC_STYLE gives the images of the renderer before
    # RenderStyle, seed for seed
    low, high = style.canvas
    canvas = round(size * (low if low == high else rng.uniform(low, high)))
    scale = canvas / size
    image = _background(rng, canvas, style)
    draw = ImageDraw.Draw(image)
    objects = []
    for size_name, box in _place(rng, rng.randint(1, 3), size, style.size_jitter):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        jitter = style.colour_jitter
        fill = COLOURS[colour]
        if jitter:
            fill = tuple(min(255, max(0, value + rng.randint(-jitter, jitter))) for value in fill)
        outline = {}
        if style.outline and rng.random() < style.outline:
            outline = {"outline": style.outline_colour, "width": rng.randint(*style.outline_width)}
        _draw(draw, shape, tuple(v * scale for v in box), fill, **outline)
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
    if canvas != size:
        image = image.resize((size, size), PILImage.Resampling.BILINEAR)
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
    num_train: int = 2000,
    num_test: int = 300,
    image_size: int = 64,
    seed: int = 0,
    every_object: bool = True,
    num_unseen: int = 0,
    style: str = "classic",
) -> DatasetDict:
    """Train and held-out test splits drawn in the `style` of `STYLES`, from independent random streams of the same
    seed, and with `num_unseen` an `unseen` split drawn in `UNSEEN_STYLE` (settings the other two never use).

    With `every_object`, training images get colour and shape questions about each of their objects (more
    binding practice per image); the held-out splits always ask about one random object per image."""

    if style not in STYLES:
        raise ValueError(f"Unknown renderer style {style!r}; the styles are {', '.join(STYLES)}.")

    def split(count: int, stream: int, every: bool, drawn_in: RenderStyle = STYLES[style]) -> Dataset:
        rng = random.Random(seed * 1000003 + stream)
        rows = [draw_example(rng, image_size, every, drawn_in) for _ in range(count)]
        if not rows:  # from_list cannot tell an empty list's columns
            return Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
        return Dataset.from_list(rows, features=FEATURES)

    splits = {"train": split(num_train, 0, every_object), "test": split(num_test, 1, False)}
    if num_unseen:
        splits["unseen"] = split(num_unseen, 2, False, UNSEEN_STYLE)
    return DatasetDict(splits)


#: how the held-out questions of the unseen-renderer split are named in evaluation ("colour (unseen renderer)")
UNSEEN_SUFFIX = " (unseen renderer)"


def question_type(kind: str) -> str:
    """The question type of an evaluation group: "colour" for "colour" and "colour (unseen renderer)"."""
    return kind.removesuffix(UNSEEN_SUFFIX)


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
        "side": 1 / 2,
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
    "CLASSIC_STYLE",
    "STYLES",
    "BROAD_STYLE",
    "UNSEEN_STYLE",
    "UNSEEN_SUFFIX",
    "RenderStyle",
    "box_text",
    "build_dataset",
    "chance_levels",
    "draw_example",
    "grounding_pairs",
    "grounding_prompt",
    "mask_text",
    "question_type",
    "region_text",
]
