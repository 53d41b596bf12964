"""Writes the configs shipped in `examples/configs/`: the tiny test/demo model and the paper's 13B and 34B.

    python examples/configs/build_configs.py               # `make configs`
    python examples/configs/build_configs.py --out DIR     # somewhere else (the tests compare it with the shipped)

The real-scale configs copy the dimensions of the released checkpoints (Vicuna-1.5-13B, Nous-Hermes-2-Yi-34B,
SigLIP-SO400M/14@384, RAM++ Swin-L/384, Grounding DINO (Swin-T), SAM2.1-hiera-large); building them needs no
download. The tiny model also gets a tokenizer trained here, offline, so its folder is complete.
"""

import json
from pathlib import Path

from transformers import LlamaConfig

from modeling_astrea import AstreaConfig

HERE = Path(__file__).resolve().parent

SAM2_HIERA_LARGE = {
    "backbone_config": {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 144,
        "num_attention_heads": 2,
        "blocks_per_stage": [2, 6, 36, 4],
        "embed_dim_per_stage": [144, 288, 576, 1152],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "global_attention_blocks": [23, 33, 43],
        "window_size_per_stage": [8, 4, 16, 8],
        "window_positional_embedding_background_size": [7, 7],
    },
    "backbone_channel_list": [1152, 576, 288, 144],
    "fpn_hidden_size": 256,
}

PAPER_KNOBS = {"image_grid_size": 24, "router_top_k": 3, "adapter_hidden_size": 1024}


def tiny_config(vocab_size: int, image_token_id: int, pad_token_id: int) -> AstreaConfig:
    """Small enough for the whole test suite on 2 CPU cores; every expert still a real transformers model."""
    return AstreaConfig(
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        ),
        caption_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        classification_config={
            "vision_config": {
                "model_type": "swin",
                "image_size": 64,
                "patch_size": 4,
                "embed_dim": 16,
                "depths": [1, 1, 1],
                "num_heads": [1, 2, 4],
                "window_size": 4,
            },
            "vision_width": 64,
            "num_tags": 24,
            "descriptions_per_tag": 2,
            "tag_embedding_size": 16,
            "tag_hidden_size": 32,
            "tag_num_layers": 1,
            "tag_num_heads": 2,
            "tag_intermediate_size": 64,
        },
        detection_config={
            "backbone_config": {
                "model_type": "swin",
                "image_size": 64,
                "patch_size": 4,
                "embed_dim": 16,
                "depths": [1, 1, 1, 1],
                "num_heads": [1, 1, 2, 2],
                "window_size": 4,
                "out_features": ["stage2", "stage3", "stage4"],
            },
            "text_config": {
                "model_type": "bert",
                "vocab_size": 128,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
            "d_model": 64,  # GroupNorm(32) needs 2+ values per group on its 1x1 level at batch 1
            "encoder_layers": 1,
            "decoder_layers": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "num_queries": 8,
            "max_text_len": 16,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
        },
        segmentation_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 8,
                "num_attention_heads": 1,
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [8, 16, 32, 64],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "global_attention_blocks": [3],  # not a stage's first block (SAM2 divides by zero there)
                "window_size_per_stage": [4, 4, 4, 4],
                "window_positional_embedding_background_size": [2, 2],
                "image_size": [64, 64],
            },
            "backbone_channel_list": [64, 32, 16, 8],
            "fpn_hidden_size": 16,
        },
        image_token_id=image_token_id,
        image_grid_size=4,
        router_top_k=3,
        adapter_hidden_size=16,
        detection_prompt_ids=[101, 7, 8, 102],
        moco_embed_dim=16,
        moco_queue_size=32,
        moco_momentum=0.99,
    )


def vicuna_13b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32001,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def hermes2_yi_34b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64001,
        hidden_size=7168,
        intermediate_size=20480,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=5000000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=7,
    )


def paper_config(text_config: LlamaConfig) -> AstreaConfig:
    """SigLIP-SO400M/14@384 + RAM++ (Swin-L/384) + Grounding DINO (Swin-T, the open checkpoint) + SAM2.1-L.

    The image placeholder is one token added after the LLM's vocabulary (hence 32001 / 64001)."""
    return AstreaConfig(
        text_config=text_config,
        segmentation_config=SAM2_HIERA_LARGE,
        image_token_id=text_config.vocab_size - 1,
        **PAPER_KNOBS,
    )


def main(argv=None):
    import argparse

    from astrea.processing import AstreaImageProcessor, AstreaProcessor
    from astrea.processing.tokenizer import build_tiny_tokenizer

    parser = argparse.ArgumentParser(description="Write the tiny, 13B and 34B config folders.")
    parser.add_argument("--out", type=Path, default=HERE, help="where the folders go (default: examples/configs/)")
    out = parser.parse_args(argv).out

    tokenizer = build_tiny_tokenizer()
    tiny = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    tiny.save_pretrained(out / "tiny")
    image_processor = AstreaImageProcessor.from_model_config(tiny, detection_size=64)
    processor = AstreaProcessor(
        image_processor, tokenizer, chat_template=tokenizer.chat_template, num_image_tokens=tiny.num_image_tokens
    )
    processor.save_pretrained(out / "tiny")
    paper_config(vicuna_13b()).save_pretrained(out / "astrea-13b")
    paper_config(hermes2_yi_34b()).save_pretrained(out / "astrea-34b")
    for folder in ("tiny", "astrea-13b", "astrea-34b"):
        strip_remote_code(out / folder)
        print("wrote", out / folder)


def strip_remote_code(folder: Path) -> None:
    """These folders are used with the package installed: drop the remote-code files and auto_maps that
    save_pretrained writes (saved models keep them, so they load with trust_remote_code=True)."""
    for stray in folder.glob("*.py"):
        stray.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("auto_map", None)
            if isinstance(data.get("image_processor"), dict):
                data["image_processor"].pop("auto_map", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
