"""A RAM++-style image tagger: Swin image encoder, image projection, and a tag decoder over per-tag queries.

transformers has no RAM++ class. This is ours: the image encoder is transformers' `SwinModel`; the tag decoder
follows RAM++'s tagging head (each layer: tag queries cross-attend to the image tokens, then a feed-forward
block; no self-attention between tags) and ends in one logit per tag.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_astrea import AstreaTaggerConfig


@dataclass
class AstreaTaggerOutput(ModelOutput):
    """
    tag_logits (`torch.FloatTensor` of shape `(batch_size, num_tags)`): one logit per tag.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, tag_hidden_size)`): projected
        image tokens (pooled token first) that the tag queries attend to.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_width)`): Swin tokens.
    """

    tag_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class AstreaTagDecoderLayer(nn.Module):
    """Tag queries attend to the image tokens, then a feed-forward block; post-norm residuals as in BERT."""

    def __init__(self, config: AstreaTaggerConfig):
        super().__init__()
        hidden = config.tag_hidden_size
        self.cross_attention = nn.MultiheadAttention(hidden, config.tag_num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.tag_intermediate_size)
        self.activation = ACT2FN["gelu"]
        self.output = nn.Linear(config.tag_intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        attended, _ = self.cross_attention(queries, image_embeds, image_embeds, need_weights=False)
        queries = self.attention_norm(queries + attended)
        return self.output_norm(queries + self.output(self.activation(self.intermediate(queries))))


class AstreaTaggerPreTrainedModel(PreTrainedModel):
    config: AstreaTaggerConfig
    base_model_prefix = "tagger"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AstreaTaggerModel):
            module.tag_queries.normal_(mean=0.0, std=self.config.initializer_range)


class AstreaTaggerModel(AstreaTaggerPreTrainedModel):
    def __init__(self, config: AstreaTaggerConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.image_projection = nn.Linear(config.vision_width, config.tag_hidden_size)
        self.tag_queries = nn.Parameter(torch.zeros(config.num_tags, config.tag_hidden_size))
        self.layers = nn.ModuleList(AstreaTagDecoderLayer(config) for _ in range(config.tag_num_layers))
        self.tag_head = nn.Linear(config.tag_hidden_size, 1)
        self.post_init()

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> AstreaTaggerOutput:
        vision = self.vision_model(pixel_values=pixel_values)
        tokens = torch.cat([vision.pooler_output.unsqueeze(1), vision.last_hidden_state], dim=1)
        image_embeds = self.image_projection(tokens)  # [B, 1 + N, H]
        queries = self.tag_queries.unsqueeze(0).expand(pixel_values.shape[0], -1, -1)  # [B, T, H]
        for layer in self.layers:
            queries = layer(queries, image_embeds)
        tag_logits = self.tag_head(queries).squeeze(-1)  # [B, T]
        return AstreaTaggerOutput(
            tag_logits=tag_logits, image_embeds=image_embeds, last_hidden_state=vision.last_hidden_state
        )

    @torch.no_grad()
    def predict_tags(self, pixel_values: torch.FloatTensor, threshold: float | None = None) -> list[list[int]]:
        """Indices of the tags whose probability exceeds `threshold` (the config's by default), per image."""
        threshold = self.config.tag_threshold if threshold is None else threshold
        probs = self(pixel_values).tag_logits.sigmoid()
        return [row.nonzero().flatten().tolist() for row in probs > threshold]


__all__ = ["AstreaTaggerModel", "AstreaTaggerOutput", "AstreaTaggerPreTrainedModel"]
