"""The tiny experts' stand-in pre-training: dense per-cell targets (shape, colour, and with `positions` the cell's row
and column)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from astrea_testing import TINY

from astrea.training import expert_pretraining
from astrea.training.data import SHAPES, build_dataset, run_length_encode
from astrea.training.pipeline import build_model
from astrea.training.recipe import Recipe


def test_cell_labels_name_the_object_covering_each_cell():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 4:8] = True  # the top-right quarter: cells (0, 1) of a 2x2 grid
    row = {"labels": ["red square"], "masks": [run_length_encode(mask)]}
    shapes, colours = expert_pretraining.cell_labels([row], grid=2, image_size=8)
    square = SHAPES.index("square") + 1
    assert shapes.tolist() == [[0, square, 0, 0]]
    assert colours.tolist() == [[0, 1, 0, 0]]  # red is the first colour (0 is background)


@pytest.mark.parametrize("positions", [0.0, 0.5])
def test_positions_add_each_cells_row_and_column_as_targets(monkeypatch, positions):
    model, processor = build_model(Recipe.from_dict({"model": {"config": str(TINY)}}))
    dataset = build_dataset(4, 0, 64, seed=1)["train"]
    targets = []
    original = F.cross_entropy
    monkeypatch.setattr(
        expert_pretraining.F,
        "cross_entropy",
        lambda logits, target: (targets.append(target), original(logits, target))[1],
    )
    before = {name: [p.clone() for p in e.parameters()] for name, e in model.model.experts.items()}
    expert_pretraining.pretrain_experts(
        model, processor.image_processor, dataset, steps=1, batch_size=2, num_images=4, positions=positions
    )
    grid = model.config.image_grid_size
    per_expert = 4 if positions else 2  # shape and colour, then row and column
    assert len(targets) == per_expert * 4
    if positions:
        rows, columns = targets[2], targets[3]
        cells = torch.arange(grid * grid)
        assert torch.equal(rows, (cells // grid).repeat(2)) and torch.equal(columns, (cells % grid).repeat(2))
    changed = [
        any(not torch.equal(a, b) for a, b in zip(before[n], e.parameters(), strict=True))
        for n, e in model.model.experts.items()
    ]
    assert all(changed)  # every expert trained
    assert not any(p.requires_grad for p in model.model.experts.parameters())  # and frozen again


def test_expert_steps_give_each_expert_its_own_number_of_steps(monkeypatch):
    model, processor = build_model(Recipe.from_dict({"model": {"config": str(TINY)}}))
    dataset = build_dataset(4, 0, 64, seed=1)["train"]
    calls = []
    original = model.model.get_expert_features
    monkeypatch.setattr(
        model.model,
        "get_expert_features",
        lambda experts, **kwargs: (calls.append(experts[0]), original(experts=experts, **kwargs))[1],
    )
    before = {name: [p.clone() for p in e.parameters()] for name, e in model.model.experts.items()}
    results = expert_pretraining.pretrain_experts(
        model,
        processor.image_processor,
        dataset,
        steps=2,
        batch_size=2,
        num_images=4,
        expert_steps={"detection": 3, "segmentation": 0},
    )
    assert calls == ["caption"] * 2 + ["classification"] * 2 + ["detection"] * 3
    assert sorted(results) == ["caption", "classification", "detection"]
    segmenter = zip(before["segmentation"], model.model.experts["segmentation"].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in segmenter)  # 0 steps: the segmenter is left as it was


def test_expert_steps_are_checked_in_the_recipe():
    recipe = Recipe.from_dict({"expert_pretraining": {"expert_steps": {"detection": 300}}})
    assert recipe.expert_pretraining.expert_steps == {"detection": 300}
    assert recipe.expert_pretraining.steps_for("detection") == 300 and recipe.expert_pretraining.trains
    none = Recipe.from_dict({"expert_pretraining": {"steps": 0, "expert_steps": {"caption": 0}}})
    assert not none.expert_pretraining.trains
    with pytest.raises(ValueError, match="unknown expert 'ocr' in expert_pretraining.expert_steps"):
        Recipe.from_dict({"expert_pretraining": {"expert_steps": {"ocr": 3}}})
    with pytest.raises(ValueError, match="expert_steps.detection must be a whole number of steps, 0 or more"):
        Recipe.from_dict({"expert_pretraining": {"expert_steps": {"detection": -1}}})
    with pytest.raises(ValueError, match="expert_pretraining.expert_steps must be a dict"):
        Recipe.from_dict({"expert_pretraining": {"expert_steps": [300]}})
