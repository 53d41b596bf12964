"""Astrea: four task experts (SigLIP, RAM++ tagger, Grounding DINO, SAM2) routed into one LLM.

Read top to bottom: output dataclasses, the expert wrappers (each returns a feature grid), the fusion blocks
(projector, adapter, router, residual attention, MoCo), then `AstreaModel` (no head) and
`AstreaForConditionalGeneration` (LM head, losses, generation).
"""

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils import can_return_tuple, logging

from .configuration_astrea import EXPERT_NAMES, AstreaConfig
from .modeling_astrea_tagger import AstreaTaggerModel

logger = logging.get_logger(__name__)

#: Modules kept out of weight quantization (bitsandbytes): the experts, Astrea's own fusion modules and the LM
#: head. Only the LLM's decoder is quantized.
NOT_QUANTIZED = (
    "model.experts",
    "model.projectors",
    "model.router",
    "model.adapters",
    "model.residual_attention",
    "moco",
    "lm_head",
)


def keep_unquantized(quantization_config):
    """A copy of a bitsandbytes quantization config whose skip list also names `NOT_QUANTIZED`; modules the user
    listed stay listed. Other quantization configs are returned as they are."""
    if not hasattr(quantization_config, "llm_int8_skip_modules"):
        return quantization_config
    config = copy.deepcopy(quantization_config)
    config.llm_int8_skip_modules = list(dict.fromkeys([*(config.llm_int8_skip_modules or []), *NOT_QUANTIZED]))
    return config


IMAGE_TOKEN = "<image>"
DETECTION_PROMPT = "object."  # the generic phrase list that conditions Grounding DINO by default

#: Name of each expert's pixel input in `forward`, `generate` and the processor's output. The caption expert
#: takes the conventional `pixel_values`, which is also what makes `generate()` encode images once at prefill.
PIXEL_INPUT_NAMES: dict[str, str] = {
    "caption": "pixel_values",
    "classification": "classification_pixel_values",
    "detection": "detection_pixel_values",
    "segmentation": "segmentation_pixel_values",
}


@dataclass
class AstreaImageFeatures(BaseModelOutputWithPooling):
    """
    `get_image_features`' output, shaped like transformers' vision-language models' (`BaseModelOutputWithPooling`):
    the vision side's own features in `last_hidden_state`, what replaces the image placeholders in `pooler_output`.

    last_hidden_state (`torch.FloatTensor` of shape `(num_images, num_image_tokens, sum of the experts' widths)`):
        the experts' features resampled to the visual-token grid, before projection, concatenated on the channel
        axis in `EXPERT_NAMES` order (only the experts that ran: a pre-alignment stage's; with
        `router_mode="sample"`, the global (caption) expert, the one that sees every image).
    pooler_output (`torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`): the fused visual
        tokens f of Eq. 10 that replace the image placeholders (the name is the one `generate()` looks for), in the
        order the LLM reads them (`config.image_token_order`); every other field here stays in the raster.
    hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`): the same expert features one
        tensor per expert, `(num_images, num_image_tokens, expert width)` each, in the order of `last_hidden_state`.
    attentions: always None; the four experts have no common attention map (windowed, deformable, hierarchical).
    router_probs (`torch.FloatTensor` of shape `(num_images, num_image_tokens, num_experts)`): P of Eq. 9, with
        exactly `num_experts - router_top_k` zeros per token; columns in `EXPERT_NAMES` order.
    unprompted_pooler_output (`torch.FloatTensor`, shaped as `pooler_output`; only when asked for with
        `unprompted=True`): the same images' tokens routed without the prompt, from the same projections: what
        `pooler_output` is when no prompt is given, and MoCo's image side in training.
    router_logits (`torch.FloatTensor`, shaped as `router_probs`; `(num_images, 1, num_experts)` with
        `router_mode="sample"`): the router's logits before the top-k (Eq. 9), prompt bias included; what the
        load-balancing loss reads (`config.router_aux_loss_coef`).
    """

    router_probs: torch.FloatTensor | None = None
    unprompted_pooler_output: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None


@dataclass
class AstreaModelOutputWithPast(ModelOutput):
    """
    last_hidden_state (`(batch_size, sequence_length, hidden_size)`): the LLM's last hidden states.
    past_key_values (`Cache`): the LLM's KV cache.
    hidden_states, attentions: as returned by the LLM when asked for.
    image_hidden_states (`(num_images, num_image_tokens, hidden_size)`): fused visual tokens merged into the input,
        in `config.image_token_order`.
    router_probs (`(num_images, num_image_tokens, num_experts)`): router probabilities per image (Fig. 2).
    router_logits (`(num_images, num_image_tokens, num_experts)`; one row per image with `router_mode="sample"`):
        the router's logits before the top-k.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    router_probs: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None


@dataclass
class AstreaCausalLMOutputWithPast(ModelOutput):
    """
    loss (`()`): L_total = L_reg + mu * L_moco (Eq. 11) when `labels` are given (L_reg alone without MoCo), plus
        `config.router_aux_loss_coef` * `loss_balance` when that is above 0.
    loss_reg (`()`): the language-modelling loss L_reg (Eq. 1).
    loss_moco (`()`): the momentum-contrastive loss L_moco (Eq. 7); None when MoCo is off or there are no images.
    loss_balance (`()`): the router's load-balancing loss (`load_balancing_loss`; 1 when the experts are used
        evenly); only with `config.router_aux_loss_coef` > 0, in instruction tuning, when there are images.
    logits (`(batch_size, sequence_length, vocab_size)`): LM head scores.
    past_key_values, hidden_states, attentions: as returned by the LLM.
    image_hidden_states (`(num_images, num_image_tokens, hidden_size)`): fused visual tokens, in
        `config.image_token_order`.
    router_probs (`(num_images, num_image_tokens, num_experts)`): router probabilities per image (Fig. 2).
    moco_chance (`()`): what `loss_moco` would be if every candidate were as similar as the positive (the log of the
        number of candidates each term counts): `loss_moco` below it means MoCo has learnt something.
    """

    loss: torch.FloatTensor | None = None
    loss_reg: torch.FloatTensor | None = None
    loss_moco: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    router_probs: torch.FloatTensor | None = None
    moco_chance: torch.FloatTensor | None = None
    loss_balance: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None


@dataclass
class AstreaAlignment:
    """Which experts feed the LLM during a pre-alignment stage.

    experts: the stage's experts in order; progressive stages list the experts aligned so far, the current last.
    residual: use the random residual attention over the earlier experts (Eq. 2-4).
    joint: all listed experts at once, averaged (the "Cap -> All" ablation of Table 6).
    """

    experts: tuple[str, ...]
    residual: bool = True
    joint: bool = False

    def __post_init__(self):
        unknown = [name for name in self.experts if name not in EXPERT_NAMES]
        if unknown or not self.experts:
            raise ValueError(f"Alignment experts must be among {EXPERT_NAMES}, got {self.experts}.")


# --- The experts: each wraps a transformers model and returns a channels-first feature grid -----------------


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, h*w, C] -> [N, C, h, w]"""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class AstreaCaptionExpert(nn.Module):
    """SigLIP vision tower: the patch tokens of its last layer (27x27 for SO400M/14@384).

    SigLIP's attention-pooling head stays in the module (checkpoints hold it) but never runs: Astrea reads the patch
    tokens, and the head's `nn.MultiheadAttention` reads its weights directly, which breaks in serving engines that
    replace every `nn.Linear` (vLLM; docs/serving.md)."""

    def __init__(self, config):
        super().__init__()
        self.model = AutoModel.from_config(config)
        skip_pooling_head(self.model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=pixel_values).last_hidden_state  # [N, h*w, C]
        patch = self.model.config.patch_size
        return tokens_to_grid(tokens, pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)


def skip_pooling_head(siglip) -> None:
    """Have a `SiglipVisionModel` return its patch tokens without running its pooling head."""
    siglip.use_head = False


class AstreaClassificationExpert(nn.Module):
    """RAM++ tagger: the Swin encoder's last-stage tokens (12x12 for Swin-L@384) feed Astrea."""

    def __init__(self, config):
        super().__init__()
        self.model = AstreaTaggerModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, h*w, C]
        side = math.isqrt(tokens.shape[1])
        height, width = (side, side) if side * side == tokens.shape[1] else self._grid(pixel_values.shape[-2:])
        return tokens_to_grid(tokens, height, width)

    def _grid(self, size) -> tuple[int, int]:
        config = self.model.config.vision_config
        height, width = (math.ceil(s / config.patch_size) for s in size)
        for _ in range(len(config.depths) - 1):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width


