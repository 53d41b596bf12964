"""The RAM++ image tagger (Recognize Anything Plus) as a transformers model: Astrea's classification expert.

transformers has no RAM++ class, so this is ours, laid out after the released `ram_plus_swin_large_14m.pth`
(`python -m modeling_astrea.convert_ram_plus` converts it):

1. the image encoder is transformers' `SwinModel` (Swin-L/384); its average-pooled token is prepended to the
   12x12 grid of last-stage tokens, and all of them are projected to the tag-embedding width (512);
2. every tag has several text embeddings (51 descriptions in RAM++); per image, each tag's embedding is the
   softmax-weighted sum of its descriptions, weighted by their cosine similarity to the image's pooled token;
3. those tag embeddings, projected to the decoder width and passed through a ReLU, are the queries of a
   two-layer decoder whose layers cross-attend to the image tokens and then apply a feed-forward block (BERT
   layers without self-attention, as in Query2Label), and a linear head gives one logit per tag;
4. a tag is predicted when its sigmoid exceeds its own threshold (RAM++ ships one per tag).

Inside Astrea only step 1's Swin grid feeds the router; the rest makes the expert usable on its own
(`predict_tags`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_astrea import AstreaTaggerConfig


@dataclass
class AstreaTaggerOutput(ModelOutput):
    """
    tag_logits (`torch.FloatTensor` of shape `(batch_size, num_tags)`): one logit per tag.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, tag_embedding_size)`): projected
        image tokens (pooled token first) that the tag queries attend to.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_width)`): Swin tokens.
    """

    tag_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class AstreaTagCrossAttention(nn.Module):
    """Multi-head attention from the tag queries (decoder width) to the image tokens (tag-embedding width)."""

    def __init__(self, config: AstreaTaggerConfig):
        super().__init__()
        hidden = config.tag_hidden_size
        self.num_heads = config.tag_num_heads
        self.dropout = config.tag_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(config.tag_embedding_size, hidden)
        self.value = nn.Linear(config.tag_embedding_size, hidden)
        self.output = nn.Linear(hidden, hidden)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        batch, num_tags, hidden = queries.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, heads, L, H / heads]
            return x.view(batch, x.shape[1], self.num_heads, hidden // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.query(queries)),
            heads(self.key(image_embeds)),
            heads(self.value(image_embeds)),
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, heads, T, H / heads]
        return self.output(attended.transpose(1, 2).reshape(batch, num_tags, hidden))


class AstreaTagDecoderLayer(nn.Module):
    """Cross-attention, then a feed-forward block; dropout and post-norm residuals as in BERT."""

    def __init__(self, config: AstreaTaggerConfig):
        super().__init__()
        hidden = config.tag_hidden_size
        self.cross_attention = AstreaTagCrossAttention(config)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.tag_intermediate_size)
        self.activation = ACT2FN["gelu"]
        self.output = nn.Linear(config.tag_intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.tag_dropout)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.attention_norm(queries + self.dropout(self.cross_attention(queries, image_embeds)))
        update = self.output(self.activation(self.intermediate(queries)))
        return self.output_norm(queries + self.dropout(update))


def init_tagger_weights(module: nn.Module, config: AstreaTaggerConfig) -> None:
    """The tagger's own parameters (the Linear and LayerNorm layers get the usual transformers init). Inside Astrea
    too: transformers initialises a `PreTrainedModel` child with that child's own `_init_weights`."""
    if isinstance(module, AstreaTaggerModel):
        init.normal_(module.tag_embeddings, mean=0.0, std=config.initializer_range)
        init.constant_(module.description_logit_scale, math.log(1 / 0.07))  # CLIP's temperature


class AstreaTaggerPreTrainedModel(PreTrainedModel):
    config: AstreaTaggerConfig
    base_model_prefix = "tagger"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _no_split_modules = ["AstreaTagDecoderLayer"]  # its Swin backbone's own list (SwinStage) joins in post_init

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_tagger_weights(module, self.config)


class AstreaTaggerModel(AstreaTaggerPreTrainedModel):
    def __init__(self, config: AstreaTaggerConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.image_projection = nn.Linear(config.vision_width, config.tag_embedding_size)
        # [num_tags * descriptions_per_tag, E]: tag t's descriptions are rows t * D .. t * D + D - 1
        self.tag_embeddings = nn.Parameter(
            torch.zeros(config.num_tags * config.descriptions_per_tag, config.tag_embedding_size)
        )
        # the log of the softmax scale over descriptions: RAM++ learnt it, Astrea keeps it fixed (a buffer, so that
        # DeepSpeed, which cannot broadcast a 0-dimensional parameter, can start; it stays in the state dict)
        self.register_buffer("description_logit_scale", torch.zeros(()))
        self.tag_projection = (
            nn.Identity()
            if config.tag_embedding_size == config.tag_hidden_size
            else nn.Linear(config.tag_embedding_size, config.tag_hidden_size)
        )
        self.layers = nn.ModuleList(AstreaTagDecoderLayer(config) for _ in range(config.tag_num_layers))
        self.tag_head = nn.Linear(config.tag_hidden_size, 1)
        self.post_init()

    def tag_queries(self, image_embed: torch.Tensor) -> torch.Tensor:
        """[B, E] pooled image embedding -> [B, T, H] decoder queries: each tag's descriptions reweighted."""
        config = self.config
        descriptions = self.tag_embeddings.view(config.num_tags, config.descriptions_per_tag, -1)  # [T, D, E]
        similarity = torch.einsum("be,tde->btd", F.normalize(image_embed, dim=-1), descriptions)
        weights = (self.description_logit_scale.exp() * similarity).softmax(dim=-1)  # [B, T, D]
        tag_embeds = torch.einsum("btd,tde->bte", weights, descriptions)  # [B, T, E]
        return F.relu(self.tag_projection(tag_embeds))

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> AstreaTaggerOutput:
        vision = self.vision_model(pixel_values=pixel_values)
        tokens = torch.cat([vision.pooler_output.unsqueeze(1), vision.last_hidden_state], dim=1)  # [B, 1 + N, V]
        image_embeds = self.image_projection(tokens)  # [B, 1 + N, E]
        queries = self.tag_queries(image_embeds[:, 0])  # [B, T, H]
        for layer in self.layers:
            queries = layer(queries, image_embeds)
        tag_logits = self.tag_head(queries).squeeze(-1)  # [B, T]
        return AstreaTaggerOutput(
            tag_logits=tag_logits, image_embeds=image_embeds, last_hidden_state=vision.last_hidden_state
        )

    @torch.no_grad()
    def predict_tags(self, pixel_values: torch.FloatTensor, threshold: float | None = None) -> list[list[str]]:
        """Per image, the names of the tags whose probability exceeds their threshold (the config's per-tag
        thresholds; or one `threshold` for every tag), in tag order. Call it in eval mode (as `from_pretrained`
        leaves the model): in train mode the decoder's dropout is on."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be a probability in [0, 1]")
        probs = self(pixel_values).tag_logits.float().sigmoid()  # [B, T]
        if threshold is None:
            limits = torch.tensor(self.config.thresholds(), device=probs.device)
        else:
            limits = torch.full_like(probs[0], threshold)
        names = self.config.names()
        return [[names[i] for i in row.nonzero().flatten().tolist()] for row in probs > limits]


__all__ = [
    "AstreaTagCrossAttention",
    "AstreaTagDecoderLayer",
    "AstreaTaggerModel",
    "AstreaTaggerOutput",
    "AstreaTaggerPreTrainedModel",
]
