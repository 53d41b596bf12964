"""Linear probes of where a visual token is: do an Astrea model's features tell an object's column?

For drawn images of the synthetic set, each object's centre falls in one cell of the `image_grid_size` grid. A
linear classifier is fitted (on 80% of the images) from the features at that cell to the cell's column, and scored
on the other 20%: accuracy over the columns, and over left half against right half (chance 50%). Probed: each
expert's own features, and the visual tokens the LLM reads (`get_image_features`, routed without a prompt).

    astrea-eval probe --model outputs/demo/model
"""

import random

import torch


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


@torch.no_grad()
def position_probe(model, processor, num_images: int = 1000, seed: int = 123, batch_size: int = 100) -> dict:
    """{features: {"column": acc, "half": acc}} for each expert's features and the visual tokens; also the chance
    levels and the number of probed objects."""
    from astrea.training.data import draw_example

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
        for name, value in [*experts.items(), ("visual tokens", tokens)]:
            collected.setdefault(name, []).append(value.float())
    features = {name: torch.cat(values) for name, values in collected.items()}
    image, cell, column = [], [], []
    for index, row in enumerate(rows):
        for x0, y0, x1, y1 in row["boxes"]:
            col, line = (min(int((a + b) / 2 * grid), grid - 1) for a, b in ((x0, x1), (y0, y1)))
            image.append(index)
            cell.append(line * grid + col)
            column.append(col)
    image, cell, column = map(torch.tensor, (image, cell, column))
    train = image < int(0.8 * num_images)  # held out by image, not by object
    results = {name: column_scores(value[image, cell], column, train, grid) for name, value in features.items()}
    return {"features": results, "chance": {"column": round(1 / grid, 3), "half": 0.5}, "objects": len(column)}


def probe_table(result: dict) -> str:
    lines = ["| features | column accuracy | left/right half |", "| --- | --- | --- |"]
    for name, scores in result["features"].items():
        lines.append(f"| {name} | {scores['column']:.1%} | {scores['half']:.1%} |")
    chance = result["chance"]
    lines.append(f"| (chance) | {chance['column']:.1%} | {chance['half']:.1%} |")
    return "\n".join(lines)


__all__ = ["column_scores", "fit_probe", "position_probe", "probe_table"]
