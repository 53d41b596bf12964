"""Videos as sampled frames, interleaved with images in placeholder order; optional anyres tiles."""

import numpy as np
import PIL.Image
import pytest
import torch
from astrea_testing import TINY
from transformers import AutoProcessor

from astrea.processing import AstreaImageProcessor, AstreaProcessor
from astrea.processing.processing_astrea import sample_frames


@pytest.fixture
def processor():
    return AutoProcessor.from_pretrained(TINY)


def solid(value: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (16, 16), (value, value, value))


def caption_means(out) -> list[float]:
    return [round(float(x), 3) for x in out["pixel_values"].mean(dim=(1, 2, 3))]


def test_frames_are_sampled_uniformly():
    assert sample_frames(list(range(20)), 4) == [0, 6, 13, 19]
    assert sample_frames(list(range(3)), 8) == [0, 1, 2]


def test_video_becomes_its_sampled_frames_in_placeholder_order(processor, tiny_config):
    processor.num_frames = 3
    video = [solid(v) for v in range(100, 200, 10)]  # 10 frames: 100..190
    text = ["USER: <image> then <video> then <image>\nASSISTANT:"]
    out = processor(images=[solid(0), solid(255)], videos=[video], text=text, return_tensors="pt")
    n_tokens = (out["input_ids"] == processor.image_token_id).sum().item()
    assert n_tokens == (2 + 3) * tiny_config.num_image_tokens
    expected = [0, 100, 140, 190, 255]  # image, sampled frames 0, 4, 9, image
    assert caption_means(out) == [round(v / 255 * 2 - 1, 3) for v in expected]


def test_one_video_as_an_array_and_count_checks(processor):
    video = np.stack([np.full((12, 12, 3), v, dtype=np.uint8) for v in range(16)])  # T x H x W x C
    out = processor(videos=video, text="<video> what happens?", return_tensors="pt")
    assert out["pixel_values"].shape[0] == processor.num_frames
    with pytest.raises(ValueError, match="1 <video> placeholders but 2 videos"):
        processor(videos=[[solid(1)], [solid(2)]], text="<video> one")


def test_anyres_adds_tiles_and_placeholders(tiny_config, tiny_model):
    base = AutoProcessor.from_pretrained(TINY)
    image_processor = AstreaImageProcessor.from_model_config(tiny_config, detection_size=64, do_anyres=True)
    processor = AstreaProcessor(
        image_processor,
        base.tokenizer,
        chat_template=base.chat_template,
        num_image_tokens=tiny_config.num_image_tokens,
    )
    wide = PIL.Image.new("RGB", (64, 30), "red")  # best pinpoint (32, 64): 1 x 2 tiles
    out = processor(images=[wide], text=["<image> wide"], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 3  # the whole image + 2 tiles
    assert (out["input_ids"] == processor.image_token_id).sum() == 3 * tiny_config.num_image_tokens
    assert "num_tiles" not in out
    logits = tiny_model(**out).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("do_anyres", [False, True])
def test_token_and_row_counts_without_pixels_match_the_processor(tiny_config, do_anyres):
    """`_get_num_multimodal_tokens` (what vLLM asks to size and split its inputs) agrees with what the processor
    actually makes, image by image, with and without anyres tiles."""
    base = AutoProcessor.from_pretrained(TINY)
    image_processor = AstreaImageProcessor.from_model_config(tiny_config, detection_size=64, do_anyres=do_anyres)
    processor = AstreaProcessor(image_processor, base.tokenizer, num_image_tokens=tiny_config.num_image_tokens)
    sizes = [(30, 64), (64, 30), (50, 50), (20, 90)]  # (height, width)
    counted = processor._get_num_multimodal_tokens(image_sizes=sizes)
    for (height, width), tokens, rows in zip(sizes, counted.num_image_tokens, counted.num_image_patches, strict=True):
        out = processor(images=[PIL.Image.new("RGB", (width, height))], text=["<image> q"], return_tensors="pt")
        assert out["pixel_values"].shape[0] == rows
        assert (out["input_ids"] == processor.image_token_id).sum() == tokens == rows * tiny_config.num_image_tokens
    assert (max(counted.num_image_patches) > 1) == do_anyres
