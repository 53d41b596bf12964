"""bitsandbytes loading keeps the experts, router, adapters, projectors, MoCo head and LM head unquantized, whatever
skip list the user gives. The skip-list logic is checked on the CPU against transformers' own matching; the real
4-bit load needs CUDA and bitsandbytes (`-m gpu`)."""

import pytest
import torch
from astrea_testing import TINY
from transformers import AutoProcessor, BitsAndBytesConfig, PreTrainedModel
from transformers.quantizers.quantizers_utils import should_convert_module

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import NOT_QUANTIZED, keep_unquantized


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.mark.parametrize("user_skips", [None, ["model.language_model.layers.0"]])
def test_only_the_llm_decoder_would_be_quantized(tiny_model, user_skips):
    config = keep_unquantized(BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=user_skips))
    skips = config.llm_int8_skip_modules
    assert set(NOT_QUANTIZED) <= set(skips) and set(user_skips or []) <= set(skips)
    converted = [name for name in linear_names(tiny_model) if should_convert_module(name, skips)]
    kept = [name for name in linear_names(tiny_model) if not should_convert_module(name, skips)]
    assert converted and all(name.startswith("model.language_model.layers.") for name in converted)
    assert not any(name.startswith("model.language_model.layers.0.") for name in converted) or not user_skips
    for prefix in ("model.experts.", "model.projectors.", "model.router", "model.adapters.", "moco.", "lm_head"):
        assert any(name.startswith(prefix) for name in kept), prefix


def test_from_pretrained_adds_the_skips_to_the_users_config_without_changing_it(monkeypatch):
    seen = {}

    def fake(cls, *args, **kwargs):
        seen.update(kwargs)
        return "loaded"

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(fake))
    users = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_tower"])
    assert AstreaForConditionalGeneration.from_pretrained("folder", quantization_config=users) == "loaded"
    assert users.llm_int8_skip_modules == ["vision_tower"]  # the user's object is untouched
    assert seen["quantization_config"].llm_int8_skip_modules == ["vision_tower", *NOT_QUANTIZED]
    seen.clear()
    assert AstreaForConditionalGeneration.from_pretrained("folder") == "loaded"
    assert seen.get("quantization_config") is None


@pytest.mark.gpu
def test_4bit_loading_on_a_gpu_quantizes_the_llm_only(tmp_path):
    torch.manual_seed(0)
    AstreaForConditionalGeneration(AstreaConfig.from_pretrained(TINY)).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(TINY).save_pretrained(tmp_path)
    model = AstreaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cuda"
    )
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert any(kind == "Linear4bit" for name, kind in kinds.items() if name.startswith("model.language_model."))
    assert not any(kind == "Linear4bit" for name, kind in kinds.items() if name.startswith(NOT_QUANTIZED))
