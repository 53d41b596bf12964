"""Convert the released RAM++ weights (recognize-anything's `ram_plus_swin_large_14m.pth`) into an Astrea tagger
folder: `model.safetensors` + `config.json` for `AstreaTaggerModel`, and a `preprocessor_config.json` (384x384,
ImageNet normalisation, as RAM++'s transform), ready for `AstreaForConditionalGeneration.from_experts(
classification=...)` or for tagging on its own.

    python -m modeling_astrea.convert_ram_plus \\
        --checkpoint ram_plus_swin_large_14m.pth \\
        --tag-list recognize-anything/ram/data/ram_tag_list.txt \\
        --thresholds recognize-anything/ram/data/ram_tag_list_threshold.txt \\
        --output ram_plus_astrea

The tag list and the per-tag thresholds are not in the checkpoint: they are text files of the recognize-anything
repository (one tag or threshold per line, 4,585 lines). Sizes (Swin depths, heads and window, decoder width and
depth, descriptions per tag) are read off the checkpoint's shapes, so Swin-B RAM++ weights convert too; the
number of decoder heads is not visible in the shapes (RAM++ uses 4: `--tag-num-heads`).

Layout of the released state dict (under its "model" key) and where each part goes:

| released                                                   | `AstreaTaggerModel`                                 |
| ---------------------------------------------------------- | --------------------------------------------------- |
| `visual_encoder.*` (Microsoft's Swin; `attn.qkv` fused)   | `vision_model.*` (transformers' Swin; q/k/v split)  |
| `image_proj`                                               | `image_projection`                                  |
| `label_embed` [tags x descriptions, 512]                   | `tag_embeddings`                                    |
| `reweight_scale` (log scale)                               | `description_logit_scale`                           |
| `wordvec_proj`                                             | `tag_projection`                                    |
| `tagging_head.encoder.layer.N.*` (BERT, no self-attention) | `layers.N.*`                                        |
| `fc`                                                       | `tag_head`                                          |

Buffers that transformers recomputes (`relative_position_index`, `attn_mask`) are dropped; they are the only
tensors left out. The released state dict holds nothing else (recognize-anything deletes the tag decoder's
embeddings and self-attention and builds its Swin without a classifier head), so any other tensor (a classifier
head, an absolute position embedding, a stage the sizes do not have) is refused by name rather than dropped, as
is a missing tensor or one whose shape does not fit the sizes read off the others.
"""

import argparse
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .configuration_astrea import AstreaTaggerConfig
from .modeling_astrea_tagger import AstreaTaggerModel

SWIN = "visual_encoder"
BLOCK = r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\."
TAG_LAYER = r"tagging_head\.encoder\.layer\.(\d+)\."
OURS_BLOCK = r"vision_model.encoder.layers.\1.blocks.\2."

#: (released name pattern, our name); the patterns match a whole key up to its trailing `weight`/`bias`
RENAMES: list[tuple[str, str]] = [
    (r"visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embeddings.projection."),
    (r"visual_encoder\.patch_embed\.norm\.", "vision_model.embeddings.norm."),
    (BLOCK + r"norm1\.", OURS_BLOCK + "layernorm_before."),
    (BLOCK + r"norm2\.", OURS_BLOCK + "layernorm_after."),
    (BLOCK + r"attn\.proj\.", OURS_BLOCK + "attention.o_proj."),
    (BLOCK + r"mlp\.fc(1|2)\.", OURS_BLOCK + r"mlp.fc\3."),
    (
        r"visual_encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.",
        r"vision_model.encoder.layers.\1.downsample.\2.",
    ),
    (r"visual_encoder\.norm\.", "vision_model.layernorm."),
    (r"image_proj\.", "image_projection."),
    (r"wordvec_proj\.", "tag_projection."),
    (r"fc\.", "tag_head."),
    (TAG_LAYER + r"crossattention\.self\.(query|key|value)\.", r"layers.\1.cross_attention.\2."),
    (TAG_LAYER + r"crossattention\.output\.dense\.", r"layers.\1.cross_attention.output."),
    (TAG_LAYER + r"crossattention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (TAG_LAYER + r"intermediate\.dense\.", r"layers.\1.intermediate."),
    (TAG_LAYER + r"output\.dense\.", r"layers.\1.output."),
    (TAG_LAYER + r"output\.LayerNorm\.", r"layers.\1.output_norm."),
]
PARAMETERS = {"label_embed": "tag_embeddings", "reweight_scale": "description_logit_scale"}
QKV = re.compile(BLOCK + r"attn\.qkv\.(weight|bias)")
BIAS_TABLE = re.compile(BLOCK + r"attn\.relative_position_bias_table")
#: the only released tensors left out: buffers that transformers' Swin recomputes from the config
RECOMPUTED = re.compile(r".*\.(relative_position_index|attn_mask)")
#: how torch.load(weights_only=True) names a pickled object it refuses
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_ram_plus_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a RAM++ `.pth` (its "model" entry when it has one).

    Loads with `weights_only=True` unless `trust_checkpoint`: a full unpickle can run code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RAM++ checkpoint {path} does not exist")
    try:  # memory-mapped where the file is a zip archive (the release is one, and holds more than the weights)
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=not trust_checkpoint, mmap=zipfile.is_zipfile(path)
        )
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or a zip error for a bad file
        refused = REFUSED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused and not trust_checkpoint:
            raise ValueError(
                f"The RAM++ checkpoint {path} holds a pickled {refused[1]}, which torch.load(weights_only=True) "
                "refuses to unpickle; if you trust the file, pass --trust-checkpoint (trust_checkpoint=True), "
                "which unpickles everything in it and so can run code from it."
            ) from error
        hint = "" if trust_checkpoint else " (if it holds non-tensor objects and you trust it: --trust-checkpoint)"
        raise ValueError(f"Cannot read the RAM++ checkpoint {path}: {error}{hint}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state dict of tensors (looked at the file and its 'model' entry)")
    # early RAM checkpoints call the tag decoder `vision_multi`
    return {re.sub(r"^vision_multi\.", "tagging_head.", key): value for key, value in state_dict.items()}


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"Not a RAM++ state dict: it has no {key!r}")
    return state_dict[key]


