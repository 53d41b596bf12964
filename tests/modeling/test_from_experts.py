"""AstreaForConditionalGeneration.from_experts / AstreaProcessor.from_experts: an Astrea assembled from
pretrained parts saved as tiny random checkpoints in a temporary folder (nothing is downloaded)."""

import json

import pytest
import torch
from astrea_testing import TINY
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertTokenizerFast,
    GroundingDinoForObjectDetection,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Sam2Config,
    Sam2Model,
    SiglipConfig,
    SiglipModel,
)

from astrea.processing import AstreaImageProcessor, AstreaProcessor
from astrea.processing.tokenizer import build_tiny_tokenizer
from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration, AstreaTaggerModel

DETECTION_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "object", "."]


def save_parts(folder, tokenizer=None, tie=False) -> tuple[dict, dict]:
    """Tiny random parts (the tiny config's sub-configs) saved under `folder`: ({name: path}, {name: model})."""
    tiny = AstreaConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    tokenizer = tokenizer or build_tiny_tokenizer()
    text_config = tiny.text_config
    text_config.tie_word_embeddings = tie
    text_config.vocab_size = len(tokenizer)
    llm = LlamaForCausalLM(text_config)
    siglip = SiglipModel(  # a whole SigLIP (text and vision), as google/siglip-* checkpoints are
        SiglipConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 64,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
            vision_config=tiny.caption_config.to_dict(),
        )
    )
    tagger = AstreaTaggerModel(tiny.classification_config)
    dino = GroundingDinoForObjectDetection(tiny.detection_config)  # a detection checkpoint, head included
    sam = Sam2Model(Sam2Config(vision_config=tiny.segmentation_config.to_dict()))
    parts = {"llm": llm, "caption": siglip, "classification": tagger, "detection": dino, "segmentation": sam}
    paths = {}
    for name, part in parts.items():
        part.eval()
        paths[name] = folder / name
        part.save_pretrained(paths[name])
    tokenizer.save_pretrained(paths["llm"])
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(DETECTION_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(paths["detection"])
    return paths, parts


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    paths, parts = save_parts(tmp_path_factory.mktemp("parts"))
    torch.manual_seed(1)
    model = AstreaForConditionalGeneration.from_experts(**paths, image_grid_size=4)
    processor = AstreaProcessor.from_experts(**paths, image_grid_size=4)
    return model, processor, paths, parts


def grounding_dino_level(dino, level: int, **inputs) -> torch.Tensor:
    """One level of a standalone GroundingDinoModel's encoder memory (`encoder_last_hidden_state_vision`, from
    its whole forward) as a map [N, d_model, h, w]. The memory is the projected feature maps flattened level by
    level, so the sizes of the levels are read off the outputs of its `input_proj_vision` convolutions."""
    shapes = []
    hooks = [
        projection.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape[-2:])))
        for projection in dino.input_proj_vision
    ]
    try:
        memory = dino(**inputs).encoder_last_hidden_state_vision  # [N, sum_l h_l * w_l, d_model]
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [height * width for height, width in shapes]
    assert len(shapes) == dino.config.num_feature_levels and sum(sizes) == memory.shape[1]
    tokens = memory.split(sizes, dim=1)[level]  # [N, h * w, d_model], row by row
    return tokens.transpose(1, 2).unflatten(2, shapes[level])


def pixels(seed=0, n=2):
    generator = torch.Generator().manual_seed(seed)
    return lambda side: torch.randn(n, 3, side, side, generator=generator)


def test_every_loaded_part_keeps_its_weights_exactly(assembled):
    model, _, _, parts = assembled
    pairs = {
        "caption": (model.model.experts["caption"].model, parts["caption"].vision_model),
        "classification": (model.model.experts["classification"].model, parts["classification"]),
        "detection": (model.model.experts["detection"].model, parts["detection"].model),
        "segmentation": (model.model.experts["segmentation"].model, parts["segmentation"].vision_encoder),
        "llm": (model.model.language_model, parts["llm"].model),
    }
    for name, (inside, alone) in pairs.items():
        theirs = alone.state_dict()
        if name == "detection":  # the detection head, which Astrea does not use, stays behind
            theirs = {k: v for k, v in theirs.items() if not k.startswith(("decoder.bbox_embed", "decoder.class"))}
        ours = inside.state_dict()
        assert set(ours) == set(theirs), name
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{name}: {key}"
    assert torch.equal(model.lm_head.weight, parts["llm"].lm_head.weight)


