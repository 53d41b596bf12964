"""`image_token_order="column"`: the LLM reads an image's grid column by column, so that "earlier in the sequence"
means "further left". The tokens are the row-order tokens transposed, in every path that makes visual tokens (the
fused tokens, pre-alignment, generation), and the router's probabilities stay in the raster."""

import copy

import pytest
import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaAlignment, column_order


def pair(tiny_config):
    """The same weights, reading the grid by rows and by columns."""
    torch.manual_seed(0)
    rows = AstreaForConditionalGeneration(tiny_config).eval()
    config = copy.deepcopy(tiny_config)  # the first model keeps its own
    config.image_token_order = "column"
    columns = AstreaForConditionalGeneration(config).eval()
    columns.load_state_dict(rows.state_dict())
    return rows, columns


def test_column_order_is_the_raster_transposed():  # what the other tests compare with
    grid = 3
    raster = torch.arange(grid * grid).float()[None, :, None]  # token r * grid + c holds that number
    # column by column: (0,0) (1,0) (2,0) (0,1) ... in raster numbers
    assert column_order(raster, grid).flatten().tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert torch.equal(column_order(column_order(raster, grid), grid), raster)  # its own inverse
    with pytest.raises(ValueError, match="8 visual tokens per image do not form the 3 x 3 grid"):
        column_order(torch.zeros(1, 8, 1), grid)


@pytest.mark.parametrize("stage", ["token router", "token router with a prompt", "sample router", "prealign"])
def test_the_llm_gets_the_tokens_column_by_column(tiny_config, stage):
    tiny_config.router_prompt = stage == "token router with a prompt"
    if stage == "sample router":
        tiny_config.router_mode = "sample"
    rows, columns = pair(tiny_config)
    if tiny_config.router_prompt:  # a prompt bias that is not zero, so the prompted and unprompted tokens differ
        torch.nn.init.normal_(rows.model.prompt_router.weight, std=1.0)
        columns.load_state_dict(rows.state_dict())
    pixels = random_pixels(tiny_config, 2)
    prompt = {}
    if stage != "prealign":
        ids = torch.tensor([prompt_ids(tiny_config, [5, 6]), prompt_ids(tiny_config, [7, 8])])
        prompt = {"prompt_input_ids": ids, "unprompted": stage == "token router with a prompt"}
    else:
        rows.model.alignment = AstreaAlignment(("caption",))
        columns.model.alignment = AstreaAlignment(("caption",))
    with torch.no_grad():
        by_rows = rows.model.get_image_features(**pixels, **prompt)
        by_columns = columns.model.get_image_features(**pixels, **prompt)
    grid = tiny_config.image_grid_size
    torch.testing.assert_close(by_columns.pooler_output, column_order(by_rows.pooler_output, grid))
    assert not torch.equal(by_columns.pooler_output, by_rows.pooler_output)
    if prompt.get("unprompted"):  # MoCo's image side, routed without the prompt
        assert not torch.allclose(by_rows.unprompted_pooler_output, by_rows.pooler_output)
        torch.testing.assert_close(
            by_columns.unprompted_pooler_output, column_order(by_rows.unprompted_pooler_output, grid)
        )
    if stage.startswith("token"):  # the router's probabilities stay in the raster, as router.png draws them
        torch.testing.assert_close(by_columns.router_probs, by_rows.router_probs)


def test_the_forward_pass_reads_that_order_and_generates(tiny_config):
    rows, columns = pair(tiny_config)
    ids = torch.tensor([prompt_ids(tiny_config, [5, 6, 7])])
    pixels = random_pixels(tiny_config, 1)
    grid = tiny_config.image_grid_size
    with torch.no_grad():
        by_rows = rows(input_ids=ids, **pixels)
        by_columns = columns(input_ids=ids, **pixels)
        generated = columns.generate(input_ids=ids, **pixels, max_new_tokens=4, do_sample=False)
        # the row-order model given the same tokens in column order, as an earlier turn's features
        features = rows.model.get_image_features(**pixels)
        features.pooler_output = column_order(features.pooler_output, grid)
        reordered = rows.generate(
            input_ids=ids, mm_encoder_outputs={"image": features}, max_new_tokens=4, do_sample=False
        )
    torch.testing.assert_close(by_columns.image_hidden_states, column_order(by_rows.image_hidden_states, grid))
    # the same tokens in another order: the LLM's answer changes with it
    assert not torch.allclose(by_columns.logits[0, -1], by_rows.logits[0, -1])
    assert generated.shape == (1, ids.shape[1] + 4)
    assert torch.equal(generated, reordered)


def test_saved_and_loaded_with_its_order(tiny_config, tmp_path):
    _, columns = pair(tiny_config)
    columns.save_pretrained(tmp_path)
    assert AstreaForConditionalGeneration.from_pretrained(tmp_path).config.image_token_order == "column"