def ram_plus_config(
    state_dict: dict[str, torch.Tensor],
    tag_names: list[str],
    tag_thresholds: list[float] | None = None,
    image_size: int = 384,
    tag_num_heads: int = 4,
) -> AstreaTaggerConfig:
    """The `AstreaTaggerConfig` of a released RAM++ state dict, its sizes read off the tensors' shapes."""
    patch = _require(state_dict, f"{SWIN}.patch_embed.proj.weight")  # [C, 3, p, p]
    blocks: dict[int, set[int]] = {}
    heads: dict[int, int] = {}
    for key, value in state_dict.items():
        if match := re.match(BLOCK, key):
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
        if match := BIAS_TABLE.fullmatch(key):
            heads[int(match[1])] = value.shape[1]
    if not blocks or sorted(blocks) != list(range(len(blocks))) or sorted(heads) != sorted(blocks):
        raise ValueError(f"Not a RAM++ state dict: its Swin stages are incomplete ({sorted(blocks)})")
    table = state_dict[f"{SWIN}.layers.0.blocks.0.attn.relative_position_bias_table"]  # [(2w - 1)^2, heads]
    window = (math.isqrt(table.shape[0]) + 1) // 2
    tag_embeddings = _require(state_dict, "label_embed")  # [T * D, E]
    if tag_embeddings.shape[0] % len(tag_names):
        raise ValueError(
            f"The tag list has {len(tag_names)} tags, but the checkpoint's label_embed has {tag_embeddings.shape[0]} "
            "rows, which is not a whole number of descriptions per tag: is it the tag list of this checkpoint?"
        )
    decoder_layers = {int(m[1]) for key in state_dict if (m := re.match(TAG_LAYER, key))}
    return AstreaTaggerConfig(
        vision_config={
            "model_type": "swin",
            "image_size": image_size,
            "patch_size": patch.shape[-1],
            "embed_dim": patch.shape[0],
            "depths": [len(blocks[i]) for i in sorted(blocks)],
            "num_heads": [heads[i] for i in sorted(blocks)],
            "window_size": window,
            "mlp_ratio": _require(state_dict, f"{SWIN}.layers.0.blocks.0.mlp.fc1.weight").shape[0] / patch.shape[0],
            "qkv_bias": f"{SWIN}.layers.0.blocks.0.attn.qkv.bias" in state_dict,
        },
        vision_width=_require(state_dict, f"{SWIN}.norm.weight").shape[0],
        num_tags=len(tag_names),
        descriptions_per_tag=tag_embeddings.shape[0] // len(tag_names),
        tag_embedding_size=tag_embeddings.shape[1],
        tag_hidden_size=_require(state_dict, "fc.weight").shape[1],
        tag_num_layers=len(decoder_layers),
        tag_num_heads=tag_num_heads,
        tag_intermediate_size=_require(state_dict, "tagging_head.encoder.layer.0.intermediate.dense.weight").shape[0],
        tag_names=list(tag_names),
        tag_thresholds=None if tag_thresholds is None else [float(t) for t in tag_thresholds],
    )