@torch.no_grad()
def test_each_part_inside_astrea_gives_the_outputs_it_gives_alone(assembled):
    model, _, paths, parts = assembled
    config = model.config
    make = pixels()
    caption = make(config.caption_config.image_size)
    alone = parts["caption"].vision_model(pixel_values=caption).last_hidden_state
    inside = model.model.experts["caption"].model(pixel_values=caption).last_hidden_state
    torch.testing.assert_close(inside, alone, rtol=0, atol=0)
    tags = make(config.classification_config.vision_config.image_size)
    torch.testing.assert_close(
        model.model.experts["classification"].model(tags).tag_logits, parts["classification"](tags).tag_logits
    )
    segmentation = make(config.segmentation_config.backbone_config.image_size[0])
    inside = model.model.experts["segmentation"](segmentation)
    alone = parts["segmentation"].vision_encoder(pixel_values=segmentation).fpn_hidden_states[-1]
    torch.testing.assert_close(inside, alone)
    # detection: the configured level of the standalone Grounding DINO's encoder memory, prompted with what its own
    # tokenizer makes of "object." (Astrea's default prompt), the whole forward run (Astrea stops after the encoder)
    detection = make(config.detection_config.backbone_config.image_size)
    dino, level = parts["detection"].model, config.detection_feature_level
    bert = BertTokenizerFast.from_pretrained(paths["detection"])
    prompt = bert(["object."] * 2, return_tensors="pt")
    alone = grounding_dino_level(dino, level, pixel_values=detection, **prompt)
    torch.testing.assert_close(model.model.experts["detection"](detection), alone)
    # with a pixel mask (the second image padded on the right) and a padded prompt of its own per image, through
    # get_expert_features: that level is already the 4x4 grid, so Astrea's features are its tokens, row by row
    mask = torch.ones(2, *detection.shape[-2:], dtype=torch.long)
    mask[1, :, detection.shape[-1] // 2 :] = 0
    prompt = bert(["object.", "object. object. object. object."], padding=True, return_tensors="pt")
    assert prompt["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    masked = grounding_dino_level(dino, level, pixel_values=detection, pixel_mask=mask, **prompt)
    assert masked.shape[-2:] == (config.image_grid_size, config.image_grid_size)
    inside = model.get_expert_features(
        detection_pixel_values=detection,
        detection_pixel_mask=mask,
        detection_input_ids=prompt["input_ids"],
        detection_attention_mask=prompt["attention_mask"],
        experts=("detection",),
    )["detection"]
    torch.testing.assert_close(inside, masked.flatten(2).transpose(1, 2))
    assert not torch.allclose(masked, alone, atol=1e-3)  # the mask and the prompt change the features
    # the LLM on text alone: Astrea's logits are the LLM's
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch.testing.assert_close(model(input_ids=ids).logits, parts["llm"](input_ids=ids).logits)


def test_new_modules_are_initialised_and_the_detection_prompt_comes_from_its_tokenizer(assembled):
    model, processor, paths, _ = assembled
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    for module in (model.model.projectors, model.model.router, model.moco.head, model.moco.text_head):
        weights = torch.cat([p.flatten() for p in module.parameters()])
        assert torch.isfinite(weights).all() and 0 < weights.std() < 1
    for online, momentum in zip(model.moco.text_head.parameters(), model.moco.momentum_head.parameters(), strict=True):
        assert torch.equal(online, momentum)
    bert = BertTokenizerFast.from_pretrained(paths["detection"])
    assert model.config.detection_prompt_ids == bert("object.")["input_ids"]
    assert model.config.num_image_tokens == processor.num_image_tokens == 16
    assert model.config.image_token_id == processor.image_token_id
    sizes = processor.image_processor.expert_sizes
    assert sizes["caption"] == model.config.caption_config.image_size
    assert sizes["segmentation"] == model.config.segmentation_config.backbone_config.image_size[0]
    assert all(not p.requires_grad for p in model.model.experts.parameters())  # frozen, as configured


@torch.no_grad()
def test_the_assembled_model_and_processor_generate_and_round_trip(assembled, tmp_path):
    model, processor, _, _ = assembled
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (40, 30), "red")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    again_inputs = AutoProcessor.from_pretrained(tmp_path)(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(again.generate(**again_inputs, max_new_tokens=3, do_sample=False), output)


def test_a_tokenizer_without_an_image_token_gets_one_and_the_embeddings_one_row(tmp_path):
    words = {"<unk>": 0, "</s>": 1, "<s>": 2, "what": 3, "is": 4, "it": 5}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", bos_token="<s>")
    paths, parts = save_parts(tmp_path, tokenizer=tokenizer, tie=True)
    model = AstreaForConditionalGeneration.from_experts(**paths, image_grid_size=4)
    processor = AstreaProcessor.from_experts(**paths, image_grid_size=4)
    assert processor.image_token_id == model.config.image_token_id == len(words)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(words) + 1
    assert torch.equal(embeddings[: len(words)], parts["llm"].get_input_embeddings().weight)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert processor.tokenizer.pad_token == "<unk>" and processor.tokenizer.padding_side == "left"


def test_processor_sizes_come_from_the_model_configs_and_normalisation_from_the_processor_configs(tmp_path):
    """Each expert's input side is the one its weights were built for (its model config); its mean and std are its
    own processor's (`preprocessor_config.json`) where the folder has one, else the expert's usual ones."""
    paths, parts = save_parts(tmp_path)
    custom = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 999, "width": 999}}
    (paths["caption"] / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor", **custom})
    )
    images = AstreaProcessor.from_experts(**paths, image_grid_size=4, detection_size=96).image_processor
    tiny = AstreaConfig.from_pretrained(TINY)
    assert images.expert_sizes == {
        "caption": tiny.caption_config.image_size,  # not the 999 of its processor config
        "classification": tiny.classification_config.vision_config.image_size,
        "detection": 96,
        "segmentation": tiny.segmentation_config.backbone_config.image_size[0],
    }
    assert images.expert_image_mean["caption"] == custom["image_mean"]
    assert images.expert_image_std["caption"] == custom["image_std"]
    defaults = AstreaImageProcessor.expert_image_mean
    assert images.expert_image_mean["segmentation"] == list(defaults["segmentation"])