def _gathered(parameters: list[nn.Parameter], modify: bool = False):
    """A context in which `parameters` are whole: DeepSpeed ZeRO-3's gathering when it partitions the model (for a
    parameter used outside the forward of the module that owns it; with `modify`, changes made in the context are
    kept, and every process must enter it), else nothing to do."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        try:  # (in a try block: transformers' remote-code import check then does not require deepspeed)
            import deepspeed
        except ImportError as error:
            raise ImportError("DeepSpeed ZeRO-3 is enabled but deepspeed does not import.") from error
        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


class AstreaDetectionExpert(nn.Module):
    """Grounding DINO: one level of its text-conditioned encoder memory (`encoder_last_hidden_state_vision`).

    The visual memory depends on a text prompt; without one, the config's generic phrase list is used.
    """

    def __init__(self, config, feature_level: int, prompt_ids: list[int]):
        super().__init__()
        self.model = AutoModel.from_config(config)
        self.feature_level = feature_level
        self.prompt_ids = list(prompt_ids)  # a plain list: from_pretrained would not restore a non-persistent buffer

    def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(h, w) of each level of the encoder memory for an input of height x width: the backbone's selected
        stages (patch embedding, then halving at each merge), then extra stride-2 levels."""
        config = self.model.config
        backbone = config.backbone_config
        h, w = math.ceil(height / backbone.patch_size), math.ceil(width / backbone.patch_size)
        stage_shapes = [(h, w)]
        for _ in range(len(backbone.depths) - 1):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            stage_shapes.append((h, w))
        shapes = [stage_shapes[index - 1] for index in backbone.out_indices]
        while len(shapes) < config.num_feature_levels:
            h, w = shapes[-1]
            shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
        return shapes

    def encode(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Grounding DINO's visual encoder memory (`encoder_last_hidden_state_vision`), [N, sum_l h_l*w_l, d]: the
        first half of `GroundingDinoModel.forward`, step by step with its own modules (text and image backbones,
        per-level input projections, the text-conditioned encoder). The query selection and the decoder after it
        feed nothing to Astrea and do not run. The tests compare the result with the whole model's output."""
        from transformers.models.grounding_dino import modeling_grounding_dino as gd

        dino, config = self.model, self.model.config
        if hasattr(dino, "special_tokens"):  # transformers >= 5.20 passes them; before, a module constant
            text_masks, text_positions = gd.generate_masks_with_special_tokens_and_transfer_map(
                input_ids, special_tokens=dino.special_tokens
            )
        else:
            text_masks, text_positions = gd.generate_masks_with_special_tokens_and_transfer_map(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        limit = config.max_text_len
        text_masks, text_positions = text_masks[:, :limit, :limit], text_positions[:, :limit]
        input_ids, text_token_mask = input_ids[:, :limit], attention_mask[:, :limit].bool()
        text = dino.text_backbone(
            input_ids, text_masks[:, None], torch.zeros_like(input_ids), text_positions, return_dict=True
        ).last_hidden_state
        text = dino.text_projection(text)

        if pixel_mask is None:
            pixel_mask = pixel_values.new_ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long)
        backbone_levels, positions = dino.backbone(pixel_values, pixel_mask)
        maps = [dino.input_proj_vision[level](source) for level, (source, _) in enumerate(backbone_levels)]
        masks = [mask for _, mask in backbone_levels]
        for level in range(len(maps), config.num_feature_levels):  # extra stride-2 levels past the backbone's
            previous = backbone_levels[-1][0] if level == len(backbone_levels) else maps[-1]
            source = dino.input_proj_vision[level](previous)
            mask = F.interpolate(pixel_mask[None].float(), size=source.shape[-2:]).to(torch.bool)[0]
            positions.append(dino.backbone.position_embedding(source, mask).to(source.dtype))
            maps.append(source)
            masks.append(mask)

        shapes = [tuple(feature_map.shape[-2:]) for feature_map in maps]
        sources = torch.cat([feature_map.flatten(2).transpose(1, 2) for feature_map in maps], dim=1)
        with _gathered([dino.level_embed]):  # read outside its module's forward (DeepSpeed ZeRO-3 partitions it)
            level_embed = dino.level_embed.clone()
        position_embedding = torch.cat(
            [p.flatten(2).transpose(1, 2) + level_embed[level].view(1, 1, -1) for level, p in enumerate(positions)],
            dim=1,
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=sources.device)
        return dino.encoder(
            vision_features=sources,
            vision_attention_mask=~torch.cat([mask.flatten(1) for mask in masks], dim=1),
            vision_position_embedding=position_embedding,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=shapes,
            level_start_index=torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])),
            valid_ratios=torch.stack([dino.get_valid_ratio(mask, dtype=sources.dtype) for mask in masks], dim=1),
            text_features=text,
            text_attention_mask=~text_token_mask,
            text_position_embedding=None,
            text_self_attention_masks=~text_masks,
            text_position_ids=text_positions,
            return_dict=True,
        ).last_hidden_state_vision

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is None:
            input_ids = torch.tensor([self.prompt_ids], device=pixel_values.device).expand(pixel_values.shape[0], -1)
        memory = self.encode(pixel_values, pixel_mask, input_ids, attention_mask)  # [N, sum_l h_l*w_l, d]
        shapes = self.level_shapes(*pixel_values.shape[-2:])
        sizes = [h * w for h, w in shapes]
        if sum(sizes) != memory.shape[1]:
            raise ValueError(
                f"Grounding DINO returned {memory.shape[1]} visual tokens for a {tuple(pixel_values.shape[-2:])} "
                f"input, but its levels {shapes} add up to {sum(sizes)}."
            )
        start = sum(sizes[: self.feature_level])
        level = memory[:, start : start + sizes[self.feature_level]]
        return tokens_to_grid(level, *shapes[self.feature_level])


class AstreaSegmentationExpert(nn.Module):
    """SAM2's image encoder (Hiera + FPN neck): its coarsest FPN map, the image embedding (64x64 at 1024^2)."""

    def __init__(self, config):
        super().__init__()
        self.model = AutoModel.from_config(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).fpn_hidden_states[-1]  # [N, C, h, w]


# --- Fusion blocks ----------------------------------------------------------------------------------------


