import pytest
import torch
from astrea_testing import REPO

from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaModel, AstreaTaggerConfig


def test_defaults_are_the_papers():
    config = AstreaConfig()
    assert config.num_image_tokens == 576  # 24 x 24, Table 1
    assert config.router_top_k == 3  # Table 3
    assert config.image_token_order == "row"  # LLaVA's raster
    assert EXPERT_NAMES == ("caption", "classification", "detection", "segmentation")
    assert type(config.caption_config).__name__ == "SiglipVisionConfig"
    assert type(config.classification_config) is AstreaTaggerConfig
    assert type(config.detection_config).__name__ == "GroundingDinoConfig"
    assert type(config.segmentation_config).__name__ == "Sam2VisionConfig"
    assert config.classification_config.num_tags == 4585


def test_round_trip_through_dict(tiny_config):
    again = AstreaConfig.from_dict(tiny_config.to_dict())
    assert again.to_dict() == tiny_config.to_dict()
    assert again.expert_hidden_sizes == tiny_config.expert_hidden_sizes


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"router_top_k": 5}, "router_top_k=5"),
        ({"router_top_k": 0}, "router_top_k=0"),
        ({"moco_momentum": 1.0}, "moco_momentum"),
        ({"moco_temperature": 0.0}, "moco_temperature"),
        ({"residual_prob": 1.5}, "residual_prob"),
        ({"detection_feature_level": 7}, "detection_feature_level=7"),
        ({"image_token_id": 10**6}, "outside the LLM vocabulary"),
        ({"image_token_order": "diagonal"}, "image_token_order='diagonal' must be 'row' or 'column'"),
    ],
)
def test_bad_knobs_name_the_problem(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        AstreaConfig.from_dict({**tiny_config.to_dict(), **overrides})


def test_expert_sizes_that_do_not_fit_are_rejected(tiny_config):
    classification = tiny_config.classification_config.to_dict()
    classification["vision_width"] = 999  # the Swin encoder ends 64 wide
    with pytest.raises(ValueError, match="vision_width=999"):
        AstreaConfig.from_dict({**tiny_config.to_dict(), "classification_config": classification})
    detection = tiny_config.detection_config.to_dict()
    detection["d_model"] = 48
    with pytest.raises(ValueError, match="d_model=48"):
        AstreaConfig.from_dict({**tiny_config.to_dict(), "detection_config": detection})


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("name, llm_params", [("astrea-13b", 13.0e3), ("astrea-34b", 34.4e3)])
def test_paper_scale_configs_match_the_real_checkpoints(name, llm_params):
    """Parameter counts on the meta device against the released checkpoints' sizes (millions)."""
    config = AstreaConfig.from_pretrained(REPO / "examples" / "configs" / name)
    with torch.device("meta"):
        model = AstreaModel(config)
    experts = model.experts
    assert count(experts["caption"]) == pytest.approx(428, rel=0.01)  # SigLIP-SO400M/14@384
    assert count(experts["classification"].model.vision_model) == pytest.approx(195, rel=0.02)  # Swin-L
    assert count(experts["segmentation"]) == pytest.approx(213, rel=0.02)  # SAM2.1-L image encoder
    assert count(experts["detection"]) == pytest.approx(172, rel=0.02)  # Grounding DINO (Swin-T)
    assert count(model.language_model) == pytest.approx(llm_params, rel=0.02)
    assert config.num_image_tokens == 576 and config.router_top_k == 3


def test_make_configs_writes_the_shipped_folders(tmp_path):
    """`make configs` (examples/configs/build_configs.py) reproduces what is committed: the configs field for field
    (less the transformers version), the tokenizer, processor and chat template byte for byte."""
    import json
    import subprocess
    import sys

    script = REPO / "examples" / "configs" / "build_configs.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = REPO / "examples" / "configs"
    for folder in ("tiny", "astrea-13b", "astrea-34b"):
        names = sorted(p.name for p in (shipped / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / folder).iterdir()), folder
        for name in names:
            want, got = (shipped / folder / name).read_text(), (tmp_path / folder / name).read_text()
            if name == "config.json":
                want, got = json.loads(want), json.loads(got)
                assert want.pop("transformers_version") and got.pop("transformers_version")
            assert got == want, f"{folder}/{name}"
        # written as differences from each sub-config's defaults, not every field of every sub-config
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert "id2label" not in config["caption_config"] and "return_dict" not in config["text_config"], folder
