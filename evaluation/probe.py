"""Linear probes of what a visual token says about the object under it: its column, its shape and its colour.

For drawn images of the synthetic set, each object's centre falls in one cell of the `image_grid_size` grid. Linear
classifiers are fitted (on 80% of the images) from the features at that cell to the cell's column, the object's
shape and its colour, and scored on the other 20%: accuracy over the columns, over left half against right half
(chance 50%), over the shapes and over the colours. Beside them, the share of the features' variance that the
object's shape and its colour explain (between-class over total sum of squares): a probe finds a weak direction
once the features are standardised, an attention head reads the features as they are, so a shape that the probe
finds but that explains little of the variance is one the LLM may still fail to look objects up by. Probed: each
expert's own features, and the visual tokens the LLM reads (`get_image_features`, routed without a prompt).

Then which object the model's left/right answers follow (`left_right_probe`): on drawn images it is asked "Is the
X on the left or the right?" and "Is the X left or right of the Y?", and each answer is compared with the side of
the image that X's centre is in and that Y's is in. A model that compares the two objects answers with X's side
wherever they lie in different halves; one that reads the wrong object answers with Y's.

    astrea-eval probe --model outputs/demo/model
"""

import random
import re

import torch

from modeling_astrea.modeling_astrea import column_order


def fit_probe(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, classes: int, steps: int = 300):
    """A linear softmax classifier on standardised `features` [N, C] fitted to `labels` on the rows `train` marks;
    its predictions for the other rows."""
    mean, std = features[train].mean(0), features[train].std(0) + 1e-5
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():  # also when called under no_grad
        for _ in range(steps):
            optimizer.zero_grad()
            logits = x[train] @ weight + bias
            loss = torch.nn.functional.cross_entropy(logits, labels[train]) + 1e-4 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (x[~train] @ weight + bias).argmax(-1)


