"""Astrea for Hugging Face Transformers.

Importing this package registers Astrea with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`) and marks the classes for remote code, so `save_pretrained` writes the model's
`.py` files and an `auto_map` next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_astrea import EXPERT_NAMES, AstreaConfig, AstreaTaggerConfig
from .modeling_astrea import (
    PIXEL_INPUT_NAMES,
    AstreaForConditionalGeneration,
    AstreaImageFeatures,
    AstreaModel,
    AstreaPreTrainedModel,
)
from .modeling_astrea_tagger import AstreaTaggerModel

AutoConfig.register("astrea", AstreaConfig, exist_ok=True)
AutoConfig.register("astrea_tagger", AstreaTaggerConfig, exist_ok=True)
AutoModel.register(AstreaConfig, AstreaModel, exist_ok=True)
AutoModel.register(AstreaTaggerConfig, AstreaTaggerModel, exist_ok=True)
AutoModelForImageTextToText.register(AstreaConfig, AstreaForConditionalGeneration, exist_ok=True)

AstreaConfig.register_for_auto_class()
AstreaModel.register_for_auto_class("AutoModel")
AstreaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "EXPERT_NAMES",
    "PIXEL_INPUT_NAMES",
    "AstreaConfig",
    "AstreaForConditionalGeneration",
    "AstreaImageFeatures",
    "AstreaModel",
    "AstreaPreTrainedModel",
    "AstreaTaggerConfig",
    "AstreaTaggerModel",
]

# The processors live in `astrea.processing` (installed from processing/); register them too when installed.
try:
    import astrea.processing  # noqa: F401, E402
except ModuleNotFoundError:  # e.g. only the model's files are on the path
    pass
