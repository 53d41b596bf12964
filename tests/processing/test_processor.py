"""AstreaImageProcessor and AstreaProcessor as the tiny model folder ships them."""

import numpy as np
import pytest
import torch
from astrea_testing import TINY, expert_image_sizes
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from astrea.processing import AstreaImageProcessor, AstreaProcessor


@pytest.fixture
def processor() -> AstreaProcessor:
    return AutoProcessor.from_pretrained(TINY)


def test_auto_classes_give_astreas_processors(processor):
    assert isinstance(processor, AstreaProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(TINY), AstreaImageProcessor)
    assert processor.image_token == "<image>"
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_one_image_gives_every_expert_its_own_size_and_normalisation(processor, tiny_config):
    image = Image.fromarray(np.full((30, 50, 3), 255, dtype=np.uint8))  # white, non-square
    out = processor.image_processor(image, return_tensors="pt")
    for name, side in expert_image_sizes(tiny_config).items():
        assert out[name].shape == (1, 3, side, side)
    torch.testing.assert_close(out["pixel_values"], torch.ones_like(out["pixel_values"]))  # (1 - 0.5) / 0.5
    white_imagenet = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out["segmentation_pixel_values"][0, :, 0, 0], white_imagenet)


def test_placeholders_expand_and_batches_pad_left(processor, tiny_config):
    images = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (20, 60), "blue"), Image.new("RGB", (8, 8))]
    texts = ["<image> what is this?", "<image><image> and these two, which is larger?"]
    out = processor(images=images, text=texts, return_tensors="pt")
    per_row = (out["input_ids"] == processor.image_token_id).sum(1)
    assert per_row.tolist() == [tiny_config.num_image_tokens, 2 * tiny_config.num_image_tokens]
    assert out["pixel_values"].shape[0] == 3
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][:, -1].eq(1).all()  # left padding


def test_placeholder_and_image_counts_must_match(processor):
    with pytest.raises(ValueError, match="1 <image> tokens and 2 images"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text=["<image> one"])
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=["<image> none"])


def test_chat_template_puts_the_image_where_the_message_has_it(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nColour?\nASSISTANT:"


def test_processor_output_runs_the_model(processor, tiny_model):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (50, 30), "green")], text=[prompt], return_tensors="pt")
    out = tiny_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_save_and_reload_keep_everything(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.num_image_tokens == processor.num_image_tokens
    assert again.chat_template == processor.chat_template
    assert again.image_processor.expert_sizes == processor.image_processor.expert_sizes


def test_a_placeholder_typed_into_a_text_part_is_refused(processor):
    """With images as their own message parts, an `<image>` written into the text would stand for an image nobody
    attached (a served request gets an HTTP 400 from this); LLaVA-style string content keeps its placeholder."""
    with pytest.raises(Exception, match="placeholder"):
        text_part = {"type": "text", "text": "<image>\nWhat is it?"}
        processor.apply_chat_template([{"role": "user", "content": [text_part]}], add_generation_prompt=True)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}])
    assert prompt.count("<image>") == 1
