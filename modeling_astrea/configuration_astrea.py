"""Configuration of Astrea: an LLM, four vision experts and the fusion/training knobs of the paper.

The paper's symbols map onto config fields like this (Eq. numbers from the paper):

| symbol | field                 | where                                         |
| ------ | --------------------- | --------------------------------------------- |
| k      | `router_top_k`        | top-k experts per visual token (Eq. 9-10)     |
| tau    | `moco_temperature`    | logit scale of the MoCo similarities (Eq. 5)  |
| lambda | `moco_lambda`         | row vs column weight of L_moco (Eq. 7)        |
| m      | `moco_momentum`       | EMA coefficient of the momentum head (Eq. 8)  |
| mu     | `moco_weight`         | weight of L_moco in the total loss (Eq. 11)   |
| N      | `moco_queue_size`     | length of the negative queue (Sec. 3.2.1)     |
| gamma  | `residual_gamma`      | weight of cached features in Q (Eq. 3)        |
| p      | `residual_prob`       | Bernoulli probability of each gate p_i (Eq. 3)|

The paper gives no numbers for N, m, tau, lambda, mu, gamma or p; the defaults below are MoCo's
(N=4096 scaled to batch 128, m=0.999, tau=0.07) and neutral choices (lambda=0.5, gamma=1, p=0.5, mu=0.1).
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.grounding_dino import GroundingDinoConfig
from transformers.models.sam2 import Sam2VisionConfig
from transformers.models.siglip import SiglipVisionConfig

#: The four experts, coarse to fine. Their order is fixed: router columns, checkpoints and the
#: pre-alignment schedule all index experts by position in this tuple.
EXPERT_NAMES: tuple[str, ...] = ("caption", "classification", "detection", "segmentation")


def build_sub_configs(config: PreTrainedConfig) -> None:
    """Turn each sub-config field of `config` that is a dict or None into its config object, from the class's
    `sub_config_defaults`: {field: (config class, or a model_type string for any registered config, default kwargs)}.

    transformers 5.20 added `SubConfigSpec` for this; doing it here keeps the config loadable by the transformers
    releases before it too (vLLM 0.32 pins transformers < 5.20; see docs/serving.md)."""
    for key, (kind, defaults) in config.sub_config_defaults.items():
        value = getattr(config, key)
        if isinstance(value, PreTrainedConfig):
            continue
        kwargs = dict(defaults) if value is None else dict(value)
        if isinstance(kind, str):  # any config registered under its model_type, `kind` when the dict names none
            model_type = kwargs.pop("model_type", kind)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"{type(config).__name__}: {key} has an unknown model_type {model_type!r}.")
            value = CONFIG_MAPPING[model_type](**kwargs)
        else:
            kwargs.pop("model_type", None)
            value = kind(**kwargs)
        setattr(config, key, value)


def sub_config_diffs(config: PreTrainedConfig, diff: dict) -> dict:
    """`diff` (the config's `to_diff_dict()`) with each sub-config written as its own difference from its class's
    defaults (plus its `model_type`), as transformers does for configs that declare `SubConfigSpec`s; without this
    every sub-config field would be written out."""
    for key in config.sub_config_defaults:
        value = getattr(config, key, None)
        if isinstance(value, PreTrainedConfig) and key in diff:
            nested = {**value.to_diff_dict(), "model_type": value.model_type}
            nested.pop("transformers_version", None)  # once, at the top
            diff[key] = nested
    return diff


def swin_output_width(swin_config) -> int:
    """Channel width of a Swin backbone's last stage: the embedding doubles at every patch merge."""
    return swin_config.embed_dim * 2 ** (len(swin_config.depths) - 1)


@strict
class AstreaTaggerConfig(PreTrainedConfig):
    r"""
    The RAM++ image tagger (recognize-anything's `ram_plus_swin_large_14m`): a Swin image encoder (transformers'
    `SwinModel`), an image projection, per-tag text embeddings (several descriptions per tag, reweighted per image
    by their similarity to the image's global embedding), and a tag decoder in which each tag's query cross-attends
    to the projected image tokens (two BERT-style layers without self-attention, as in Query2Label), ending in one
    logit per tag.

    vision_config (`SwinConfig`): the image encoder; defaults to Swin-L at 384x384 (RAM++'s backbone).
    vision_width (`int`): width of the encoder's last stage; must equal the Swin config's (1536 for Swin-L).
    num_tags (`int`): number of tags (4,585 in the released RAM++).
    descriptions_per_tag (`int`): text embeddings per tag (51 in the released RAM++: LLM-written descriptions).
    tag_embedding_size (`int`): width of the tag embeddings and of the projected image tokens (512, CLIP's text
        width).
    tag_hidden_size, tag_num_layers, tag_num_heads, tag_intermediate_size: size of the tag decoder (768, 2, 4, 3072).
    tag_dropout (`float`): dropout in the tag decoder (0.1 in RAM++; off in eval mode).
    tag_threshold (`float`): probability above which a tag is predicted, for tags without their own threshold.
    tag_thresholds (`list[float]`, *optional*): one threshold per tag (RAM++ ships calibrated ones).
    tag_names (`list[str]`, *optional*): the name of each tag, in logit order.
    """

    model_type = "astrea_tagger"
    sub_config_defaults: ClassVar = {  # see build_sub_configs
        "vision_config": (
            "swin",
            {"image_size": 384, "patch_size": 4, "embed_dim": 192, "depths": [2, 2, 18, 2],
             "num_heads": [6, 12, 24, 48], "window_size": 12},
        )
    }
    sub_configs: ClassVar = {"vision_config": PreTrainedConfig}

    vision_config: dict | PreTrainedConfig | None = None
    vision_width: int = 1536
    num_tags: int = 4585
    descriptions_per_tag: int = 51
    tag_embedding_size: int = 512
    tag_hidden_size: int = 768
    tag_num_layers: int = 2
    tag_num_heads: int = 4
    tag_intermediate_size: int = 3072
    tag_dropout: float = 0.1
    tag_threshold: float = 0.68
    tag_thresholds: list[float] | None = None
    tag_names: list[str] | None = None
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        build_sub_configs(self)
        super().__post_init__(**kwargs)
        self.check_sizes()

    def to_diff_dict(self) -> dict:
        return sub_config_diffs(self, super().to_diff_dict())

    def thresholds(self) -> list[float]:
        """The probability threshold of every tag: its own where the config has one, else `tag_threshold`."""
        return list(self.tag_thresholds) if self.tag_thresholds is not None else [self.tag_threshold] * self.num_tags

    def names(self) -> list[str]:
        """The name of every tag (`tag_<index>` where the config names none)."""
        return list(self.tag_names) if self.tag_names is not None else [f"tag_{i}" for i in range(self.num_tags)]

    def check_sizes(self):
        """Raises ValueError when a size is out of range, the tag head does not fit the Swin encoder, or the tag
        lists do not have one entry per tag (runs at construction and load)."""
        problems = []
        width = swin_output_width(self.vision_config)
        if width != self.vision_width:
            problems.append(
                f"vision_width={self.vision_width} does not fit the Swin encoder, whose last stage is {width} wide "
                f"(embed_dim={self.vision_config.embed_dim}, {len(self.vision_config.depths)} stages)"
            )
        sizes = ("num_tags", "descriptions_per_tag", "tag_embedding_size", "tag_hidden_size", "tag_num_layers")
        sizes += ("tag_num_heads", "tag_intermediate_size")
        for name in sizes:
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.tag_num_heads >= 1 and self.tag_hidden_size % self.tag_num_heads:
            problems.append(
                f"tag_hidden_size={self.tag_hidden_size} is not divisible by tag_num_heads={self.tag_num_heads}"
            )
        if not 0.0 <= self.tag_dropout < 1.0:
            problems.append(f"tag_dropout={self.tag_dropout} must be in [0, 1)")
        if not 0.0 <= self.tag_threshold <= 1.0:
            problems.append(f"tag_threshold={self.tag_threshold} must be a probability in [0, 1]")
        if self.tag_thresholds is not None:
            if len(self.tag_thresholds) != self.num_tags:
                problems.append(f"tag_thresholds has {len(self.tag_thresholds)} entries for num_tags={self.num_tags}")
            outside = [i for i, value in enumerate(self.tag_thresholds) if not 0.0 <= value <= 1.0]
            if outside:
                problems.append(f"tag_thresholds at {outside[:5]} are not probabilities in [0, 1]")
        if self.tag_names is not None and len(self.tag_names) != self.num_tags:
            problems.append(f"tag_names has {len(self.tag_names)} entries for num_tags={self.num_tags}")
        if problems:
            raise ValueError("AstreaTaggerConfig: " + "; ".join(problems) + ".")


@strict
class AstreaConfig(PreTrainedConfig):
    r"""
    Astrea: a LLaVA-style vision-language model whose visual tokens are a routed mixture of four task experts.

    text_config (`PreTrainedConfig`): any causal LM config (Llama/Vicuna, Qwen2, Yi, ...).
    caption_config (`SiglipVisionConfig`): the caption / global expert (SigLIP).
    classification_config (`AstreaTaggerConfig`): the classification expert (the RAM++ tagger).
    detection_config (`GroundingDinoConfig`): the detection expert (Grounding DINO).
    segmentation_config (`Sam2VisionConfig`): the segmentation expert (SAM2's image encoder).
    image_token_id (`int`): id of the image placeholder token in the LLM vocabulary.
    image_grid_size (`int`): every expert's feature grid is resampled to this side; an image becomes
        `image_grid_size**2` visual tokens (24 -> 576, the paper's Table 1 budget).
    router_top_k (`int`): k of the top-k router (Eq. 9-10; paper default 3 of 4, Table 3).
    router_mode (`str`): `"token"`, the paper's router (per visual token, on the projected expert features), or
        `"sample"`, one routing per image from its global (caption) feature and the prompt, so that the experts
        outside its top-k do not run at all (faster inference; an option of ours, not the paper's).
    router_prompt (`bool`): the per-token router also reads the instruction (an option of ours; docs/design.md):
        each image's routing logits get a bias from the mean input embedding of its prompt's text tokens, through a
        zero-initialised `prompt_router` (so training starts from the paper's router). Without a prompt (vLLM,
        `get_image_features` on pixels alone) the bias is zero. Token mode only.
    router_prompt_dropout (`float`): in training, the share of images routed without their prompt, so that the
        prompt-free routing (what vLLM serves) is trained too.
    router_aux_loss_coef (`float`): weight of the router's load-balancing loss (`load_balancing_loss`, the Switch
        Transformer's), added to the instruction-tuning loss; 0 (the default) leaves it out. An expert outside every
        token's top-k gets no gradient through Eq. 9 and can stay unused for good; this term gives it one.
    image_position_embedding (`bool`): add a learned, zero-initialised row and column embedding to every visual token
        (an option of ours; docs/design.md), for experts whose features say little about where a token is.
    image_token_order (`str`): the order in which the LLM reads an image's `image_grid_size` x `image_grid_size`
        tokens: `"row"` (the default: row by row, as LLaVA and the paper) or `"column"` (column by column, left to
        right; an option of ours, docs/design.md). The LLM's positions are 1-D, so in column order "earlier in the
        sequence" means "further left", which a causal LLM can compare; in row order it means "higher up".
    adapter_hidden_size (`int`): bottleneck width of each expert's adapter F_i (Eq. 10).
    projector_hidden_act (`str`): activation of the expert projectors (Linear-act-Linear FFNs).
    detection_feature_level (`int`): which level of Grounding DINO's multi-scale encoder memory is the grid.
    detection_prompt_ids (`list[int]`): token ids (in the detection expert's BERT vocabulary) of the generic
        phrase list that conditions Grounding DINO when no prompt is given; default "[CLS] object . [SEP]".
    freeze_experts (`bool`): expert backbones are frozen and run without autograd.
    residual_experts (`list[str]`, optional): the experts that get a random residual attention for pre-alignment:
        every stage but the first of the pre-alignment order (default: all but `caption`, the paper's order).
    base_models (`dict[str, str]`, optional): where each part came from (`llm`, `caption`, ... -> Hub id or path),
        as `AstreaForConditionalGeneration.from_experts` records it; model cards list them.
    use_moco, moco_embed_dim, moco_queue_size, moco_momentum, moco_temperature, moco_lambda, moco_weight:
        the momentum-contrastive loss (Eq. 5-8, 11); see the module docstring for the symbols.
    moco_train_fusion (`bool`): whether L_moco's gradient reaches the fusion (router and adapters) through its
        image side, as in the paper (the default); False trains MoCo's own heads only, on the fused tokens as the
        language-modelling loss shapes them (docs/design.md).
    moco_standardize (`bool`): MoCo's heads read their pooled inputs standardized per feature, in training by the
        batch's mean and variance, otherwise by running ones (docs/design.md). False takes no moments from batches:
        the stored ones still apply (the identity, unless a training with it on moved them). A config saved before
        this field existed gets True: its checkpoint's moments load as the identity, and its next training step
        starts standardizing.
    residual_gamma, residual_prob: random residual attention of pre-alignment (Eq. 2-4).
    """

    model_type = "astrea"
    sub_config_defaults: ClassVar = {  # see build_sub_configs
        # Llama with one extra token for the image placeholder (Vicuna-1.5's 32000 + `<image>`)
        "text_config": ("llama", {"vocab_size": 32001}),
        # SigLIP ViT-SO400M/14@384
        "caption_config": (
            SiglipVisionConfig,
            {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
             "image_size": 384, "patch_size": 14},
        ),
        "classification_config": (AstreaTaggerConfig, {}),
        "detection_config": (GroundingDinoConfig, {}),
        "segmentation_config": (Sam2VisionConfig, {}),
    }
    sub_configs: ClassVar = dict.fromkeys(sub_config_defaults, PreTrainedConfig)

    text_config: dict | PreTrainedConfig | None = None
    caption_config: dict | PreTrainedConfig | None = None
    classification_config: dict | PreTrainedConfig | None = None
    detection_config: dict | PreTrainedConfig | None = None
    segmentation_config: dict | PreTrainedConfig | None = None

    image_token_id: int = 32000
    image_grid_size: int = 24
    router_top_k: int = 3
    router_mode: str = "token"
    router_prompt: bool = False
    router_prompt_dropout: float = 0.1
    router_aux_loss_coef: float = 0.0
    image_position_embedding: bool = False
    image_token_order: str = "row"
    adapter_hidden_size: int = 1024
    projector_hidden_act: str = "gelu"
    detection_feature_level: int = 1
    detection_prompt_ids: list[int] | None = None
    freeze_experts: bool = True
    base_models: dict[str, str] | None = None
    residual_experts: list[str] | None = None

    use_moco: bool = True
    moco_embed_dim: int = 256
    moco_queue_size: int = 4096
    moco_momentum: float = 0.999
    moco_temperature: float = 0.07
    moco_lambda: float = 0.5
    moco_weight: float = 0.1
    moco_train_fusion: bool = True
    moco_standardize: bool = True

    residual_gamma: float = 1.0
    residual_prob: float = 0.5

    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.detection_prompt_ids is None:
            self.detection_prompt_ids = [101, 4874, 1012, 102]  # bert-base-uncased: [CLS] object . [SEP]
        if self.residual_experts is None:
            self.residual_experts = list(EXPERT_NAMES[1:])
        unknown = [name for name in self.residual_experts if name not in EXPERT_NAMES]
        if unknown:
            raise ValueError(f"AstreaConfig: residual_experts holds {unknown[0]!r}; experts are {EXPERT_NAMES}.")
        build_sub_configs(self)
        super().__post_init__(**kwargs)
        self.check_sizes()

    def to_diff_dict(self) -> dict:
        return sub_config_diffs(self, super().to_diff_dict())

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the common grid, flattened."""
        return self.image_grid_size**2

    @property
    def num_experts(self) -> int:
        return len(EXPERT_NAMES)

    def expert_config(self, name: str) -> PreTrainedConfig:
        return getattr(self, f"{name}_config")

    @property
    def expert_hidden_sizes(self) -> dict[str, int]:
        """Channel width of each expert's feature grid, i.e. the input width of its projector."""
        return {
            "caption": self.caption_config.hidden_size,
            "classification": self.classification_config.vision_width,
            "detection": self.detection_config.d_model,
            "segmentation": self.segmentation_config.fpn_hidden_size,
        }

    def check_sizes(self):
        """Raises ValueError when a knob is out of range or the experts' sizes do not fit together (runs at
        construction and load, so a bad config fails before any weight is built)."""
        problems = []
        if not 1 <= self.router_top_k <= len(EXPERT_NAMES):
            problems.append(f"router_top_k={self.router_top_k} must be between 1 and {len(EXPERT_NAMES)}")
        if self.router_mode not in ("token", "sample"):
            problems.append(f"router_mode={self.router_mode!r} must be 'token' or 'sample'")
        if self.router_prompt and self.router_mode != "token":
            problems.append("router_prompt=True is for router_mode='token' (router_mode='sample' reads the prompt)")
        if not 0.0 <= self.router_prompt_dropout <= 1.0:
            problems.append(f"router_prompt_dropout={self.router_prompt_dropout} must be in [0, 1]")
        if not self.router_aux_loss_coef >= 0.0:
            problems.append(f"router_aux_loss_coef={self.router_aux_loss_coef} must be 0 or more")
        if self.image_token_order not in ("row", "column"):
            problems.append(f"image_token_order={self.image_token_order!r} must be 'row' or 'column'")
        if self.image_grid_size < 1:
            problems.append(f"image_grid_size={self.image_grid_size} must be positive")
        if self.adapter_hidden_size < 1 or self.moco_embed_dim < 1 or self.moco_queue_size < 1:
            problems.append("adapter_hidden_size, moco_embed_dim and moco_queue_size must be positive")
        if not 0.0 <= self.moco_momentum < 1.0:
            problems.append(f"moco_momentum={self.moco_momentum} must be in [0, 1) (Eq. 8)")
        if self.moco_temperature <= 0:
            problems.append(f"moco_temperature={self.moco_temperature} must be positive (Eq. 5)")
        if not 0.0 <= self.moco_lambda <= 1.0:
            problems.append(f"moco_lambda={self.moco_lambda} must be in [0, 1] (Eq. 7)")
        if not 0.0 <= self.residual_prob <= 1.0:
            problems.append(f"residual_prob={self.residual_prob} must be in [0, 1] (Eq. 3)")
        caption = self.caption_config
        if caption.image_size < caption.patch_size:
            problems.append(
                f"caption expert: image_size={caption.image_size} is smaller than one patch ({caption.patch_size})"
            )
        levels = self.detection_config.num_feature_levels
        if not 0 <= self.detection_feature_level < levels:
            problems.append(
                f"detection_feature_level={self.detection_feature_level} is not one of the detection expert's "
                f"{levels} feature levels"
            )
        if self.detection_config.d_model % 32:
            problems.append(
                f"detection expert: d_model={self.detection_config.d_model} must be a multiple of 32 "
                "(Grounding DINO normalises it with GroupNorm(32))"
            )
        classification = self.classification_config
        if classification.vision_width != swin_output_width(classification.vision_config):
            problems.append(
                f"classification expert: vision_width={classification.vision_width} does not fit its Swin "
                f"encoder ({swin_output_width(classification.vision_config)} wide)"
            )
        text = self.text_config
        if not hasattr(text, "hidden_size") or not hasattr(text, "vocab_size"):
            problems.append(f"text_config ({type(text).__name__}) has no hidden_size/vocab_size: not a causal LM")
        elif not 0 <= self.image_token_id < text.vocab_size:
            problems.append(
                f"image_token_id={self.image_token_id} is outside the LLM vocabulary (vocab_size={text.vocab_size})"
            )
        if problems:
            raise ValueError("Invalid AstreaConfig: " + "; ".join(problems) + ".")


__all__ = ["EXPERT_NAMES", "AstreaConfig", "AstreaTaggerConfig"]
