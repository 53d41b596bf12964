"""The pseudo-labeller (training/labeller.py): each post-processing step on constructed outputs whose right answer
is derived here, then `astrea-data label` end to end on tiny random models, killed and resumed, and on 2
processes."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from astrea_testing import REPO, TINY, torchrun_two
from PIL import Image

from astrea.training.labeller import detections, mask_from_logits, merge, read_progress, tag_prompt
from astrea.training.sources import BadRows, SourceArgs, decode_mask, read_annotations

LOGIT = 8.0  # sigmoid(8) ~ 0.9997: a confident token; -8: an absent one


class WordTokenizer:
    """Whitespace tokens with character offsets, a [CLS] first (as BERT's): enough for tag_prompt."""

    def __call__(self, text, return_offsets_mapping=False):
        offsets, start = [(0, 0)], 0
        for word in text.split(" "):
            offsets.append((start, start + len(word)))
            start += len(word) + 1
        return {"offset_mapping": offsets}


def test_tag_prompt_finds_each_tags_tokens():
    text, spans, kept = tag_prompt(["dog", "red car"], WordTokenizer())
    assert text == "dog . red car ." and kept == ["dog", "red car"]
    # tokens: [CLS] dog . red car .  -> dog at 1, "red car" at 3 and 4
    assert spans == [[1], [3, 4]]
    # the detector's text length: the tags that fit, in order ([CLS] dog . red car . is 6 tokens)
    assert tag_prompt(["dog", "red car", "tree"], WordTokenizer(), max_tokens=6)[2] == ["dog", "red car"]
    assert tag_prompt(["dog", "red car"], WordTokenizer(), max_tokens=5) == ("dog .", [[1]], ["dog"])


def test_detections_score_threshold_labels_boxes_and_nms():
    spans = [[1], [3, 4]]  # two tags, as above; 6 prompt tokens
    logits = torch.full((5, 6), -LOGIT)
    logits[0, 4] = LOGIT  # query 0: tag 1 (its second token), confident
    logits[1, 1] = 2.0  # query 1: tag 0, sigmoid(2) = 0.88
    logits[2, 4] = 3.0  # query 2: tag 1 again, sigmoid(3) = 0.95, on nearly query 0's box: suppressed
    logits[3, 1] = -2.0  # query 3: tag 0 at 0.12: under the threshold
    logits[4, 3] = 1.0  # query 4: tag 1 at 0.73 on a box far from query 0's: kept
    boxes = torch.tensor([
        [0.5, 0.5, 0.2, 0.4],   # centre (0.5, 0.5), 0.2 wide, 0.4 high
        [0.25, 0.25, 0.5, 0.5],
        [0.51, 0.5, 0.2, 0.4],
        [0.5, 0.5, 1.0, 1.0],
        [0.9, 0.1, 0.2, 0.2],   # runs past the right edge: clamped to the image
    ])  # fmt: skip
    found = detections(logits, boxes, spans, size=(50, 100), threshold=0.5, nms_iou=0.7)
    labels = [(tag, round(score, 2)) for tag, score, _ in found]
    assert labels == [(1, 1.0), (0, 0.88), (1, 0.73)]
    # (x0, y0, x1, y1) in pixels of a 100 wide, 50 high image
    assert found[0][2] == [40.0, 15.0, 60.0, 35.0]
    assert found[1][2] == [0.0, 0.0, 50.0, 25.0]
    assert found[2][2] == [80.0, 0.0, 100.0, 10.0]
    assert detections(logits, boxes, [], (50, 100)) == []  # no tags, no boxes
    assert len(detections(logits, boxes, spans, (50, 100), threshold=0.5, nms_iou=1.0)) == 4  # no suppression


def test_mask_from_logits_upsamples_to_the_image_size():
    low = torch.full((8, 8), -5.0)
    low[:, :4] = 5.0  # the left half
    mask = mask_from_logits(low, (30, 60))
    assert mask.shape == (30, 60)
    assert mask[:, :29].all() and not mask[:, 31:].any()


def tiny_models(folder: Path) -> dict[str, str]:
    """Random tiny RAM++ tagger, Grounding DINO detector (with a BERT tokenizer of a small vocabulary) and SAM2,
    saved as `astrea-data label` loads them."""
    from transformers import (
        BertTokenizerFast,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        Sam2Config,
        Sam2Model,
    )

    from modeling_astrea import AstreaConfig
    from modeling_astrea.modeling_astrea_tagger import AstreaTaggerModel

    config = AstreaConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    tagger = AstreaTaggerModel(config.classification_config)
    tagger.save_pretrained(folder / "tagger")
    GroundingDinoForObjectDetection(config.detection_config).save_pretrained(folder / "detector")
    names = tagger.config.names()
    words = sorted({w for name in names for w in name.lower().split()} | {"."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"unused{i}" for i in range(config.detection_config.text_config.vocab_size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=BertTokenizerFast(vocab_file=str(folder / "vocab.txt")),
    )
    processor.save_pretrained(folder / "detector")
    vision = copy.deepcopy(config.segmentation_config)
    side = vision.backbone_config.image_size[0]
    vision.backbone_feature_sizes = [[side // 4] * 2, [side // 8] * 2, [side // 16] * 2]
    hidden = vision.fpn_hidden_size
    sam = Sam2Config(
        vision_config=vision.to_dict(),
        prompt_encoder_config={"hidden_size": hidden, "image_size": side, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 32,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    Sam2Model(sam).save_pretrained(folder / "segmenter")
    return {name: str(folder / name) for name in ("tagger", "detector", "segmenter")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeller")
    models = tiny_models(root / "models")
    images = root / "images"
    images.mkdir()
    coco = {"images": [], "annotations": []}
    for index in range(6):
        size = (48 + 8 * index, 40)
        Image.new("RGB", size, (40 * index, 120, 200 - 30 * index)).save(images / f"{index}.png")
        coco["images"].append({"id": index, "file_name": f"{index}.png", "width": size[0], "height": size[1]})
        coco["annotations"].append({"id": index, "image_id": index, "caption": f"picture {index}"})
    (root / "captions.json").write_text(json.dumps(coco))
    return root, models


def label_args(root: Path, models: dict, out: Path, *extra) -> list[str]:
    return [
        "label", "--path", str(root / "captions.json"), "--image-root", str(root / "images"), "--out", str(out),
        "--tagger", models["tagger"], "--detector", models["detector"], "--segmenter", models["segmenter"],
        "--box-threshold", "0.0", "--tag-threshold", "0.0", "--batch-size", "2", *extra,
    ]  # fmt: skip


def check_output(target: Path, root: Path) -> list[dict]:
    """The labels read back as a recipe reads them: every image, with tags, boxes in the image and masks that decode
    at its size."""
    spec = SourceArgs(format="coco_instances", path=str(target), image_root=str(root / "images"), phases=["prealign"])
    bad = BadRows()
    records = read_annotations(spec, bad)
    assert not bad.problems
    data = json.loads(target.read_text())
    assert sorted(image["file_name"] for image in data["images"]) == [f"{i}.png" for i in range(6)]
    for record in records:
        assert record["tags"]
        for mask in record["masks"]:
            assert decode_mask(mask, record["height"], record["width"]).shape == (record["height"], record["width"])
    return records


def test_label_end_to_end_then_killed_and_resumed(setup, tmp_path):
    """`astrea-data label` on tiny random models (their labels are noise: this checks the plumbing), then the same run
    SIGKILLed right after its second batch and resumed: the resumed run labels only the images left, and the
    result holds every image once."""
    root, models = setup
    command = [str(Path(sys.executable).with_name("astrea-data")), *label_args(root, models, tmp_path / "full")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = check_output(tmp_path / "full" / "coco_instances.json", root)
    assert any(record["boxes"] for record in records)  # with --box-threshold 0, random models find boxes

    killer = [sys.executable, str(Path(__file__).with_name("killed_label.py")), "2"]
    killed = subprocess.run([*killer, *label_args(root, models, tmp_path / "resumed")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    progress = tmp_path / "resumed" / "progress-rank0.jsonl"
    assert len(read_progress(progress)) == 4 and not (tmp_path / "resumed" / "coco_instances.json").exists()
    with open(progress, "a") as handle:
        handle.write('{"id": "half a line')  # a line cut short by the kill
    again = subprocess.run([command[0], *label_args(root, models, tmp_path / "resumed")], cwd=REPO,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in progress.read_text().splitlines() if line.startswith('{"id": "') and line.endswith("}")]
    assert len(lines) == 6  # 4 before the kill, the 2 left after it: none labelled twice
    check_output(tmp_path / "resumed" / "coco_instances.json", root)


def test_two_processes_split_the_images_and_the_first_merges(setup, tmp_path):
    root, models = setup
    result = torchrun_two(
        Path(__file__).with_name("label_ranks.py"), *label_args(root, models, tmp_path / "two"), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shares = [read_progress(tmp_path / "two" / f"progress-rank{rank}.jsonl") for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3 and not set(shares[0]) & set(shares[1])
    check_output(tmp_path / "two" / "coco_instances.json", root)


def test_merge_orders_images_and_names_categories(tmp_path):
    cat = {"label": "cat", "score": 0.5, "bbox": [0, 0, 2, 2], "segmentation": {"size": [4, 4], "counts": "04"}}
    entries = [
        {"id": "b", "order": 1, "file_name": "b.png", "width": 4, "height": 4, "tags": ["cat"], "objects": [cat]},
        {"id": "a", "order": 0, "file_name": "a.png", "width": 4, "height": 4, "tags": ["dog"], "objects": []},
    ]  # fmt: skip
    (tmp_path / "progress-rank0.jsonl").write_text(json.dumps(entries[0]) + "\n")
    (tmp_path / "progress-rank1.jsonl").write_text(json.dumps(entries[1]) + "\n")
    data = json.loads(merge(tmp_path, 2).read_text())
    assert [image["file_name"] for image in data["images"]] == ["a.png", "b.png"]
    assert data["categories"] == [{"id": 1, "name": "cat"}]
    assert data["annotations"][0]["image_id"] == 1 and data["images"][1]["tags"] == ["cat"]


def test_bad_input_is_one_line(setup, tmp_path):
    from astrea.training import labeller

    root, models = setup
    args = label_args(root, models, tmp_path / "x")
    args[args.index("--path") + 1] = str(tmp_path / "nowhere.json")
    assert labeller.main(args) == 1
    assert labeller.main(["tag"]) == 2
