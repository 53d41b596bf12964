"""generate(): experts once per image at prefill, never while decoding; batched equals one-at-a-time."""

import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import EXPERT_NAMES


def count_expert_calls(model) -> dict[str, int]:
    calls = dict.fromkeys(EXPERT_NAMES, 0)
    for name in EXPERT_NAMES:

        def hook(module, args, output, name=name):
            calls[name] += args[0].shape[0]  # images seen by this expert

        model.model.experts[name].register_forward_hook(hook)
    return calls


def test_experts_run_once_per_image_during_generate(tiny_model, tiny_config):
    calls = count_expert_calls(tiny_model)
    llm_calls = []
    tiny_model.model.language_model.register_forward_hook(lambda *a: llm_calls.append(1))
    ids = torch.tensor([prompt_ids(tiny_config, [40, 41], num_images=2)] * 3)
    out = tiny_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        **random_pixels(tiny_config, 6),
    )
    assert out.shape[1] == ids.shape[1] + 6
    assert len(llm_calls) == 6  # prefill + 5 decode steps
    assert calls == dict.fromkeys(EXPERT_NAMES, 6)  # 3 prompts x 2 images, each image once


def test_precomputed_image_features_are_reused(tiny_model, tiny_config):
    """mm_encoder_outputs (e.g. from an earlier chat turn) skip the experts entirely."""
    ids = torch.tensor([prompt_ids(tiny_config, [40, 41])])
    pixels = random_pixels(tiny_config, 1)
    features = tiny_model.get_image_features(**pixels)
    calls = count_expert_calls(tiny_model)
    reused = tiny_model.generate(
        input_ids=ids, mm_encoder_outputs={"image": features}, max_new_tokens=4, do_sample=False
    )
    assert calls == dict.fromkeys(EXPERT_NAMES, 0)
    fresh = tiny_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **pixels)
    assert torch.equal(reused, fresh)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model, tiny_config):
    pad = tiny_config.text_config.pad_token_id
    prompts = [
        prompt_ids(tiny_config, [40, 41, 42, 43, 44, 45]),
        prompt_ids(tiny_config, [50]),
        prompt_ids(tiny_config, [60, 61, 62]),
    ]
    pixels = random_pixels(tiny_config, 3, seed=1)
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    batched = tiny_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, **pixels
    )
    for i, prompt in enumerate(prompts):
        single = tiny_model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            **{k: v[i : i + 1] for k, v in pixels.items()},
        )
        assert batched[i, longest:].tolist() == single[0, len(prompt) :].tolist()


def test_image_token_count_mismatch_is_a_clear_error(tiny_model, tiny_config):
    ids = torch.tensor([prompt_ids(tiny_config, [40], num_images=2)])
    try:
        tiny_model(input_ids=ids, **random_pixels(tiny_config, 1))
    except ValueError as error:
        assert f"{2 * tiny_config.num_image_tokens} image tokens" in str(error) and "1 images" in str(error)
    else:
        raise AssertionError("two placeholders with one image were accepted")
    try:
        tiny_model(input_ids=ids)
    except ValueError as error:
        assert "no images were given" in str(error)
    else:
        raise AssertionError("placeholders without images were accepted")


def test_sdpa_is_the_default_attention(tiny_model):
    assert tiny_model.model.language_model.config._attn_implementation == "sdpa"
