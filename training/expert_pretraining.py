"""Stand-in for the experts' released checkpoints when there are none: a short dense pre-training of each tiny
expert on the synthetic data, before the paper's recipe starts (and before its features are cached).

The paper starts from pretrained SigLIP, RAM++, Grounding DINO and SAM2; the tiny recipe has only randomly
initialised experts, whose features know nothing of shapes. Each expert here learns, through a throw-away linear
head on its (grid-resampled) features, the shape and the colour of whatever covers each grid cell, and (with
`positions`, a loss weight) the cell's own row and column, which real encoders' features carry from their position
embeddings and random tiny ones barely do. Afterwards the experts are frozen again, as in the paper. Real-scale
recipes leave this off (`expert_pretraining.steps: 0`).
"""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_astrea import PIXEL_INPUT_NAMES

from .data import COLOURS, SHAPES, run_length_decode

logger = logging.get_logger(__name__)


def cell_labels(rows, grid: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell, the shape and colour index (0 = background) of the object covering most of it."""
    shapes = np.zeros((len(rows), grid * grid), dtype=np.int64)
    colours = np.zeros_like(shapes)
    cell = image_size // grid
    for index, row in enumerate(rows):
        best = np.zeros(grid * grid)
        for label, runs in zip(row["labels"], row["masks"], strict=True):
            colour, shape = label.split()
            mask = run_length_decode(runs, image_size)[: cell * grid, : cell * grid]
            cover = mask.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).flatten()
            take = (cover > 0.25) & (cover > best)
            shapes[index, take] = SHAPES.index(shape) + 1
            colours[index, take] = list(COLOURS).index(colour) + 1
            best = np.maximum(best, cover)
    return torch.from_numpy(shapes), torch.from_numpy(colours)


def pretrain_experts(
    model,
    image_processor,
    dataset,
    steps: int,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    num_images: int = 2000,
    seed: int = 0,
    colour_experts=None,
    positions: float = 0.0,
    expert_steps: dict[str, int] | None = None,
) -> dict[str, float]:
    """Train every expert briefly on dense shape labels, those in `colour_experts` (default: all) on colour labels
    too, and with `positions` > 0 every expert on each cell's row and column (their loss weighted by it); returns
    each expert's final training accuracy on shapes. Each expert trains `steps` steps, or its own number in
    `expert_steps` ({name: steps}; 0 leaves it as it is)."""
    counts = {name: (expert_steps or {}).get(name, steps) for name in model.model.experts}
    if not any(count > 0 for count in counts.values()):
        return {}
    generator = torch.Generator().manual_seed(seed)
    subset = dataset.select(range(min(num_images, len(dataset))))
    images = [image.convert("RGB") for image in subset["image"]]
    pixels = {k: v for k, v in image_processor(images, return_tensors="pt").items() if k != "num_tiles"}
    grid, image_size = model.config.image_grid_size, images[0].size[0]
    shape_labels, colour_labels = cell_labels(subset, grid, image_size)
    freeze = model.config.freeze_experts
    model.config.freeze_experts = False
    results = {}
    try:
        for name, expert in model.model.experts.items():
            if counts[name] <= 0:
                continue
            expert.requires_grad_(True).train()
            width = model.config.expert_hidden_sizes[name]
            sizes = [len(SHAPES) + 1, len(COLOURS) + 1, grid, grid]
            head = torch.nn.Linear(width, sum(sizes))
            optimizer = torch.optim.AdamW([*expert.parameters(), *head.parameters()], lr=learning_rate)
            correct, colour_correct = [], []
            learns_colour = colour_experts is None or name in colour_experts
            for _ in tqdm(range(counts[name]), desc=f"pre-training the {name} expert"):
                index = torch.randint(len(images), (batch_size,), generator=generator)
                features = model.model.get_expert_features(
                    **{PIXEL_INPUT_NAMES[name]: pixels[PIXEL_INPUT_NAMES[name]][index]}, experts=(name,)
                )[name]  # [B, P, C]
                logits = head(features)
                shape_logits, colour_logits, row_logits, column_logits = logits.split(sizes, dim=-1)
                loss = F.cross_entropy(shape_logits.flatten(0, 1), shape_labels[index].flatten())
                if learns_colour:
                    loss = loss + F.cross_entropy(colour_logits.flatten(0, 1), colour_labels[index].flatten())
                if positions:  # cells in row-major order: cell p is row p // grid, column p % grid
                    cells = torch.arange(grid * grid).expand(len(index), -1)
                    rows = F.cross_entropy(row_logits.flatten(0, 1), (cells // grid).flatten())
                    columns = F.cross_entropy(column_logits.flatten(0, 1), (cells % grid).flatten())
                    loss = loss + positions * (rows + columns)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                objects = shape_labels[index] > 0
                shape_hits = shape_logits.argmax(-1) == shape_labels[index]
                colour_hits = colour_logits.argmax(-1) == colour_labels[index]
                correct.append(float(shape_hits[objects].float().mean()))
                colour_correct.append(float(colour_hits[objects].float().mean()))
            results[name] = round(float(np.mean(correct[-10:])), 3)
            colour = f", colour {np.mean(colour_correct[-10:]):.0%}" if learns_colour else ""
            logger.warning(f"{name} expert pre-trained: on object cells, shape accuracy {results[name]:.0%}{colour}")
    finally:
        model.config.freeze_experts = freeze
        model.model.train(model.model.training)  # re-freezes the experts when config.freeze_experts
    return results


__all__ = ["cell_labels", "pretrain_experts"]