class AstreaProjector(nn.Module):
    """An expert's FFN (Linear-act-Linear) from its feature width to the LLM hidden size (Sec. 3.1.1)."""

    def __init__(self, in_features: int, hidden_size: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class AstreaAdapter(nn.Module):
    """F_i of Eq. 10: a bottleneck MLP with a residual; the up-projection starts at zero, so F_i starts as identity
    and instruction tuning begins from the pre-aligned projectors unchanged."""

    def __init__(self, hidden_size: int, adapter_size: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.act = nn.GELU()
        self.up = nn.Linear(adapter_size, hidden_size)
        self.up.zero_init = True  # read by AstreaPreTrainedModel._init_weights

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.up(self.act(self.down(features)))


class AstreaGridPosition(nn.Module):
    """A learned 2-D position for the visual tokens (`config.image_position_embedding`): a row vector plus a column
    vector added to each token of the `grid` x `grid` raster, both zero at the start (so the model starts without
    it). In raster order (`config.image_token_order="row"`) the LLM's 1-D positions do not say which column a token
    is in; pretrained experts carry position in their features, tiny ones trained on colours and shapes lose most of
    it."""

    def __init__(self, grid: int, hidden_size: int):
        super().__init__()
        self.row = nn.Parameter(torch.zeros(grid, hidden_size))
        self.column = nn.Parameter(torch.zeros(grid, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [N, grid**2, D], raster order
        position = (self.row[:, None, :] + self.column[None, :, :]).flatten(0, 1)  # [grid**2, D]
        return tokens + position.to(tokens.dtype)


def column_order(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, grid**2, D] tokens of a row-major raster, re-ordered column by column (`config.image_token_order`); its
    own inverse, so it also turns column-ordered tokens back into the raster."""
    if tokens.shape[1] != grid * grid:
        raise ValueError(f"{tokens.shape[1]} visual tokens per image do not form the {grid} x {grid} grid")
    return tokens.unflatten(1, (grid, grid)).transpose(1, 2).flatten(1, 2)


def top_k_router_probs(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Eq. 9: keep the k largest logits per token, mask the rest to -inf, softmax (in float32)."""
    logits = router_logits.float()
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(top_k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)


def branch_attention(branch_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
    """The attention of rows that hold several conversations about the same image as branches of one shared prefix
    (the image and what precedes the first question): `branch_ids` [B, T] is 0 on the prefix (and on rows of one
    conversation) and k on the tokens of branch k. A token sees the prefix and the earlier tokens of its own
    branch, never another branch, so each branch is computed exactly as its conversation would be alone, while
    the prefix's visual tokens pass through the LLM once. Returns the [B, 1, T, T] boolean mask (True: attend)
    and the position ids each token has in its own conversation (the tokens it sees, minus one)."""
    length = branch_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch_ids.device).tril()
    same = (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])  # [B, query, key]
    mask = causal[None] & same
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    position_ids = mask.sum(dim=-1).clamp(min=1) - 1
    # a query that sees nothing (padding before any kept token) would give NaN: it sees itself
    mask = mask | torch.eye(length, dtype=torch.bool, device=branch_ids.device)[None]
    return mask[:, None], position_ids


def pack_rows_of(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Where each row's real tokens (`attention_mask` [B, T]: 1 on them, either side padded) go when the rows are
    packed for the LLM, first fit decreasing, into as few sequences of at most T tokens as fit them: [B', T'] of
    indices into the flattened [B * T] batch, -1 where a packed sequence is padded. None when no two rows fit in one
    sequence (nothing to save)."""
    keep = attention_mask.bool().cpu()  # the plan is made on the host, in one copy, and sent back once
    lengths = keep.sum(dim=1).tolist()
    capacity = keep.shape[1]
    sequences: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        for index, free in enumerate(room):
            if lengths[row] <= free:
                sequences[index].append(row)
                room[index] -= lengths[row]
                break
        else:
            sequences.append([row])
            room.append(capacity - lengths[row])
    width = capacity - min(room, default=capacity)
    if len(sequences) == len(lengths) or width == 0:  # nothing shares a sequence, or every row is padding
        return None
    flat = torch.arange(keep.numel()).view_as(keep)
    tokens = [torch.cat([flat[row][keep[row]] for row in rows]) for rows in sequences]
    packed = torch.stack([F.pad(t, (0, width - len(t)), value=-1) for t in tokens])
    return packed.to(attention_mask.device)


def packed_inputs(
    packed: torch.Tensor, inputs_embeds: torch.Tensor, row_mask: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LLM's inputs for rows packed as `packed` ([B', T'] from `pack_rows_of`): embeddings [B', T', D], the
    [B', 1, T', T'] boolean mask (a token sees what it saw in its own row, `row_mask` [B, 1, T, T], and nothing of
    the rows beside it) and each token's position in its row ([B', T'])."""
    length = inputs_embeds.shape[1]
    real = packed >= 0
    source = packed.clamp(min=0)
    row, token = source // length, source % length
    mask = row_mask[:, 0][row[:, :, None], token[:, :, None], token[:, None, :]]
    mask = mask & (row[:, :, None] == row[:, None, :]) & real[:, :, None] & real[:, None, :]
    mask = mask | torch.eye(packed.shape[1], dtype=torch.bool, device=mask.device)[None]
    embeds = inputs_embeds.flatten(0, 1)[source] * real.unsqueeze(-1).to(inputs_embeds.dtype)
    positions = position_ids.flatten()[source].masked_fill(~real, 0)
    return embeds, mask[:, None], positions


def unpacked(packed: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The packed LLM's output [B', T', D] back in the rows' layout [B, T, D] (`attention_mask` [B, T]); zeros on
    padding."""
    batch, length = attention_mask.shape
    where = torch.zeros(batch * length, dtype=torch.long, device=packed.device)
    real = packed >= 0
    where[packed[real]] = torch.arange(packed.numel(), device=packed.device).view_as(packed)[real]
    rows = hidden.flatten(0, 1)[where.to(hidden.device)].view(batch, length, -1)
    return rows * attention_mask.unsqueeze(-1).to(rows.dtype)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss for a top-k router: E * sum_e f_e * P_e over the tokens of
    `router_logits` ([..., E]), where f_e is the share of the tokens' k places that expert e fills and P_e its mean
    probability under a softmax over all E logits. 1 when the experts are used evenly, up to E / k when the same k
    take every token. Only P_e carries a gradient, and it reaches every logit, the dropped experts' too: Eq. 9's
    softmax over the top k gives an expert outside them none, so one that starts out of favour stays there."""
    logits = router_logits.float().flatten(0, -2)  # [tokens, E]
    experts = logits.shape[-1]
    chosen = torch.zeros_like(logits).scatter(-1, logits.topk(top_k, dim=-1).indices, 1.0)
    filled = chosen.mean(dim=0) / top_k  # f_e, summing to 1
    probability = logits.softmax(dim=-1).mean(dim=0)  # P_e
    return experts * (filled * probability).sum()


class AstreaResidualAttention(nn.Module):
    """Random residual connection of pre-alignment (Eq. 2-4).

    For stage k the query comes from the cached features of the earlier experts, gated by p_i ~ Bernoulli(p)
    during training (all gates open at evaluation); keys and values come from expert k's own features:
        Q = F_q(gamma * sum_i p_i C_i),  K = F_k(f_k),  V = F_v(f_k),  f'_k = f_k + softmax(Q K^T / sqrt(d)) V.
    Without cached features (stage 1) or with every gate closed, f'_k = f_k.
    """

    def __init__(self, hidden_size: int, gamma: float, prob: float):
        super().__init__()
        self.gamma = gamma
        self.prob = prob
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def sample_gates(self, batch_size: int, num_cached: int, device) -> torch.Tensor:
        if not self.training:
            return torch.ones(batch_size, num_cached, device=device)
        return torch.bernoulli(torch.full((batch_size, num_cached), self.prob, device=device))

    def forward(
        self, features: torch.Tensor, cached_features: torch.Tensor | None, gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features: [B, P, D] (f_k); cached_features: [B, k-1, P, D] (C_1..C_{k-1}) or None; gates: [B, k-1]."""
        if cached_features is None or cached_features.shape[1] == 0:
            return features
        if gates is None:
            gates = self.sample_gates(features.shape[0], cached_features.shape[1], features.device)
        gates = gates.to(features.dtype)
        memory = self.gamma * (gates[:, :, None, None] * cached_features).sum(dim=1)  # [B, P, D]
        query, key, value = self.query(memory), self.key(features), self.value(features)
        attended = F.scaled_dot_product_attention(query, key, value)  # softmax(QK^T/sqrt(d)) V
        any_open = (gates.sum(dim=1) > 0).to(features.dtype)[:, None, None]
        return features + any_open * attended


def text_hash(token_ids: list[int]) -> int:
    """A text's id for MoCo's negatives: equal token sequences give equal ids, in every process (a 61-bit
    polynomial hash, non-negative)."""
    value = 0
    for token in token_ids:
        value = (value * 1_000_003 + int(token) + 1) % (2**61 - 1)
    return value


class RunningStandardization(nn.Module):
    """Standardizes each feature, for MoCo's pooled inputs: in training by the batch's own mean and variance (gathered
    over every process under torch.distributed), otherwise by running ones.

    Mean-pooled visual tokens and text states are mostly what every sample shares (on the demo's models the mean over
    images has 95-99.7% of a pooled vector's mean norm), and that shared part moves while instruction tuning trains
    the fusion and the LLM under MoCo's heads. Standardized, the heads see what tells the batch's samples apart, on a
    scale that stays put. `update` (training) returns the batch's moments and folds them into the
    running ones, which evaluation and a batch too small for a variance (fewer than two rows over all processes) use.
    Every process must call `update` under torch.distributed, with any number of rows (none included). A fresh module
    (no update yet) is the identity, and its first update takes the batch's moments whole. (`nn.BatchNorm1d` refuses a
    training batch of one row and gathers nothing across processes; `SyncBatchNorm` runs on GPUs only.)"""

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def reset(self):
        self.mean.zero_()
        self.var.fill_(1.0)
        self.updates.zero_()

    def _keep_float32(self):
        """The moments stay float32 whatever a cast of the whole model made of them (`.to(torch.bfloat16)`, ZeRO-3's
        initialisation): a bf16 mean does not move at a rate of 0.05."""
        if self.mean.dtype != torch.float32:
            self.mean, self.var = self.mean.float(), self.var.float()
        if self.updates.dtype != torch.long:  # (loading in bf16 makes every tensor of the module float32)
            self.updates = self.updates.long()

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """features: [n, dim], n >= 0 -> the batch's (mean, variance) over every process (float32), or None (fewer
        than two rows in all). Counted per call: under gradient accumulation, per micro-batch."""
        self._keep_float32()
        # double precision: pooled features are mostly their shared part, and E[x^2] - E[x]^2 cancels most digits
        features = features.detach().to(self.mean.device, torch.float64)
        stats = torch.cat([features.new_tensor([features.shape[0]]), features.sum(0), features.square().sum(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        count, total, squares = stats[0], stats[1 : 1 + self.mean.numel()], stats[1 + self.mean.numel() :]
        if count < 2:
            return None
        mean = total / count
        var = (squares / count - mean.square()).clamp(min=0) * count / (count - 1)
        mean, var = mean.float(), var.float()
        rate = 1.0 if int(self.updates) == 0 else self.momentum
        self.mean.lerp_(mean, rate)
        self.var.lerp_(var, rate)
        self.updates.add_(1)
        return mean, var

    def forward(
        self, features: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """features: [n, dim], standardized by `moments` (a batch's, from `update`) or else the running ones, in
        float32 and returned in the features' dtype. The moments are constants to the gradient."""
        self._keep_float32()
        mean, var = moments if moments is not None else (self.mean, self.var)  # float32 either way
        return ((features.float() - mean) * var.clamp(min=self.eps).rsqrt()).to(features.dtype)


class AstreaMoCo(nn.Module):
    """Momentum contrast between images and their text (Sec. 3.2.1, as docs/design.md reads Eq. 5-8).

    Queries: the online image head on mean-pooled fused visual tokens. Texts: the sample's instruction and answer as
    the LLM reads them without the image (its last hidden states, pooled over the answer, under no_grad), through a
    text head. Keys: the momentum (EMA) copy of the text head, under no_grad. The row term (Eq. 6, r_i) ranks a
    query's key among the batch's other keys and a queue of earlier keys (gathered across processes under
    torch.distributed); the column term (c_i) ranks, for each text through the online text head, its image among the
    batch's images, and is what trains the text head. A candidate whose text is the positive's own (`text_ids`, a
    hash of the text's tokens) is left out of both: another image asked the same question with the same answer is
    not a negative. With `config.moco_standardize`, both heads read their inputs standardized
    (`RunningStandardization`): in training by the batch's moments, otherwise by running ones.

    The EMA update (Eq. 8) belongs once to each optimizer step, before that step's keys are computed (as in MoCo).
    By default `forward` makes it in training mode, which is once per step in a plain training loop; a trainer that
    accumulates gradients over several forwards, or shards the model, sets `update_in_forward = False` and calls
    `momentum_update` at the start of each optimizer step, outside any forward (`AstreaSFTTrainer` does): under
    FSDP2 the weights a forward sees are gathered copies, and a change made to them there is lost.
    """

    update_in_forward: bool = True

    def __init__(self, config: AstreaConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.momentum = config.moco_momentum
        self.temperature = config.moco_temperature
        self.lam = config.moco_lambda

        def head() -> nn.Module:
            return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, config.moco_embed_dim))

        self.head = head()  # images (queries)
        self.text_head = head()  # texts, online (the column term)
        self.momentum_head = copy.deepcopy(self.text_head).requires_grad_(False)  # texts, keys (Eq. 8)
        self.standardize = config.moco_standardize
        # without moco_standardize no batch moves the moments: the identity, or those of a training with it on
        self.image_norm = RunningStandardization(hidden)
        self.text_norm = RunningStandardization(hidden)
        self.register_buffer("queue", torch.zeros(config.moco_queue_size, config.moco_embed_dim))
        self.register_buffer("queue_text_ids", torch.zeros(config.moco_queue_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    def distinct_text_ids(self, count: int, device=None) -> torch.Tensor:
        """Ids for texts not known to equal any other: negative (unlike `text_hash`'s), new at every call: [count]."""
        first = getattr(self, "_anonymous", 0)
        self._anonymous = first + count
        return -1 - first - torch.arange(count, device=device)

    @torch.no_grad()
    def reset_momentum_head(self):
        for momentum, online in zip(self.momentum_head.parameters(), self.text_head.parameters(), strict=True):
            momentum.copy_(online)

    @torch.no_grad()
    def momentum_update(self):
        """Eq. 8: theta_M = m * theta_M + (1 - m) * theta_E (on whole weights under DeepSpeed ZeRO-3; on each
        process's shards under FSDP2, which split both heads alike)."""
        pairs = list(zip(self.momentum_head.parameters(), self.text_head.parameters(), strict=True))
        with _gathered([p for pair in pairs for p in pair], modify=True):
            for momentum, online in pairs:
                momentum.mul_(self.momentum).add_(online.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, text_ids: torch.Tensor | None = None):
        """Write the batch's keys and their text ids (from every process) over the oldest entries of the ring buffer.

        Under torch.distributed every process must call this at the same point of each training step, with however
        many keys it has (none included): the processes' key counts are exchanged first, so they may differ."""
        if text_ids is None:
            text_ids = self.distinct_text_ids(keys.shape[0], keys.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            count = torch.tensor([keys.shape[0]], device=keys.device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            torch.distributed.all_gather(counts, count)
            counts = [int(c) for c in counts]

            def gather(rows: torch.Tensor) -> torch.Tensor:
                padded = rows.new_zeros(max(counts), *rows.shape[1:])
                padded[: rows.shape[0]] = rows
                parts = [torch.empty_like(padded) for _ in range(world)]
                torch.distributed.all_gather(parts, padded)
                return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

            keys, text_ids = gather(keys), gather(text_ids.to(keys.device))
        if keys.shape[0] == 0:
            return
        size = self.queue.shape[0]
        keys, text_ids = keys[-size:], text_ids[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_text_ids[index] = text_ids.to(self.queue_text_ids.device)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
        self.queue_len.copy_(torch.clamp(self.queue_len + keys.shape[0], max=size))

    def embed_images(self, pooled_visual: torch.Tensor, moments=None) -> torch.Tensor:
        return F.normalize(self.head(self.image_norm(pooled_visual, moments)), dim=-1)

    @torch.no_grad()
    def embed_texts(self, pooled_text: torch.Tensor, moments=None) -> torch.Tensor:
        return F.normalize(self.momentum_head(self.text_norm(pooled_text, moments)), dim=-1)

    def batch_moments(self, pooled_visual: torch.Tensor, pooled_text: torch.Tensor) -> tuple:
        """A training batch's moments of its image side and its text side (None each without `moco_standardize`, or
        with too few pairs), folded into the running ones; every process calls this under torch.distributed, with
        its pairs or none."""
        if not self.standardize:
            return None, None
        return self.image_norm.update(pooled_visual), self.text_norm.update(pooled_text)

    def forward(
        self, pooled_visual: torch.Tensor, pooled_text: torch.Tensor, text_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled_visual, pooled_text: [B, D] for B image-text pairs; text_ids: [B] (equal for equal texts) or None
        (all texts distinct) -> (L_moco (Eq. 7), its chance level: the loss of uniform similarities over the
        candidates each term counts)."""
        if self.training and self.update_in_forward:
            self.momentum_update()
        image_moments, text_moments = self.batch_moments(pooled_visual, pooled_text) if self.training else (None, None)
        batch = pooled_visual.shape[0]
        if text_ids is None:
            text_ids = self.distinct_text_ids(batch, pooled_visual.device)
        queries = self.embed_images(pooled_visual, image_moments)  # [B, d]
        keys = self.embed_texts(pooled_text, text_moments).to(queries.dtype)  # [B, d], momentum text head
        texts = self.text_head(self.text_norm(pooled_text, text_moments))  # online text head
        texts = F.normalize(texts, dim=-1).to(queries.dtype)
        queued = int(self.queue_len)
        negatives = self.queue[:queued].to(queries.dtype).clone()  # [n, d]
        # a candidate with the positive's own text is not a negative: left out of both softmaxes
        candidate_ids = torch.cat([text_ids, self.queue_text_ids[:queued]])
        same_text = text_ids[:, None] == candidate_ids[None, :]
        same_text[:, :batch].fill_diagonal_(False)
        rows = queries @ torch.cat([keys, negatives]).T / self.temperature  # S, Eq. 5: [B, B + n]
        log_r = rows.masked_fill(same_text, float("-inf")).log_softmax(dim=1).diagonal()  # r_i (Eq. 6)
        columns = queries @ texts.T / self.temperature  # [B images, B texts]
        log_c = columns.masked_fill(same_text[:, :batch], float("-inf")).log_softmax(dim=0).diagonal()  # c_i
        loss = -(self.lam * log_r + (1.0 - self.lam) * log_c).mean()  # Eq. 7
        counted = (~same_text).sum(dim=1).float()  # candidates per row
        counted_in_column = (~same_text[:, :batch]).sum(dim=0).float()
        chance = (self.lam * counted.log() + (1.0 - self.lam) * counted_in_column.log()).mean()
        if self.training:
            self.enqueue(keys, text_ids)
        return loss, chance.detach()

    def skip(self) -> torch.Tensor:
        """A training step without image-text pairs on this process: it still takes part in the other processes'
        key exchange (which would otherwise wait for it forever) and returns a zero that touches the head's
        parameters, so that DDP's gradient reduction finds every parameter used."""
        if self.training:
            hidden = self.image_norm.mean.shape[0]
            self.batch_moments(self.queue.new_zeros(0, hidden), self.queue.new_zeros(0, hidden))
            self.enqueue(self.queue.new_zeros(0, self.queue.shape[-1]), self.queue_text_ids.new_zeros(0))
        heads = [*self.head.parameters(), *self.text_head.parameters()]
        return sum(p.sum() * 0.0 for p in heads if p.requires_grad) + self.queue.new_zeros(())


# --- Models -------------------------------------------------------------------------------------------------


class AstreaPreTrainedModel(PreTrainedModel):
    config: AstreaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    # The units `device_map="auto"` keeps on one device and FSDP wraps (accelerate's auto-wrap reads this when its
    # config names no classes): each whole expert, as its forward combines its blocks' outputs (Grounding DINO's
    # levels, SAM2's FPN) and reads weights outside their modules; inside it, its blocks (FSDP gathers one at a
    # time); and the LLM's decoder layer. transformers' `post_init` adds the lists of direct children that are
    # models (the LLM's); `post_init` below adds those of the models nested in the experts, and the names here
    # cover the blocks of expert models that declare none.
    _no_split_modules = [
        "AstreaCaptionExpert",
        "AstreaClassificationExpert",
        "AstreaDetectionExpert",
        "AstreaSegmentationExpert",
        "GroundingDinoEncoderLayer",
        "GroundingDinoDecoderLayer",
        "Sam2MultiScaleBlock",
    ]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def enable_input_require_grads(self):
        """Only the LLM's token embeddings need outputs that require grad (gradient checkpointing, PEFT); the
        default would also hook every expert's patch embedding, some of which return tuples."""

        def make_output_require_grad(module, args, output):
            output.requires_grad_(True)

        hook = self.get_input_embeddings().register_forward_hook(make_output_require_grad)
        self._require_grads_hooks = [hook]
        self._require_grads_hook = hook

    def post_init(self):
        super().post_init()
        # the experts' models sit under a ModuleDict (and Grounding DINO's Swin inside its conv encoder), out of
        # transformers' reach; names this model does not hold (SigLIP's text embeddings in its vision tower, another
        # expert config's blocks) are dropped: accelerate's FSDP auto-wrap stops at a class it cannot find
        models = [module for module in self.modules() if isinstance(module, PreTrainedModel)]
        names = self._no_split_modules.union(*(model._no_split_modules or () for model in models))
        self._no_split_modules = names & {type(module).__name__ for module in self.modules()}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, AstreaGridPosition):
            module.row.zero_()
            module.column.zero_()
        elif isinstance(module, AstreaMoCo):
            module.reset_momentum_head()
            module.queue.zero_()
            module.queue_text_ids.zero_()
            module.queue_ptr.zero_()
            module.queue_len.zero_()
        elif isinstance(module, RunningStandardization):  # (also what a checkpoint from before it gets: the identity)
            module.reset()


class AstreaModel(AstreaPreTrainedModel):
    """Experts, projectors, router, adapters and the LLM (no LM head)."""

    # a checkpoint of the whole model also holds the MoCo head, a training-only part the base model does without
    _keys_to_ignore_on_load_unexpected = [r"^moco\."]

    def __init__(self, config: AstreaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.experts = nn.ModuleDict(
            {
                "caption": AstreaCaptionExpert(config.caption_config),
                "classification": AstreaClassificationExpert(config.classification_config),
                "detection": AstreaDetectionExpert(
                    config.detection_config, config.detection_feature_level, config.detection_prompt_ids
                ),
                "segmentation": AstreaSegmentationExpert(config.segmentation_config),
            }
        )
        self.projectors = nn.ModuleDict(
            {
                name: AstreaProjector(width, hidden, config.projector_hidden_act)
                for name, width in config.expert_hidden_sizes.items()
            }
        )
        # per visual token on the concatenated projected features (Eq. 9), or per image on [global; prompt]
        router_inputs = len(EXPERT_NAMES) * hidden if config.router_mode == "token" else 2 * hidden
        self.router = nn.Linear(router_inputs, len(EXPERT_NAMES))
        # the instruction's bias on every visual token's routing logits (config.router_prompt), zero at the start
        self.prompt_router = None
        if config.router_prompt and config.router_mode == "token":
            self.prompt_router = nn.Linear(hidden, len(EXPERT_NAMES))
            self.prompt_router.zero_init = True
        self.adapters = nn.ModuleDict(
            {name: AstreaAdapter(hidden, config.adapter_hidden_size) for name in EXPERT_NAMES}
        )
        # each visual token's row and column, added to the tokens the LLM reads (config.image_position_embedding)
        self.image_position = None
        if config.image_position_embedding:
            self.image_position = AstreaGridPosition(config.image_grid_size, hidden)
        self.residual_attention = nn.ModuleDict(
            {
                name: AstreaResidualAttention(hidden, config.residual_gamma, config.residual_prob)
                for name in config.residual_experts
            }
        )
        self.language_model = AutoModel.from_config(config.text_config)
        # Set by the pre-alignment recipe (astrea.training), None otherwise: see `get_alignment_features`.
        self.alignment: AstreaAlignment | None = None
        self.post_init()
        self.train(self.training)  # applies config.freeze_experts

    @property
    def routes_on_prompt(self) -> bool:
        """Whether the router reads the prompt (`router_mode="sample"` or `router_prompt`)."""
        return self.config.router_mode == "sample" or self.prompt_router is not None

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def train(self, mode: bool = True):
        """With `config.freeze_experts`, the expert backbones stay frozen and in eval mode whatever the mode: no
        dropout or drop-path in a fixed feature extractor, so a cached feature equals a recomputed one. (This also
        re-freezes them after `from_pretrained`, whose weight loading makes fresh trainable parameters and which
        ends with `eval()`.) Set `freeze_experts=False` in the config to fine-tune the experts."""
        super().train(mode)
        if self.config.freeze_experts:
            self.experts.requires_grad_(False).eval()
        return self

    def get_expert_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        classification_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_values: torch.FloatTensor | None = None,
        segmentation_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_mask: torch.LongTensor | None = None,
        detection_input_ids: torch.LongTensor | None = None,
        detection_attention_mask: torch.LongTensor | None = None,
        experts: tuple[str, ...] = EXPERT_NAMES,
    ) -> dict[str, torch.Tensor]:
        """Run the named experts (all four by default) and resample each grid to the common one.

        Returns `{name: [num_images, image_grid_size**2, expert_width]}`: the features before projection, which
        are what a feature cache stores for frozen experts.
        """
        inputs = {
            "caption": pixel_values,
            "classification": classification_pixel_values,
            "detection": detection_pixel_values,
            "segmentation": segmentation_pixel_values,
        }
        missing = [PIXEL_INPUT_NAMES[name] for name in experts if inputs[name] is None]
        if missing:
            raise ValueError(
                f"Astrea needs pixel inputs for every expert; missing: {', '.join(missing)}. Build inputs with "
                "AstreaProcessor / AstreaImageProcessor, which returns one tensor per expert."
            )
        counts = {PIXEL_INPUT_NAMES[name]: inputs[name].shape[0] for name in experts}
        if len(set(counts.values())) > 1:
            raise ValueError(f"Every expert must get the same images, but the pixel inputs hold {counts} images.")
        grid = self.config.image_grid_size
        features = {}
        for name in experts:
            expert = self.experts[name]
            kwargs = {}
            if name == "detection":
                kwargs = {
                    "pixel_mask": detection_pixel_mask,
                    "input_ids": detection_input_ids,
                    "attention_mask": detection_attention_mask,
                }
            dtype = next(expert.parameters()).dtype
            # a frozen expert runs without autograd (the scan over its parameters only matters when grad is on)
            trainable = torch.is_grad_enabled() and any(p.requires_grad for p in expert.parameters())
            with torch.set_grad_enabled(trainable):
                feature_map = expert(inputs[name].to(dtype), **kwargs)  # [N, C, h, w]
            if feature_map.shape[-2:] != (grid, grid):
                shrinking = feature_map.shape[-2] > grid or feature_map.shape[-1] > grid
                feature_map = F.interpolate(
                    feature_map, size=(grid, grid), mode="bilinear", align_corners=False, antialias=shrinking
                )
            features[name] = feature_map.flatten(2).transpose(1, 2)  # [N, P, C]
        return features

    def fuse_expert_features(
        self, expert_features: dict[str, torch.Tensor], prompt: torch.Tensor | None = None, unprompted: bool = False
    ) -> AstreaImageFeatures:
        """Project each expert's features, route (Eq. 9) and mix the adapted features (Eq. 10).

        `prompt` ([N, D], with `config.router_prompt`): each image's prompt summary (`image_prompt_embeds`), whose
        `prompt_router` bias is added to the routing logits of every one of that image's tokens; None routes on the
        image alone. `unprompted`: also mix the tokens as routed without the prompt (`unprompted_pooler_output`),
        from the same projections and adapters, which run once."""
        projected = [self.projectors[name](expert_features[name]) for name in EXPERT_NAMES]  # E x [N, P, D]
        router_logits = self.router(torch.cat(projected, dim=-1))  # [N, P, E]
        adapted = [self.adapters[name](f) for name, f in zip(EXPERT_NAMES, projected, strict=True)]
        adapted = torch.stack(adapted, dim=-2)  # [N, P, E, D]
        without_prompt = None
        if self.prompt_router is not None and prompt is not None:
            if prompt.shape[0] != router_logits.shape[0]:
                raise ValueError(
                    f"The text holds {prompt.shape[0]} images' worth of image tokens but {router_logits.shape[0]} "
                    f"images were given ({self.config.num_image_tokens} image tokens per image)."
                )
            if unprompted:
                without_prompt = self._mix(router_logits, adapted)[0]
            router_logits = router_logits + self.prompt_router(prompt.to(router_logits.dtype))[:, None, :]
        fused, router_probs = self._mix(router_logits, adapted)
        if unprompted and without_prompt is None:  # no prompt was read: the tokens are already the unprompted ones
            without_prompt = fused
        return AstreaImageFeatures(
            pooler_output=fused,
            router_probs=router_probs,
            unprompted_pooler_output=without_prompt,
            router_logits=router_logits,
        )

    def _mix(self, router_logits: torch.Tensor, adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9-10: (fused tokens [N, P, D], router probabilities [N, P, E]) from the logits and the adapted
        features [N, P, E, D]."""
        router_probs = top_k_router_probs(router_logits, self.config.router_top_k)  # [N, P, E]
        fused = (router_probs.unsqueeze(-1).to(adapted.dtype) * adapted).sum(dim=-2)  # [N, P, D]
        return fused, router_probs

    def image_prompt_embeds(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per image, the mean input embedding of its sample's prompt: text tokens that are not image placeholders,
        not padding and (with `prompt_mask`) not the answer. [num_images, D], images in placeholder order."""
        is_image = input_ids == self.config.image_token_id
        keep = ~is_image
        if attention_mask is not None:
            keep &= attention_mask.bool()
        if prompt_mask is not None:
            keep &= prompt_mask.bool()
        embeds = self.get_input_embeddings()(input_ids) * keep.unsqueeze(-1)
        per_sample = embeds.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)
        images_per_sample = is_image.sum(dim=1) // self.config.num_image_tokens
        return per_sample.repeat_interleave(images_per_sample, dim=0)

    def route_samples(
        self, pixels: dict, expert_features: dict[str, torch.Tensor] | None, prompt: torch.Tensor | None
    ) -> AstreaImageFeatures:
        """Sample-level routing: one top-k choice per image from its global feature (the mean projected caption
        feature) and its prompt; an expert that no image in the batch chose does not run, and one that some chose
        runs on those images only. The visual tokens are the chosen experts' adapted features mixed with the
        image's router probabilities (Eq. 10 with one P per image)."""
        if expert_features is None:
            counts = {k: v.shape[0] for k, v in pixels.items() if k.endswith("pixel_values") and v is not None}
            if len(set(counts.values())) > 1:
                raise ValueError(f"Every expert must get the same images, but the pixel inputs hold {counts} images.")

        def features(name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
            if expert_features is not None:
                if name not in expert_features:
                    raise ValueError(f"expert_features lacks the features of {name}.")
                return expert_features[name] if rows is None else expert_features[name][rows]
            images = next((v.shape[0] for k, v in pixels.items() if k.endswith("pixel_values") and v is not None), 0)
            subset = {  # per-image inputs follow the rows; shared ones (a [1, L] detection prompt) stay whole
                k: v[rows] if v is not None and rows is not None and v.shape[0] == images else v
                for k, v in pixels.items()
            }
            return self.get_expert_features(**subset, experts=(name,))[name]

        global_features = features("caption")  # the global expert always runs: [N, P, C]
        caption = self.projectors["caption"](global_features)  # [N, P, D]
        if prompt is None:
            prompt = caption.new_zeros(caption.shape[0], caption.shape[-1])
        if prompt.shape[0] != caption.shape[0]:
            raise ValueError(
                f"The text holds {prompt.shape[0]} images' worth of image tokens but {caption.shape[0]} images were "
                f"given ({self.config.num_image_tokens} image tokens per image)."
            )
        logits = self.router(torch.cat([caption.mean(dim=1), prompt.to(caption.dtype)], dim=-1))  # [N, E]
        probs = top_k_router_probs(logits, self.config.router_top_k)
        fused = caption.new_zeros(caption.shape)
        for index, name in enumerate(EXPERT_NAMES):
            rows = probs[:, index].nonzero().squeeze(-1)
            if rows.numel() == 0:  # not in any image's top-k: the expert is skipped
                if self.training and torch.is_grad_enabled():  # a zero touch keeps DDP's gradient reduction whole
                    unused = [p for m in (self.projectors[name], self.adapters[name]) for p in m.parameters()]
                    fused = fused + sum(p.sum() * 0.0 for p in unused if p.requires_grad)
                continue
            projected = caption[rows] if name == "caption" else self.projectors[name](features(name, rows))
            weight = probs[rows, index].to(projected.dtype)[:, None, None]
            fused = fused.index_add(0, rows, weight * self.adapters[name](projected))
        router_probs = probs[:, None, :].expand(-1, caption.shape[1], -1)
        return AstreaImageFeatures(
            last_hidden_state=global_features,
            pooler_output=fused,
            router_probs=router_probs,
            router_logits=logits[:, None, :],  # one routing per image: one row each for load balancing
        )

    def compile_fusion(self, **compile_kwargs) -> None:
        """Compiles the fusion block (projectors, router, adapters and the mixture of Eq. 10) with `torch.compile`
        (keyword arguments go to it); the experts and the LLM are left as they are. Per-token routing only."""
        if self.config.router_mode != "token":
            raise ValueError("compile_fusion() compiles the per-token fusion; router_mode='sample' does not use it.")
        self.fuse_expert_features = torch.compile(self.fuse_expert_features, **compile_kwargs)

    def get_alignment_features(self, expert_features: dict[str, torch.Tensor]) -> AstreaImageFeatures:
        """Visual tokens during progressive pre-alignment (Sec. 3.1), per `self.alignment`.

        Progressive stage k: expert k's projected features f_k, plus the random residual attention over the
        projected features of the experts aligned before it (Eq. 2-4; their projectors are frozen by then, so their
        outputs are the cache C_i). Joint stage ("Cap -> All"): the mean of the listed experts' projected features.
        """
        alignment = self.alignment
        if alignment.joint:
            projected = [self.projectors[name](expert_features[name]) for name in alignment.experts]
            return AstreaImageFeatures(pooler_output=torch.stack(projected).mean(dim=0))
        *earlier, current = alignment.experts
        features = self.projectors[current](expert_features[current])  # f_k: [N, P, D]
        if alignment.residual and earlier:
            with torch.no_grad():
                cached = torch.stack([self.projectors[name](expert_features[name]) for name in earlier], dim=1)
            features = self.residual_attention[current](features, cached)  # f'_k
        return AstreaImageFeatures(pooler_output=features)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        classification_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_values: torch.FloatTensor | None = None,
        segmentation_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_mask: torch.LongTensor | None = None,
        detection_input_ids: torch.LongTensor | None = None,
        detection_attention_mask: torch.LongTensor | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        prompt_input_ids: torch.LongTensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        unprompted: bool = False,
        **kwargs,
    ) -> AstreaImageFeatures:
        """Fused visual tokens for a batch of images, from pixels or from precomputed `expert_features`.

        With `config.router_mode == "sample"` or `config.router_prompt`, the router also reads the prompt: pass the
        token sequence the images sit in as `prompt_input_ids` (with its `prompt_attention_mask`, and `prompt_mask`
        marking the prompt when the sequence also holds the answer); without it the router sees the image alone.
        The experts' features do not depend on the prompt: to ask a second question about the same images, keep
        `get_expert_features`' output and pass it back as `expert_features` with the new prompt (the experts do
        not run again; the router does). `unprompted=True` (per-token routing) also returns the tokens as routed
        without the prompt, in `unprompted_pooler_output`, from the same projections.

        Returns an `AstreaImageFeatures` (a `BaseModelOutputWithPooling`): the fused tokens in `pooler_output`, the
        experts' own features in `last_hidden_state` (and per expert in `hidden_states` with
        `output_hidden_states=True`), or a tuple of them with `return_dict=False`."""
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if self.config.router_mode == "sample" and self.alignment is None:
            prompt = None
            if prompt_input_ids is not None:
                prompt = self.image_prompt_embeds(prompt_input_ids, prompt_attention_mask, prompt_mask)
            pixels = {
                "pixel_values": pixel_values,
                "classification_pixel_values": classification_pixel_values,
                "detection_pixel_values": detection_pixel_values,
                "segmentation_pixel_values": segmentation_pixel_values,
                "detection_pixel_mask": detection_pixel_mask,
                "detection_input_ids": detection_input_ids,
                "detection_attention_mask": detection_attention_mask,
            }
            output = self.route_samples(pixels, expert_features, prompt)
            per_expert = (output.last_hidden_state,)
        else:
            needed = self.alignment.experts if self.alignment is not None else EXPERT_NAMES
            if expert_features is None:
                expert_features = self.get_expert_features(
                    pixel_values=pixel_values,
                    classification_pixel_values=classification_pixel_values,
                    detection_pixel_values=detection_pixel_values,
                    segmentation_pixel_values=segmentation_pixel_values,
                    detection_pixel_mask=detection_pixel_mask,
                    detection_input_ids=detection_input_ids,
                    detection_attention_mask=detection_attention_mask,
                    experts=needed,
                )
            missing = [name for name in needed if name not in expert_features]
            if missing:
                raise ValueError(f"expert_features lacks the features of {', '.join(missing)}.")
            if self.alignment is not None:
                output = self.get_alignment_features(expert_features)
            else:
                prompt = None
                if self.prompt_router is not None and prompt_input_ids is not None:
                    prompt = self.image_prompt_embeds(prompt_input_ids, prompt_attention_mask, prompt_mask)
                    dropout = self.config.router_prompt_dropout
                    if self.training and dropout > 0:  # trains the prompt-free routing too
                        keep = torch.rand(prompt.shape[0], 1, device=prompt.device) >= dropout
                        prompt = prompt * keep.to(prompt.dtype)
                output = self.fuse_expert_features(expert_features, prompt, unprompted=unprompted)
            per_expert = tuple(expert_features[name] for name in EXPERT_NAMES if name in needed)
        tokens, without_prompt = output.pooler_output, output.unprompted_pooler_output
        if self.image_position is not None:
            tokens = self.image_position(tokens)
            without_prompt = None if without_prompt is None else self.image_position(without_prompt)
        if self.config.image_token_order == "column":  # the LLM reads the grid column by column
            grid = self.config.image_grid_size
            tokens = column_order(tokens, grid)
            without_prompt = None if without_prompt is None else column_order(without_prompt, grid)
        # a new output, so that its tuple form (return_dict=False) keeps the fields in their declared order
        return AstreaImageFeatures(
            last_hidden_state=torch.cat([t.to(per_expert[0].device) for t in per_expert], dim=-1),  # device_map
            pooler_output=tokens,
            hidden_states=per_expert if output_hidden_states else None,
            router_probs=output.router_probs,
            unprompted_pooler_output=without_prompt,
            router_logits=output.router_logits,
        )

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        image_features: torch.Tensor,
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> torch.Tensor:
        """[B, T] mask of image placeholders, checked against the number of visual tokens to place. Without
        `input_ids` the placeholders are the positions whose embedding is the image token's (as in transformers'
        LLaVA models)."""
        if input_ids is None:
            image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            mask = (inputs_embeds == self.get_input_embeddings()(image_token).to(inputs_embeds.dtype)).all(dim=-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            per_image = self.config.num_image_tokens
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {n_tokens} image tokens "
                f"({n_tokens / per_image:g} images' worth at {per_image} tokens per image) but "
                f"{image_features.shape[0]} images were given ({n_features} visual tokens)."
            )
        return mask

    def _four_dimensional_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The boolean [B, 1, T, T] mask of branches or packed rows as the LLM's attention takes it: as is for SDPA,
        additive (0 or the dtype's minimum) for eager attention, which adds the mask to the scores."""
        implementation = self.language_model.config._attn_implementation
        if implementation == "sdpa":
            return mask
        if implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        raise ValueError(
            f"branch_ids and pack_rows give the LLM a 4D attention mask, which its attention ({implementation!r}) "
            "does not take: load the model with attn_implementation='sdpa' or 'eager', or train without them."
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        classification_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_values: torch.FloatTensor | None = None,
        segmentation_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_mask: torch.LongTensor | None = None,
        detection_input_ids: torch.LongTensor | None = None,
        detection_attention_mask: torch.LongTensor | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, AstreaImageFeatures] | None = None,
        router_prompt_mask: torch.Tensor | None = None,
        branch_ids: torch.LongTensor | None = None,
        pack_rows: bool = False,
        **kwargs,
    ) -> AstreaModelOutputWithPast:
        """`router_prompt_mask` ([B, T], optional): which tokens are prompt (not answer), for a router that reads the
        prompt (`config.router_mode == "sample"` or `config.router_prompt`); by default every text token is.
        `branch_ids` ([B, T], optional; training and scoring, not generation): rows that pack several conversations
        about one image as branches after their shared prefix (`branch_attention`), as `AstreaCollator` writes them
        with `branches`.
        `pack_rows` (training and scoring, not generation): the LLM reads the batch's rows packed into as few
        sequences as hold them (`pack_rows_of`), each row seeing only itself, at its own positions; what comes back is
        in the rows' layout, the same up to rounding, with no compute spent on padding. Not with
        `output_hidden_states` or `output_attentions`, whose per-layer outputs would stay packed."""
        # 1. check inputs
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if branch_ids is not None and (past_key_values is not None or use_cache):
            raise ValueError("branch_ids packs conversations for training and scoring; generate without them.")
        if pack_rows and (past_key_values is not None or use_cache):
            raise ValueError("pack_rows packs the batch's rows for training and scoring; generate without it.")
        if pack_rows and (kwargs.get("output_hidden_states") or kwargs.get("output_attentions")):
            raise ValueError("pack_rows returns the last hidden states only; ask for the layers' outputs without it.")
        has_pixels = any(
            x is not None
            for x in (pixel_values, classification_pixel_values, detection_pixel_values, segmentation_pixel_values)
        )
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if (has_pixels or expert_features is not None) and mm_encoder_outputs.get("image") is not None:
            raise ValueError("Pass images either as pixel inputs / expert_features or as mm_encoder_outputs.")

        # 2. embed
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]

        # 3. image features (once per image; generate() encodes at prefill and passes mm_encoder_outputs)
        if mm_encoder_outputs.get("image") is None and (has_pixels or expert_features is not None):
            mm_encoder_outputs["image"] = self.get_image_features(
                return_dict=True,
                pixel_values=pixel_values,
                classification_pixel_values=classification_pixel_values,
                detection_pixel_values=detection_pixel_values,
                segmentation_pixel_values=segmentation_pixel_values,
                detection_pixel_mask=detection_pixel_mask,
                detection_input_ids=detection_input_ids,
                detection_attention_mask=detection_attention_mask,
                expert_features=expert_features,
                prompt_input_ids=input_ids,
                prompt_attention_mask=attention_mask,
                prompt_mask=router_prompt_mask,
            )

        # 4. merge: fused visual tokens replace the image placeholders
        image_features = router_probs = router_logits = None
        if (image_output := mm_encoder_outputs.get("image")) is not None:
            image_features = image_output.pooler_output
            if isinstance(image_features, (list, tuple)):
                image_features = torch.stack(list(image_features))
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)  # [N, P, D]
            router_probs = getattr(image_output, "router_probs", None)
            router_logits = getattr(image_output, "router_logits", None)
            mask = self.get_placeholder_mask(input_ids, image_features, inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features)
        elif input_ids is not None and past_key_values is None and (input_ids == self.config.image_token_id).any():
            n_tokens = int((input_ids == self.config.image_token_id).sum())
            raise ValueError(f"The text holds {n_tokens} image tokens but no images were given.")

        # 5. language model
        llm_attention_mask = attention_mask
        packed = None
        if pack_rows and attention_mask is not None and attention_mask.dim() == 2:
            if position_ids is None or position_ids.dim() == 2:
                packed = pack_rows_of(attention_mask)
        if branch_ids is not None or packed is not None:
            if branch_ids is None:
                branch_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            llm_attention_mask, branch_positions = branch_attention(branch_ids, attention_mask)
            position_ids = branch_positions if position_ids is None else position_ids
            if packed is not None:
                inputs_embeds, llm_attention_mask, position_ids = packed_inputs(
                    packed, inputs_embeds, llm_attention_mask, position_ids.expand(attention_mask.shape)
                )
                use_cache = False
            llm_attention_mask = self._four_dimensional_mask(llm_attention_mask, inputs_embeds.dtype)
        outputs = self.language_model(
            return_dict=True,
            attention_mask=llm_attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        last_hidden_state = outputs.last_hidden_state
        if packed is not None:  # back to the rows' layout; padding gets zeros
            last_hidden_state = unpacked(packed, last_hidden_state, attention_mask)
        return AstreaModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            router_probs=router_probs,
            router_logits=router_logits,
        )


class AstreaForConditionalGeneration(AstreaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the LLM's own plan comes from its config (base_model_tp_plan); the LM head is split on the vocabulary like the
    # input embedding (`embedding_rowwise`), so a tied head and embedding shard the same rows. The experts, router,
    # adapters and MoCo are replicated.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    # MoCo's standardization moments stay float32 when the model is loaded in bf16 or fp16 (RunningStandardization)
    _keep_in_fp32_modules_strict = ["image_norm", "text_norm"]

    def __init__(self, config: AstreaConfig):
        super().__init__(config)
        self.model = AstreaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.moco = AstreaMoCo(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; with remote code on, `auto_map` also names the base model
        (`AutoModel`), which transformers writes only for the class being saved and which vLLM's Transformers
        backend loads (docs/serving.md)."""
        if self._auto_class is not None:
            base = f"{AstreaModel.__module__.split('.')[-1]}.{AstreaModel.__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": base}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a bitsandbytes `quantization_config` gets `NOT_QUANTIZED` added to
        its skip list, so that the experts, router, adapters and projectors stay in full precision even when the
        user's own skip list would have replaced transformers' defaults."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = keep_unquantized(kwargs["quantization_config"])
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def from_experts(
        cls,
        llm: str | os.PathLike,
        caption: str | os.PathLike,
        classification: str | os.PathLike,
        detection: str | os.PathLike,
        segmentation: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> "AstreaForConditionalGeneration":
        """An untrained Astrea assembled from pretrained parts, each a local folder or a Hub id.

        - `llm`: any `AutoModelForCausalLM` checkpoint with its tokenizer (Vicuna-1.5, Qwen2, Llama...). When the
          tokenizer has no `<image>` token, one is added (as `AstreaProcessor.from_experts` does) and the embedding
          matrix grows by that one row.
        - `caption`: SigLIP, a `SiglipModel` or `SiglipVisionModel` checkpoint (google/siglip-so400m-patch14-384).
        - `classification`: an Astrea tagger folder; `python -m modeling_astrea.convert_ram_plus` makes one from
          the released RAM++ weights.
        - `detection`: Grounding DINO, a `GroundingDinoModel` or `GroundingDinoForObjectDetection` checkpoint. The
          paper's Grounding-DINO-1.5 has no released weights; the open IDEA-Research/grounding-dino-base (or -tiny)
          and MM-Grounding-DINO checkpoints are the real options. Its tokenizer, when present, encodes the
          generic detection prompt.
        - `segmentation`: SAM2, a `Sam2Model` checkpoint (facebook/sam2.1-hiera-large) or its vision encoder.

        Every loaded part keeps its weights exactly; the projectors, router, adapters, residual attention and MoCo
        head are new (randomly initialised). `config_overrides` are `AstreaConfig` fields (`image_grid_size`,
        `router_top_k`, ...). `dtype` loads the parts in that dtype and casts the new modules to it. Pair the model
        with `AstreaProcessor.from_experts(...)` on the same paths.
        """
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoTokenizer,
            GroundingDinoModel,
            Sam2Model,
            Sam2VisionModel,
            SiglipVisionModel,
        )

        load = {"dtype": dtype} if dtype is not None else {}
        language = AutoModelForCausalLM.from_pretrained(llm, **load)
        tokenizer = AutoTokenizer.from_pretrained(llm)
        parts = {
            "caption": SiglipVisionModel.from_pretrained(caption, **load),
            "classification": AstreaTaggerModel.from_pretrained(classification, **load),
            "detection": GroundingDinoModel.from_pretrained(detection, **load),
        }
        if AutoConfig.from_pretrained(segmentation).model_type == "sam2":
            parts["segmentation"] = Sam2Model.from_pretrained(segmentation, **load).vision_encoder
        else:
            parts["segmentation"] = Sam2VisionModel.from_pretrained(segmentation, **load)

        overrides = dict(config_overrides)
        if "detection_prompt_ids" not in overrides:
            try:
                phrases = AutoTokenizer.from_pretrained(detection)
                overrides["detection_prompt_ids"] = phrases(DETECTION_PROMPT)["input_ids"]
            except (OSError, ValueError):
                logger.warning(
                    f"No tokenizer beside the detection expert ({detection}): its prompt stays "
                    f"config.detection_prompt_ids (bert-base-uncased ids of {DETECTION_PROMPT!r})."
                )
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            image_token_id = len(tokenizer)  # AstreaProcessor.from_experts adds the token with this id
        text_config = language.config.to_dict()
        text_config["vocab_size"] = max(language.config.vocab_size, image_token_id + 1)
        config = AstreaConfig(
            text_config=text_config,
            caption_config=parts["caption"].config.to_dict(),
            classification_config=parts["classification"].config.to_dict(),
            detection_config=parts["detection"].config.to_dict(),
            segmentation_config=parts["segmentation"].config.to_dict(),
            image_token_id=image_token_id,
            tie_word_embeddings=bool(getattr(language.config, "tie_word_embeddings", False)),
            base_models={
                name: str(path)
                for name, path in zip(
                    ("llm", *EXPERT_NAMES), (llm, caption, classification, detection, segmentation), strict=True
                )
            },
            **overrides,
        )
        with torch.device("meta"):  # no memory for the parts that are about to be replaced
            model = cls(config)
        for name, part in parts.items():
            model.model.experts[name].model = part
        skip_pooling_head(parts["caption"])
        model.model.language_model = language.base_model
        model.lm_head = language.get_output_embeddings()
        # the new modules: give them memory and initialise them, children before parents (MoCo copies its head)
        device = next(language.parameters()).device
        for module in reversed(list(model.modules())):
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if any(t.is_meta for t in tensors):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)
        model.moco.reset_momentum_head()
        if dtype is not None:
            model.to(dtype)
        if model.get_input_embeddings().num_embeddings < text_config["vocab_size"]:  # a row for the <image> token
            model.resize_token_embeddings(text_config["vocab_size"], mean_resizing=False)
        model.train(False)
        return model

    def get_image_features(self, **kwargs) -> AstreaImageFeatures:
        return self.model.get_image_features(**kwargs)

    def get_expert_features(self, **kwargs) -> dict[str, torch.Tensor]:
        return self.model.get_expert_features(**kwargs)

    @torch.no_grad()
    def encode_text(
        self, input_ids: torch.LongTensor, read_mask: torch.Tensor, pool_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MoCo's text side before its head: the LLM reads each row's `read_mask` tokens alone (image placeholders and
        padding left out, the rest moved together) and its last hidden states are mean-pooled over the `pool_mask`
        tokens (all it read by default). Under no_grad: the text side is the momentum (key) path. [B, D]"""
        pool_mask = read_mask if pool_mask is None else pool_mask & read_mask
        lengths = read_mask.sum(dim=1)
        width = max(int(lengths.max()), 1)
        order = torch.argsort((~read_mask).to(torch.int8), dim=1, stable=True)[:, :width]  # read tokens first
        ids = input_ids.gather(1, order)
        attention = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
        pool = pool_mask.gather(1, order) & attention
        ids = ids.masked_fill(~attention, 0)
        hidden = self.model.language_model(input_ids=ids, attention_mask=attention.long(), use_cache=False)
        hidden = hidden.last_hidden_state * pool.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        return hidden.sum(dim=1) / pool.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)

    def _moco_pairs(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        moco_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For each sample that has images and target text: its mean-pooled visual tokens, its text as the LLM reads
        it without the images (pooled over the answer tokens, which follow the instruction), and its text's id
        (`text_hash` of the instruction and answer tokens): [B', D], [B', D], [B'].

        `moco_text` (`moco_input_ids`, `moco_attention_mask`, `moco_pool_mask`, [B, T'] each): a text of its own for
        MoCo, e.g. the image's caption as the answer to a caption request, pooled over `moco_pool_mask`; a row whose
        attention mask is all zeros keeps its own instruction and answer."""
        image_mask = input_ids == self.config.image_token_id  # [B, T]
        text_mask = ~image_mask if attention_mask is None else attention_mask.bool() & ~image_mask
        answer_mask = (labels != -100) & text_mask  # the target text
        text_ids, read_mask, pool_mask = input_ids, text_mask, answer_mask
        if moco_text is not None:
            own_ids, own_read, own_pool = moco_text
            own = own_read.bool().any(dim=1, keepdim=True)  # [B, 1]: rows with a MoCo text of their own
            width = max(input_ids.shape[1], own_ids.shape[1])

            def widen(tensor: torch.Tensor) -> torch.Tensor:
                return F.pad(tensor, (0, width - tensor.shape[1]))

            text_ids = torch.where(own, widen(own_ids), widen(input_ids))
            read_mask = torch.where(own, widen(own_read.bool()), widen(text_mask))
            pool_mask = torch.where(own, widen(own_pool.bool() & own_read.bool()), widen(answer_mask))
        images_per_sample = image_mask.sum(dim=1) // self.config.num_image_tokens  # [B]
        keep = (images_per_sample > 0) & answer_mask.any(dim=1)
        if not keep.any():
            return None
        sample_of_image = torch.repeat_interleave(
            torch.arange(len(input_ids), device=input_ids.device), images_per_sample
        )
        pooled_images = image_features.mean(dim=1)  # [N, D]
        visual = torch.zeros(
            len(input_ids), pooled_images.shape[-1], device=pooled_images.device, dtype=pooled_images.dtype
        ).index_add_(0, sample_of_image, pooled_images)
        visual = visual / images_per_sample.clamp(min=1).unsqueeze(-1).to(visual.dtype)
        text = self.encode_text(text_ids[keep], read_mask[keep], pool_mask[keep])
        ids = [text_hash(row[mask].tolist()) for row, mask in zip(text_ids[keep], read_mask[keep], strict=True)]
        return visual[keep], text, torch.tensor(ids, device=input_ids.device)

    def get_image_embeddings(self, **image_inputs) -> torch.Tensor:
        """L2-normalised image embeddings from the MoCo head (for retrieval): [num_images, moco_embed_dim]."""
        fused = self.get_image_features(**image_inputs, return_dict=True).pooler_output
        return self.moco.embed_images(fused.mean(dim=1))

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """GenerationMixin.generate; with a router that reads the prompt (`router_mode="sample"`, `router_prompt`),
        images are encoded here, where the prompt is known (generate's own image encoding sees pixel inputs only)."""
        pixel_names = {
            *PIXEL_INPUT_NAMES.values(),
            "detection_pixel_mask",
            "detection_input_ids",
            "detection_attention_mask",
        }
        has_pixels = any(kwargs.get(name) is not None for name in PIXEL_INPUT_NAMES.values())
        if self.model.routes_on_prompt and has_pixels and not kwargs.get("mm_encoder_outputs"):
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            pixels = {name: kwargs.pop(name) for name in pixel_names if name in kwargs}
            features = self.model.get_image_features(
                return_dict=True,
                **pixels, prompt_input_ids=input_ids, prompt_attention_mask=kwargs.get("attention_mask")
            )
            kwargs["mm_encoder_outputs"] = {"image": features}
        return super().generate(inputs, **kwargs)

    @torch.no_grad()
    def get_text_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
    ):
        """L2-normalised text embeddings from the momentum MoCo head, the LLM reading each text as MoCo's keys are
        read (for retrieval): [batch, moco_embed_dim]. As in training, a text can be an instruction and its answer,
        with `pool_mask` marking the answer (all tokens by default)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pool = None if pool_mask is None else pool_mask.bool()
        return self.moco.embed_texts(self.encode_text(input_ids, mask, pool))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        classification_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_values: torch.FloatTensor | None = None,
        segmentation_pixel_values: torch.FloatTensor | None = None,
        detection_pixel_mask: torch.LongTensor | None = None,
        detection_input_ids: torch.LongTensor | None = None,
        detection_attention_mask: torch.LongTensor | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, AstreaImageFeatures] | None = None,
        moco_input_ids: torch.LongTensor | None = None,
        moco_attention_mask: torch.Tensor | None = None,
        moco_pool_mask: torch.Tensor | None = None,
        skip_logits: bool = False,
        **kwargs,
    ) -> AstreaCausalLMOutputWithPast:
        r"""
        moco_input_ids, moco_attention_mask, moco_pool_mask (`torch.Tensor` of shape `(batch_size, text_length)`):
            MoCo's text for each row where it is not the row's own instruction and answer (training only): e.g. the
            image's caption, as `AstreaCollator` writes it for examples with a `moco_text`; pooled over
            `moco_pool_mask`. A row with an all-zero `moco_attention_mask` keeps its own text.
        skip_logits (`bool`, *optional*, defaults to `False`):
            With `labels`: run the LM head only on the positions that predict a label, compute the loss from those,
            and return `logits=None` (the loss is the same). In instruction tuning most positions are visual tokens
            and prompt words that no label scores; `AstreaSFTTrainer` sets it.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes the loss without the logits, so it needs `labels`.")
        if labels is not None and self.model.routes_on_prompt:
            kwargs.setdefault("router_prompt_mask", labels == -100)  # the router must not read the answer
        pixels = {
            "pixel_values": pixel_values,
            "classification_pixel_values": classification_pixel_values,
            "detection_pixel_values": detection_pixel_values,
            "segmentation_pixel_values": segmentation_pixel_values,
            "detection_pixel_mask": detection_pixel_mask,
            "detection_input_ids": detection_input_ids,
            "detection_attention_mask": detection_attention_mask,
        }
        moco_images = None
        wants_moco = labels is not None and self.config.use_moco and self.model.alignment is None
        has_images = expert_features is not None or any(pixels[n] is not None for n in PIXEL_INPUT_NAMES.values())
        if wants_moco and self.model.prompt_router is not None and has_images and not mm_encoder_outputs:
            # The task-aware router mixes the experts by the question; MoCo's image side is the image alone, routed
            # without the prompt, as retrieval (get_image_embeddings) sees it. Routed on the prompt, the pooled
            # tokens would tell the question type, which the text side also carries: a match that needs no image.
            # Both mixtures come from one pass of the projectors and adapters.
            images = self.model.get_image_features(
                return_dict=True,
                expert_features=expert_features,
                prompt_input_ids=input_ids,
                prompt_attention_mask=attention_mask,
                prompt_mask=kwargs.pop("router_prompt_mask"),
                unprompted=True,
                **pixels,
            )
            mm_encoder_outputs = {"image": images}
            pixels, expert_features = dict.fromkeys(pixels), None
            moco_images = images.unprompted_pooler_output
        outputs = self.model(
            return_dict=True,
            input_ids=input_ids,
            **pixels,
            expert_features=expert_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = None
        if not skip_logits:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = loss_reg = loss_moco = moco_chance = loss_balance = None
        if labels is not None:
            vocab_size = self.config.text_config.vocab_size
            if skip_logits:  # position t predicts label t + 1: the head runs where that label is scored
                shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
                scored = shift_labels != -100
                loss_reg = self.loss_function(
                    logits=self.lm_head(hidden_states[scored]),
                    labels=None,
                    shift_labels=shift_labels[scored],
                    vocab_size=vocab_size,
                    **kwargs,
                )  # Eq. 1
            else:
                loss_reg = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)  # Eq. 1
            loss = loss_reg
            # MoCo belongs to instruction tuning (Sec. 3.2.1); pre-alignment stages train on L_reg alone
            aligning = self.model.alignment is not None
            has_images = outputs.image_hidden_states is not None and input_ids is not None
            # With `num_items_in_batch` (the label tokens of the whole accumulated batch, as transformers' Trainer
            # passes it), L_reg is this micro-batch's token sum over that count, and the other terms are weighted
            # by the same share: the micro-batches' losses then add up to the batch's loss.
            share = 1.0
            if kwargs.get("num_items_in_batch") is not None:
                share = (labels[..., 1:] != -100).sum() / kwargs["num_items_in_batch"]
            if self.config.use_moco and not aligning:
                pairs = None
                if has_images:
                    images = outputs.image_hidden_states if moco_images is None else moco_images
                    if not self.config.moco_train_fusion:
                        images = images.detach()  # MoCo's heads learn; the fusion is left to L_reg
                    moco_text = None
                    if moco_input_ids is not None:
                        moco_text = (moco_input_ids, moco_attention_mask, moco_pool_mask)
                    pairs = self._moco_pairs(input_ids, labels, images, attention_mask, moco_text)
                if pairs is not None:
                    loss_moco, moco_chance = self.moco(*pairs)  # Eq. 5-8
                    loss = loss_reg + self.config.moco_weight * share * loss_moco  # Eq. 11
                elif self.training:  # no pairs here, but other processes may have some
                    loss = loss_reg + self.moco.skip()
            coefficient = self.config.router_aux_loss_coef
            if coefficient > 0 and not aligning and outputs.router_logits is not None:
                loss_balance = load_balancing_loss(outputs.router_logits, self.config.router_top_k)
                loss = loss + coefficient * share * loss_balance

        return AstreaCausalLMOutputWithPast(
            loss=loss,
            loss_reg=loss_reg,
            loss_moco=loss_moco,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            router_probs=outputs.router_probs,
            moco_chance=moco_chance,
            loss_balance=loss_balance,
            router_logits=outputs.router_logits,
        )


__all__ = [
    "EXPERT_NAMES",
    "AstreaAlignment",
    "PIXEL_INPUT_NAMES",
    "NOT_QUANTIZED",
    "keep_unquantized",
    "AstreaAdapter",
    "AstreaForConditionalGeneration",
    "AstreaImageFeatures",
    "AstreaModel",
    "AstreaMoCo",
    "AstreaPreTrainedModel",
    "AstreaResidualAttention",
    "load_balancing_loss",
    "top_k_router_probs",
    "branch_attention",
    "pack_rows_of",
]
