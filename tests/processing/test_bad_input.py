"""Bad input gets a clear ValueError/TypeError naming the problem; odd image modes are converted, not rejected."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from astrea_testing import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoProcessor

from astrea.processing import AstreaImageProcessor
from astrea.processing.image_processing_astrea import EXPERT_NAMES, PIXEL_INPUT_NAMES
from modeling_astrea import EXPERT_NAMES as MODEL_EXPERT_NAMES
from modeling_astrea import PIXEL_INPUT_NAMES as MODEL_PIXEL_INPUT_NAMES

PROMPT = "USER: <image>\nWhat is it?\nASSISTANT:"


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_processing_names_agree_with_the_model():
    assert EXPERT_NAMES == MODEL_EXPERT_NAMES and PIXEL_INPUT_NAMES == MODEL_PIXEL_INPUT_NAMES


def test_truncated_file(processor, tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png_bytes(PIL.Image.new("RGB", (64, 64), "red"))[:-40])
    with pytest.raises(ValueError, match=r"image 0 \(.*cut.png\): corrupt or truncated"):
        processor(images=[str(path)], text=[PROMPT])


def test_corrupt_file(processor, tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.jpg"):
        processor(images=[str(path)], text=[PROMPT])


def test_non_image_file(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        processor(images=[path], text=[PROMPT])


def test_missing_file_and_wrong_type(processor, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        processor(images=[str(tmp_path / "absent.png")], text=[PROMPT])
    with pytest.raises(TypeError, match="got dict"):
        processor(images=[{"pixels": 1}], text=[PROMPT])


def test_decompression_bomb(processor, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    PIL.Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is now a bomb
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        processor(images=[str(path)], text=[PROMPT])


def test_a_bad_image_in_a_batch_is_named_and_the_processor_keeps_working(processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"PNG? no")
    good = PIL.Image.new("RGB", (20, 20), "blue")
    with pytest.raises(ValueError, match=r"image 1 \("):
        processor(images=[good, str(bad), good], text=[PROMPT, PROMPT, PROMPT])
    out = processor(images=[good, good], text=[PROMPT, PROMPT], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 2


def mode_image(mode: str, width: int, height: int) -> PIL.Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    if mode in ("I;16", "I"):
        return PIL.Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).convert(mode)
    if mode == "F":
        return PIL.Image.fromarray(rng.random((height, width), dtype=np.float32), mode="F")
    base = PIL.Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), mode="RGBA")
    return base.convert(mode)


MODES = ["RGB", "RGBA", "L", "LA", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_converted(processor, mode):
    out = processor.image_processor(mode_image(mode, 33, 17), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert all(torch.isfinite(out[name]).all() for name in PIXEL_INPUT_NAMES.values())


def test_sixteen_bit_is_scaled_not_clipped(processor):
    dark, bright = (PIL.Image.fromarray(np.full((8, 8), v, dtype=np.uint16)).convert("I;16") for v in (1000, 60000))
    process = processor.image_processor
    values = [process(im, return_tensors="pt")["pixel_values"].mean().item() for im in (dark, bright)]
    assert values[0] < -0.9 and values[1] > 0.8  # 16-bit range mapped onto [-1, 1], not everything saturated


def test_transparent_pixels_become_white(processor):
    clear = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = processor.image_processor(clear, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], torch.ones_like(out["pixel_values"]))


def test_one_pixel_image_and_arrays(processor):
    out = processor(images=[PIL.Image.new("RGB", (1, 1), "white")], text=[PROMPT], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    chw = torch.rand(3, 20, 30)
    hwc_uint16 = np.full((20, 30, 3), 40000, dtype=np.uint16)
    out = processor.image_processor([chw, hwc_uint16], return_tensors="pt")
    assert out["segmentation_pixel_values"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="empty"):
        processor.image_processor(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        processor.image_processor(np.zeros((5, 5, 7), dtype=np.uint8))


def test_empty_prompts(processor):
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="Empty prompt at position 1"):
        processor(images=[image], text=[PROMPT, "   "])
    with pytest.raises(TypeError, match="text must be a string"):
        processor(images=[image], text=[PROMPT, 3])


def test_video_with_zero_frames(processor):
    with pytest.raises(ValueError, match="video 0 has no frames"):
        processor(videos=[[]], text=["USER: <video>\nWhat happens?\nASSISTANT:"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 200), height=st.integers(1, 200), mode=st.sampled_from(MODES))
def test_any_size_and_mode_gives_every_expert_finite_inputs(width, height, mode):
    processor = AstreaImageProcessor.from_pretrained(TINY)
    out = processor(mode_image(mode, width, height), return_tensors="pt")
    for name, key in PIXEL_INPUT_NAMES.items():
        side = processor.expert_sizes[name]
        assert out[key].shape == (1, 3, side, side)
        assert torch.isfinite(out[key]).all()
