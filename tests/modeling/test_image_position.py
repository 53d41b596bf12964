"""The visual tokens' 2-D position (`image_position_embedding=True`): token r * grid + c gets row r's vector plus
column c's, in the fused tokens and in the pre-alignment tokens alike; it starts at zero, learns, and is saved."""

import pytest
import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaAlignment


@pytest.fixture
def position_model(tiny_config):
    tiny_config.image_position_embedding = True
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(tiny_config).eval()


def randomise(model) -> None:
    with torch.no_grad():
        model.model.image_position.row.normal_()
        model.model.image_position.column.normal_()


def test_off_by_default_and_zero_at_the_start(tiny_model, position_model, tiny_config):
    assert tiny_model.model.image_position is None
    position = position_model.model.image_position
    shape = (tiny_config.image_grid_size, tiny_config.text_config.hidden_size)
    assert position.row.shape == position.column.shape == shape
    assert position.row.abs().sum() == 0 and position.column.abs().sum() == 0  # zero-initialised (post_init)
    pixels = random_pixels(tiny_config, 2)
    with torch.no_grad():
        tokens = position_model.model.get_image_features(**pixels).pooler_output
        fused = position_model.model.fuse_expert_features(position_model.model.get_expert_features(**pixels))
    torch.testing.assert_close(tokens, fused.pooler_output)


@pytest.mark.parametrize("stage", ["fused", "prealign"])
def test_each_token_gets_its_rows_and_its_columns_vector(position_model, tiny_config, stage):
    randomise(position_model)
    model = position_model.model
    pixels = random_pixels(tiny_config, 2)
    with torch.no_grad():
        features = model.get_expert_features(**pixels)
        if stage == "prealign":
            model.alignment = AstreaAlignment(("caption",))
            without = model.projectors["caption"](features["caption"])
        else:
            without = model.fuse_expert_features(features).pooler_output
        tokens = model.get_image_features(**pixels).pooler_output
    grid = tiny_config.image_grid_size
    added = (tokens - without).reshape(2, grid, grid, -1)
    for row, column in [(0, 0), (0, grid - 1), (grid - 1, 1), (1, grid - 2)]:
        expected = model.image_position.row[row] + model.image_position.column[column]
        for image in range(2):  # every image of the batch gets the same positions
            torch.testing.assert_close(added[image, row, column], expected)


def test_it_learns_from_the_language_loss_and_is_saved(position_model, tiny_config, tmp_path):
    ids = torch.tensor([prompt_ids(tiny_config, [5, 6, 7, 8])])
    position_model.train()
    loss = position_model(input_ids=ids, labels=ids, **random_pixels(tiny_config, 1)).loss
    loss.backward()
    position = position_model.model.image_position
    assert position.row.grad.abs().sum() > 0 and position.column.grad.abs().sum() > 0
    randomise(position_model)
    position_model.save_pretrained(tmp_path)
    loaded = AstreaForConditionalGeneration.from_pretrained(tmp_path).model.image_position
    assert torch.equal(loaded.row, position.row) and torch.equal(loaded.column, position.column)
