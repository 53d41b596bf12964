"""Astrea's processing: the image processor (one image -> four experts' inputs), the processor (+ tokenizer and
chat template) and the offline tiny tokenizer.

Installed as `astrea.processing` (see setup.py), so no generic top-level name `processing` reaches
site-packages. Importing it registers the processors with `AutoImageProcessor` and `AutoProcessor`;
`import modeling_astrea` imports it too, so one import is enough.
"""

from transformers import AutoImageProcessor, AutoProcessor

from modeling_astrea.configuration_astrea import AstreaConfig

from .image_processing_astrea import AstreaImageProcessor
from .processing_astrea import AstreaProcessor

AutoImageProcessor.register(AstreaConfig, image_processor_classes={"pil": AstreaImageProcessor}, exist_ok=True)
AutoProcessor.register(AstreaConfig, AstreaProcessor, exist_ok=True)
# save_pretrained also writes these classes' .py files and an auto_map, for trust_remote_code loading
AstreaImageProcessor.register_for_auto_class("AutoImageProcessor")
AstreaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AstreaImageProcessor", "AstreaProcessor"]
