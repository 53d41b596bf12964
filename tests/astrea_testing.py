"""Helpers shared by the tests: where the tiny config lives and random inputs shaped for it."""

from pathlib import Path

import torch

from modeling_astrea import AstreaConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny"


def save_random_tiny(folder: Path, seed: int = 0) -> Path:
    """A seeded random tiny Astrea and the shipped processor, saved to `folder` (returned)."""
    from transformers import AutoProcessor

    from modeling_astrea import AstreaForConditionalGeneration

    torch.manual_seed(seed)
    AstreaForConditionalGeneration(AstreaConfig.from_pretrained(TINY)).save_pretrained(folder)
    AutoProcessor.from_pretrained(TINY).save_pretrained(folder)
    return folder


def expert_image_sizes(config: AstreaConfig) -> dict[str, int]:
    """Input side of each expert, keyed by its pixel input name."""
    return {
        "pixel_values": config.caption_config.image_size,
        "classification_pixel_values": config.classification_config.vision_config.image_size,
        "detection_pixel_values": config.detection_config.backbone_config.image_size,
        "segmentation_pixel_values": config.segmentation_config.backbone_config.image_size[0],
    }


def random_pixels(config: AstreaConfig, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(num_images, 3, side, side, generator=generator)
        for name, side in expert_image_sizes(config).items()
    }


def prompt_ids(config: AstreaConfig, text_ids: list[int], num_images: int = 1) -> list[int]:
    """BOS, the placeholders of `num_images` images, then the text."""
    return [1] + [config.image_token_id] * (config.num_image_tokens * num_images) + text_ids


#: Python source that makes `modeling_astrea` and `astrea.*` unimportable: the tests run it first in a
#: subprocess to load saved folders as a user without this package would (trust_remote_code).
BLOCK_PACKAGE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_astrea" or name.startswith(("modeling_astrea.", "astrea")):
            raise ModuleNotFoundError(f"{name} is blocked: this process must not see the package")
sys.meta_path.insert(0, Block())
"""


#: A tiny Astrea that vLLM's CPU attention can serve: its LLM's heads are 32 wide (the shipped tiny config's are 8)
SERVABLE_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
SERVABLE_TEXT["head_dim"] = 32


def save_servable_tiny(folder: Path, seed: int = 0, scale: float = 4.0) -> Path:
    """A seeded random tiny Astrea (all four experts) with 32-wide attention heads, and the shipped processor, saved
    to `folder`. Its weights are scaled up by `scale`: at the default initialisation a random model answers every
    image with the same tokens, which would make a token comparison say nothing."""
    from transformers import AutoProcessor

    from modeling_astrea import AstreaForConditionalGeneration

    config = AstreaConfig.from_pretrained(TINY).to_dict()
    config["text_config"].update(SERVABLE_TEXT)
    torch.manual_seed(seed)
    model = AstreaForConditionalGeneration(AstreaConfig.from_dict(config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(TINY).save_pretrained(folder)
    return folder


def torchrun_two(script: Path, *args, timeout: int = 300):
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGS` (gloo on the CPU, a free port chosen by torchrun), with
    this folder importable in the workers; the completed process."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