def released_to_ours(key: str) -> list[str] | None:
    """The `AstreaTaggerModel` names a released RAM++ key goes to: three for a fused `qkv` (split in that order
    along its first dimension), none for a buffer transformers recomputes, `None` for a key outside the layout."""
    if RECOMPUTED.fullmatch(key):
        return []
    if key in PARAMETERS:
        return [PARAMETERS[key]]
    if match := QKV.fullmatch(key):
        prefix = f"vision_model.encoder.layers.{match[1]}.blocks.{match[2]}.attention."
        return [f"{prefix}{name}.{match[3]}" for name in ("q_proj", "k_proj", "v_proj")]
    if match := BIAS_TABLE.fullmatch(key):
        return [
            f"vision_model.encoder.layers.{match[1]}.blocks.{match[2]}.attention.relative_position_bias."
            "relative_position_bias_table"
        ]
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern + r"(weight|bias)", key):
            return [re.sub(pattern, replacement, key)]
    return None


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released RAM++ names -> `AstreaTaggerModel` names, q/k/v split; returns (converted, keys outside the RAM++
    layout). The recomputed buffers are left out of both; `convert_ram_plus` refuses a dict with any such key."""
    converted, unused = {}, []
    for key, value in state_dict.items():
        names = released_to_ours(key)
        if names is None:
            unused.append(key)
        elif len(names) == 1:
            converted[names[0]] = value
        elif names:
            if value.shape[0] % len(names):
                raise ValueError(f"{key} has {value.shape[0]} rows, which do not split into {len(names)} equal parts")
            for name, part in zip(names, value.chunk(len(names), dim=0), strict=True):
                converted[name] = part.clone()
    return converted, unused


def layout_problems(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """What keeps a released state dict from loading into a tagger whose state dict is `expected`: keys outside
    the RAM++ layout and wrong shapes (both by released name), and missing keys (by the tagger's name)."""
    outside, wrong, found = [], [], set()
    for key, value in state_dict.items():
        names = released_to_ours(key)
        if names is None or any(name not in expected for name in names):
            outside.append(key)
            continue
        found.update(names)
        if names:  # a fused qkv is its three parts stacked along the first dimension
            shapes = [tuple(expected[name].shape) for name in names]
            needed = (sum(shape[0] for shape in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
            if tuple(value.shape) != needed:
                wrong.append(f"{key} is {tuple(value.shape)}, the tagger needs {needed}")
    missing = sorted(set(expected) - found)
    problems = []
    if outside:
        problems.append(f"unknown tensors {_listed([repr(key) for key in outside], ', ')}")
    if missing:
        problems.append(f"missing {_listed([repr(key) for key in missing], ', ')}")
    if wrong:
        problems.append(f"wrong shapes {_listed(wrong, '; ')}")
    return problems


def _listed(items: list[str], separator: str, most: int = 8) -> str:
    more = f"{separator}and {len(items) - most} more" if len(items) > most else ""
    return f"[{separator.join(items[:most])}{more}]"


def _read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or any(not line for line in lines):
        raise ValueError(f"{what} {path} must have one non-empty entry per line")
    return lines


def convert_ram_plus(
    checkpoint: str | Path,
    output: str | Path,
    tag_list: str | Path,
    thresholds: str | Path | None = None,
    image_size: int = 384,
    tag_num_heads: int = 4,
    trust_checkpoint: bool = False,
) -> AstreaTaggerModel:
    """Convert a RAM++ checkpoint into an `AstreaTaggerModel` folder at `output`; returns the loaded model."""
    from transformers import ViTImageProcessorPil

    tag_names = _read_lines(tag_list, "Tag list")
    tag_thresholds = None
    if thresholds is not None:
        lines = _read_lines(thresholds, "Threshold file")
        try:
            tag_thresholds = [float(line) for line in lines]
        except ValueError as error:
            raise ValueError(f"Threshold file {thresholds}: {error}") from error
        if len(tag_thresholds) != len(tag_names):
            raise ValueError(
                f"Threshold file {thresholds} has {len(tag_thresholds)} lines, the tag list {len(tag_names)}"
            )
    state_dict = load_ram_plus_checkpoint(checkpoint, trust_checkpoint)
    config = ram_plus_config(state_dict, tag_names, tag_thresholds, image_size, tag_num_heads)
    model = AstreaTaggerModel(config)
    if problems := layout_problems(state_dict, model.state_dict()):
        raise ValueError(f"{checkpoint} does not fit the RAM++ layout: {'; '.join(problems)}")
    converted, _ = convert_state_dict(state_dict)  # nothing outside the layout: layout_problems found none
    model.load_state_dict(converted)  # copied into the model's float32 parameters
    model.eval().save_pretrained(output)
    ViTImageProcessorPil(  # RAM++'s transform: RGB, resize to a square (bilinear), ImageNet mean and std
        do_convert_rgb=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    ).save_pretrained(output)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert RAM++ weights into an Astrea tagger folder.")
    parser.add_argument("--checkpoint", required=True, help="ram_plus_swin_large_14m.pth")
    parser.add_argument("--tag-list", required=True, help="ram_tag_list.txt: one tag per line, in logit order")
    parser.add_argument("--thresholds", help="ram_tag_list_threshold.txt: one threshold per tag (default 0.68 each)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--image-size", type=int, default=384, help="input side the weights were trained at")
    parser.add_argument("--tag-num-heads", type=int, default=4, help="attention heads of the tag decoder")
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle the whole file (runs its code)")
    args = parser.parse_args(argv)
    try:
        model = convert_ram_plus(
            args.checkpoint,
            args.output,
            args.tag_list,
            args.thresholds,
            image_size=args.image_size,
            tag_num_heads=args.tag_num_heads,
            trust_checkpoint=args.trust_checkpoint,
        )
    except (OSError, ValueError) as error:
        parser.exit(2, f"convert_ram_plus: error: {error}\n")
    config = model.config
    print(
        f"Wrote {args.output}: {config.num_tags} tags x {config.descriptions_per_tag} descriptions, Swin "
        f"depths {config.vision_config.depths}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )


if __name__ == "__main__":
    main()
