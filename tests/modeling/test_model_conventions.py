"""What transformers' own vision-language models do, and tools built on their API expect: `get_image_features`
returns a `BaseModelOutputWithPooling`, and the tensor-parallel plan covers the LM head, tied or not (in the style of
transformers' common model tests; `return_dict=False` and `inputs_embeds` are in test_save_load.py)."""

import re
from pathlib import Path

import torch
from astrea_testing import TINY, prompt_ids, random_pixels, torchrun_two
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaAlignment


def inputs(config, num_images=1):
    ids = torch.tensor([prompt_ids(config, [40, 41, 42], num_images)])
    return {"input_ids": ids, **random_pixels(config, num_images)}


@torch.no_grad()
def test_get_image_features_is_a_base_model_output_with_pooling(tiny_model, tiny_config):
    pixels = random_pixels(tiny_config, 2)
    out = tiny_model.get_image_features(**pixels, output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    experts = tiny_model.get_expert_features(**pixels)
    tokens = tiny_config.num_image_tokens
    # last_hidden_state: the experts' own features on the token grid, concatenated in EXPERT_NAMES order
    widths = [experts[name].shape[-1] for name in EXPERT_NAMES]
    assert out.last_hidden_state.shape == (2, tokens, sum(widths))
    torch.testing.assert_close(out.last_hidden_state, torch.cat([experts[n] for n in EXPERT_NAMES], dim=-1))
    assert len(out.hidden_states) == len(EXPERT_NAMES)
    for name, state in zip(EXPERT_NAMES, out.hidden_states, strict=True):
        torch.testing.assert_close(state, experts[name])
    # pooler_output: what replaces the placeholders (the fused tokens of Eq. 10)
    assert out.pooler_output.shape == (2, tokens, tiny_config.text_config.hidden_size)
    torch.testing.assert_close(out.pooler_output, tiny_model.model.fuse_expert_features(experts).pooler_output)
    assert out.attentions is None
    assert tiny_model.get_image_features(**pixels).hidden_states is None  # only when asked


@torch.no_grad()
def test_pre_alignment_and_sample_routing_fill_last_hidden_state_with_the_experts_that_ran(tiny_config):
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).eval()
    pixels = random_pixels(tiny_config, 2)
    experts = model.get_expert_features(**pixels)
    model.model.alignment = AstreaAlignment(("caption", "classification"), residual=True)
    staged = model.get_image_features(**pixels)
    torch.testing.assert_close(
        staged.last_hidden_state, torch.cat([experts["caption"], experts["classification"]], -1)
    )
    tiny_config.router_mode = "sample"
    model = AstreaForConditionalGeneration(tiny_config).eval()
    sampled = model.get_image_features(**pixels, output_hidden_states=True)
    torch.testing.assert_close(sampled.last_hidden_state, model.get_expert_features(**pixels)["caption"])
    assert len(sampled.hidden_states) == 1


def test_the_tensor_parallel_plan_covers_the_lm_head_and_names_real_modules(tiny_model):
    plan = tiny_model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"
    # the LM head and the input embedding are split on the same (vocabulary) axis, so tying them stays consistent
    assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"
    names = [name for name, _ in tiny_model.named_modules()]
    for pattern in plan:
        regex = pattern.replace(".", r"\.").replace("*", r"\d+")
        assert any(re.fullmatch(regex, name) for name in names), pattern
    assert not any(key.startswith(("model.experts", "moco")) for key in plan)  # replicated


def test_tensor_parallel_2_gives_the_single_process_logits_with_a_tied_head(tmp_path):
    """Two CPU processes (gloo) load a saved tiny Astrea whose LM head is tied to its embedding with
    `tp_plan="auto"`; without the head's entry in the plan the forward fails (mixed Tensor and DTensor)."""
    config = AstreaConfig.from_pretrained(TINY)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(**inputs(model.config)).logits
    result = torchrun_two(Path(__file__).with_name("tp_logits.py"), tmp_path / "model", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"{rank}.pt")
        assert saved["tied"]
        torch.testing.assert_close(saved["logits"], expected, atol=1e-5, rtol=1e-4)
