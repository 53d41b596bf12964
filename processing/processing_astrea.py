"""AstreaProcessor: image processor + tokenizer + chat template.

Each image placeholder in the text becomes `num_image_tokens` copies of the image token (576 at the paper's
24x24 grid); the count of placeholders and images is checked by transformers' `ProcessorMixin`.
"""

from transformers.processing_utils import ProcessorMixin


class AstreaProcessor(ProcessorMixin):
    text_kwargs = {"padding": True}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens: int = 576,
                 image_token: str = "<image>", **kwargs):  # fmt: skip
        """num_image_tokens: visual tokens per image (the model's `config.num_image_tokens`)."""
        self.num_image_tokens = num_image_tokens
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens


__all__ = ["AstreaProcessor"]
