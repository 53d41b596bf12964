"""Each expert wrapper against the transformers model it wraps, run alone with the same weights."""

import torch
from astrea_testing import random_pixels
from transformers import GroundingDinoModel, Sam2VisionModel, SiglipVisionModel, SwinModel

from modeling_astrea import EXPERT_NAMES


def test_caption_expert_is_siglips_patch_grid(tiny_model, tiny_config):
    expert = tiny_model.model.experts["caption"]
    reference = SiglipVisionModel(tiny_config.caption_config).eval()
    reference.load_state_dict(expert.model.state_dict())
    pixels = random_pixels(tiny_config, 2)["pixel_values"]
    grid = expert(pixels)  # [N, C, h, w]
    tokens = reference(pixel_values=pixels).last_hidden_state
    side = tiny_config.caption_config.image_size // tiny_config.caption_config.patch_size
    assert grid.shape == (2, tiny_config.caption_config.hidden_size, side, side)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens)


def test_classification_expert_is_the_swin_encoder(tiny_model, tiny_config):
    expert = tiny_model.model.experts["classification"]
    reference = SwinModel(tiny_config.classification_config.vision_config).eval()
    reference.load_state_dict(expert.model.vision_model.state_dict())
    pixels = random_pixels(tiny_config, 2)["classification_pixel_values"]
    grid = expert(pixels)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), reference(pixel_values=pixels).last_hidden_state)
    assert grid.shape[1] == tiny_config.classification_config.vision_width


def test_detection_expert_is_one_level_of_grounding_dinos_memory(tiny_model, tiny_config):
    expert = tiny_model.model.experts["detection"]
    reference = GroundingDinoModel(tiny_config.detection_config).eval()
    reference.load_state_dict(expert.model.state_dict())
    pixels = random_pixels(tiny_config, 2)["detection_pixel_values"]
    prompt = torch.tensor([tiny_config.detection_prompt_ids] * 2)
    memory = reference(pixel_values=pixels, input_ids=prompt).encoder_last_hidden_state_vision
    shapes = expert.level_shapes(*pixels.shape[-2:])
    assert sum(h * w for h, w in shapes) == memory.shape[1]
    grid = expert(pixels)  # the config's prompt ids by default
    level = tiny_config.detection_feature_level
    start = sum(h * w for h, w in shapes[:level])
    expected = memory[:, start : start + shapes[level][0] * shapes[level][1]]
    assert grid.shape[-2:] == shapes[level]
    # same weights; the two runs may pick different attention kernels, hence the float tolerance
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), expected, atol=3e-4, rtol=1e-3)


def test_detection_expert_runs_the_encoder_half_only_and_every_hook_fires(tiny_model, tiny_config):
    """Grounding DINO's query selection and decoder feed nothing to Astrea and do not run; the parts that do run are
    called as modules, so every forward hook on them fires (DeepSpeed gathers parameters in such hooks) and no
    exception cuts a forward short."""
    expert = tiny_model.model.experts["detection"]
    parts = ("text_backbone", "text_projection", "backbone", "encoder", "decoder", "enc_output")
    calls = dict.fromkeys(parts, 0)
    hooks = [
        getattr(expert.model, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in parts
    ]
    try:
        expert(random_pixels(tiny_config, 1)["detection_pixel_values"])
    finally:
        for hook in hooks:
            hook.remove()
    ran = {"text_backbone": 1, "text_projection": 1, "backbone": 1, "encoder": 1}
    assert calls == {**ran, "decoder": 0, "enc_output": 0}
    assert not expert.model._forward_hooks and not expert.model.encoder._forward_hooks  # nothing left behind


def test_detection_level_shapes_for_non_square_inputs(tiny_model):
    expert = tiny_model.model.experts["detection"]
    memory = expert.model(pixel_values=torch.randn(1, 3, 48, 80), input_ids=torch.tensor([expert.prompt_ids]))
    shapes = expert.level_shapes(48, 80)
    assert sum(h * w for h, w in shapes) == memory.encoder_last_hidden_state_vision.shape[1]


def test_segmentation_expert_is_sam2s_image_embedding(tiny_model, tiny_config):
    expert = tiny_model.model.experts["segmentation"]
    reference = Sam2VisionModel(tiny_config.segmentation_config).eval()
    reference.load_state_dict(expert.model.state_dict())
    pixels = random_pixels(tiny_config, 2)["segmentation_pixel_values"]
    torch.testing.assert_close(expert(pixels), reference(pixel_values=pixels).fpn_hidden_states[-1])


def test_expert_features_are_resampled_to_the_common_grid(tiny_model, tiny_config):
    features = tiny_model.model.get_expert_features(**random_pixels(tiny_config, 3))
    assert list(features) == list(EXPERT_NAMES)
    for name, width in tiny_config.expert_hidden_sizes.items():
        assert features[name].shape == (3, tiny_config.num_image_tokens, width)


def test_experts_are_frozen_and_run_without_autograd(tiny_model, tiny_config):
    tiny_model.train()
    assert not any(p.requires_grad for p in tiny_model.model.experts.parameters())
    features = tiny_model.model.get_expert_features(**random_pixels(tiny_config, 1))
    assert all(not f.requires_grad for f in features.values())
    fused = tiny_model.model.fuse_expert_features(features).pooler_output
    assert fused.requires_grad  # projectors, router and adapters train


def test_missing_pixel_input_names_the_expert(tiny_model, tiny_config):
    pixels = random_pixels(tiny_config, 1)
    del pixels["segmentation_pixel_values"]
    try:
        tiny_model.model.get_image_features(**pixels)
    except ValueError as error:
        assert "segmentation_pixel_values" in str(error)
    else:
        raise AssertionError("missing expert input was accepted")