def column_scores(features: torch.Tensor, columns: torch.Tensor, train: torch.Tensor, grid: int) -> dict:
    """{"column": accuracy over the grid's columns, "half": left half against right half} of a probe."""
    predicted = fit_probe(features, columns, train, grid)
    truth = columns[~train]
    return {
        "column": round((predicted == truth).float().mean().item(), 3),
        "half": round(((predicted >= grid // 2) == (truth >= grid // 2)).float().mean().item(), 3),
    }


def class_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, classes: int) -> float:
    """The held-out accuracy of a probe from `features` to `labels`."""
    return round((fit_probe(features, labels, train, classes) == labels[~train]).float().mean().item(), 3)


def variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of `features`' [N, C] total variance that their class means (`labels` [N]) explain."""
    centred = features - features.mean(0)
    total = centred.pow(2).sum()
    between = sum((labels == label).sum() * centred[labels == label].mean(0).pow(2).sum() for label in labels.unique())
    return float(between / total) if total > 0 else 0.0


@torch.no_grad()
def feature_probe(model, processor, num_images: int = 1000, seed: int = 123, batch_size: int = 100) -> dict:
    """{features: {"column", "half", "shape", "colour": probe accuracy, "shape_share", "colour_share": variance
    shares}} for each expert's features and the visual tokens; also the chance levels and the number of probed
    objects."""
    from astrea.training.data import COLOURS, SHAPES, draw_example

    model.eval()
    size = 64
    grid = model.config.image_grid_size
    if grid % 2:
        raise ValueError(f"The probe splits the grid into halves; image_grid_size {grid} is odd.")
    rng = random.Random(seed)
    rows = [draw_example(rng, size) for _ in range(num_images)]
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, num_images, batch_size):
        images = [row["image"] for row in rows[start : start + batch_size]]
        inputs = processor.image_processor(images, do_anyres=False, return_tensors="pt")  # one grid per image
        pixels = {k: v for k, v in inputs.items() if k.endswith(("pixel_values", "pixel_mask", "input_ids", "mask"))}
        experts = model.model.get_expert_features(**pixels)
        tokens = model.model.get_image_features(expert_features=experts).pooler_output
        if model.config.image_token_order == "column":  # back to the raster the experts' features are in
            tokens = column_order(tokens, grid)  # (its own inverse)
        for name, value in [*experts.items(), ("visual tokens", tokens)]:
            collected.setdefault(name, []).append(value.float())
    features = {name: torch.cat(values) for name, values in collected.items()}
    image, cell, column, shape, colour = [], [], [], [], []
    colours = list(COLOURS)
    for index, row in enumerate(rows):
        for label, (x0, y0, x1, y1) in zip(row["labels"], row["boxes"], strict=True):
            col, line = (min(int((a + b) / 2 * grid), grid - 1) for a, b in ((x0, x1), (y0, y1)))
            object_colour, object_shape = label.split()  # labels read "<colour> <shape>"
            image.append(index)
            cell.append(line * grid + col)
            column.append(col)
            shape.append(SHAPES.index(object_shape))
            colour.append(colours.index(object_colour))
    image, cell, column, shape, colour = map(torch.tensor, (image, cell, column, shape, colour))
    train = image < int(0.8 * num_images)  # held out by image, not by object
    results = {}
    for name, value in features.items():
        at_objects = value[image, cell]
        results[name] = {
            **column_scores(at_objects, column, train, grid),
            "shape": class_accuracy(at_objects, shape, train, len(SHAPES)),
            "colour": class_accuracy(at_objects, colour, train, len(colours)),
            "shape_share": round(variance_share(at_objects, shape), 3),
            "colour_share": round(variance_share(at_objects, colour), 3),
        }
    chance = {
        "column": round(1 / grid, 3),
        "half": 0.5,
        "shape": round(1 / len(SHAPES), 3),
        "colour": round(1 / len(colours), 3),
    }
    return {"features": results, "chance": chance, "objects": len(column)}


def probe_table(result: dict) -> str:
    lines = [
        "| features | column | left/right half | shape | colour | variance: shape | variance: colour |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result["features"].items():
        lines.append(
            f"| {name} | {s['column']:.1%} | {s['half']:.1%} | {s['shape']:.1%} | {s['colour']:.1%} "
            f"| {s['shape_share']:.2f} | {s['colour_share']:.2f} |"
        )
    chance = result["chance"]
    lines.append(
        f"| (chance) | {chance['column']:.1%} | {chance['half']:.1%} | {chance['shape']:.1%} | {chance['colour']:.1%} "
        "| | |"
    )
    return "\n".join(lines)


#: the synthetic set's two left/right questions (training/data.py `_questions`): about one object, and about one
#: object against another
SIDE_QUESTION = re.compile(r"Is the (?P<first>.+) on the left or the right\?")
POSITION_QUESTION = re.compile(r"Is the (?P<first>.+) left or right of the (?P<second>.+)\?")


def left_right_rows(num_images: int = 300, seed: int = 123) -> list[dict]:
    """The left/right questions of `num_images` drawn images (every object asked about, the position question both
    ways round), as benchmark rows (`predict`'s input) with what an answer is compared with: "answer", and the
    sides of the image that the first- and second-named object's centres are in ("first", "second"); "image_index"
    and "named" which image and objects a row asks about."""
    from astrea.training.data import draw_example

    rng = random.Random(seed)
    rows = []
    for index in range(num_images):
        example = draw_example(rng, 64, every_object=True)
        sides = {
            label: "left" if (box[0] + box[2]) / 2 < 0.5 else "right"
            for label, box in zip(example["labels"], example["boxes"], strict=True)
        }
        for number, question in enumerate(example["questions"]):
            match = SIDE_QUESTION.fullmatch(question["question"]) or POSITION_QUESTION.fullmatch(question["question"])
            if match is None:
                continue
            named = match.groupdict()
            rows.append(
                {
                    "id": f"{index}-{number}",
                    "task": "vqa",
                    "image": example["image"],
                    "question": question["question"],
                    "type": question["type"],
                    "objects": len(sides),
                    "answer": question["answer"],
                    "first": sides[named["first"]],
                    "second": sides[named["second"]] if "second" in named else None,
                    "image_index": index,
                    "named": [named["first"], named.get("second")],
                }
            )
    return rows


def left_right_agreement(rows: list[dict], answers: dict[str, str]) -> dict:
    """{question type: {"n", "accuracy", "first", "second", "left", "same_both_ways"}}: of the rows' answers
    (`answers`: row id -> text), the shares that are right, that name the first-named object's side, the
    second-named one's (position questions), and that say "left"; and for position questions, of the pairs of
    objects in different halves asked both ways round ("Is X left or right of Y?", "Is Y left or right of X?"), the
    share answered the same both ways (0 for a model that compares them, 1 for one that ignores which is asked
    about). Position questions also by the image's number of objects ("position, 2 objects", ...)."""
    groups: dict[str, list[tuple[dict, str]]] = {}
    for row in rows:
        said = " ".join(answers[row["id"]].lower().replace(".", " ").split())
        groups.setdefault(row["type"], []).append((row, said))
        if row["type"] == "position":
            groups.setdefault(f"position, {row['objects']} objects", []).append((row, said))
    result = {}
    for name, pairs in sorted(groups.items()):
        said_right = [said == row["answer"] for row, said in pairs]
        said_first = [said == row["first"] for row, said in pairs]
        two_named = any(row["second"] is not None for row, _ in pairs)  # position questions name two objects
        said_second = [said == row["second"] for row, said in pairs]
        said_left = [said == "left" for _, said in pairs]
        # the same two objects, in different halves, asked both ways round: counted once per pair
        answered = {
            (row["image_index"], *row["named"]): said
            for row, said in pairs
            if row["second"] is not None and row["first"] != row["second"]
        }
        both_ways = [
            said == answered[(image, second, first)]
            for (image, first, second), said in answered.items()
            if first < second and (image, second, first) in answered
        ]
        result[name] = {
            "n": len(pairs),
            "accuracy": round(sum(said_right) / len(pairs), 3),
            "first": round(sum(said_first) / len(pairs), 3),
            "second": round(sum(said_second) / len(pairs), 3) if two_named else None,
            "left": round(sum(said_left) / len(pairs), 3),
            "same_both_ways": round(sum(both_ways) / len(both_ways), 3) if both_ways else None,
        }
    return result


@torch.no_grad()
def left_right_probe(model, processor, num_images: int = 300, seed: int = 123, batch_size: int = 32) -> dict:
    """`left_right_agreement` of the model's greedy answers to `left_right_rows`."""
    from .benchmark import predict

    rows = left_right_rows(num_images, seed)
    answers = predict(model.eval(), processor, rows, batch_size=batch_size, max_new_tokens=4, progress=False)
    return left_right_agreement(rows, answers)


def left_right_table(result: dict) -> str:
    lines = [
        "| left/right question | n | right | first-named object's side | second-named object's side "
        '| same answer both ways round | "left" |',
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result.items():
        second, both = (("" if s[key] is None else f"{s[key]:.1%}") for key in ("second", "same_both_ways"))
        lines.append(
            f"| {name} | {s['n']} | {s['accuracy']:.1%} | {s['first']:.1%} | {second} | {both} | {s['left']:.1%} |"
        )
    return "\n".join(lines)


__all__ = [
    "column_scores",
    "feature_probe",
    "fit_probe",
    "left_right_agreement",
    "left_right_probe",
    "left_right_rows",
    "left_right_table",
    "probe_table",
    "variance_share",
]
