"""Pseudo-labels for pre-alignment from the experts themselves (the Grounded-SAM pattern): for images that only have
captions, the RAM++ tagger's tags, Grounding DINO's boxes for those tags, and SAM2's masks for those boxes.

    astrea-data label --format coco_captions --path captions.json --image-root images/ \\
        --tagger ram-plus/ --detector grounding-dino/ --segmenter sam2/ --out labels/

writes `labels/coco_instances.json`: COCO instances (boxes `[x, y, w, h]` in pixels, one category per tag, masks
as compressed RLE) whose image entries carry their `tags`, the images' `file_name`s as the input gives them. Add it
to a recipe beside the captions, with the same `image_root`:

    - {format: coco_instances, path: labels/coco_instances.json, image_root: images/, phases: [prealign]}

The models: `--tagger` an `AstreaTaggerModel` folder (RAM++ converted, see `convert_ram_plus`), `--detector` a
`GroundingDinoForObjectDetection` folder with its processor (tokenizer), `--segmenter` a `Sam2Model` folder.
Batched, with a progress bar; resumable: each labelled image is a line of `labels/progress-rank<r>.jsonl`, written
as its batch finishes, and a new run skips the images there (a line cut short by a kill is ignored). Under
`accelerate launch` (or torchrun) each process labels its share of the images and the first merges the shares.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers.image_transforms import center_to_corners_format
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .feature_cache import process_rank
from .sources import ANNOTATION_FORMATS, BadRows, SourceArgs, coco_rle, read_annotations

# --- post-processing (each step testable on constructed outputs) ------------------------------------------


def tag_prompt(tags: list[str], tokenizer, max_tokens: int | None = None) -> tuple[str, list[list[int]], list[str]]:
    """Grounding DINO's prompt for these tags ("tag a . tag b ."), per tag the positions of its tokens, and the tags
    it holds: as many as fit in `max_tokens` (the detector's `max_text_len`), in order."""
    kept = list(tags)
    while True:
        text = " . ".join(kept) + " ." if kept else "."
        encoded = tokenizer(text, return_offsets_mapping=True)
        if max_tokens is None or len(encoded["offset_mapping"]) <= max_tokens or not kept:
            break
        kept.pop()
    spans, start = [], 0
    for tag in kept:
        begin = text.index(tag, start)
        end = begin + len(tag)
        spans.append([i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a >= begin and b <= end])
        start = end
    return text, spans, kept


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in a [N, 4] with every box in b [M, 4] (x0, y0, x1, y1)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    spans: list[list[int]],
    size: tuple[int, int],
    threshold: float = 0.3,
    nms_iou: float = 0.7,
    max_boxes: int = 20,
) -> list[tuple[int, float, list[float]]]:
    """One image's Grounding DINO output -> [(tag index, score, [x0, y0, x1, y1] in pixels)], best first.

    logits [Q, L] (per query, per prompt token), boxes [Q, 4] (cx, cy, w, h in [0, 1]), spans: each tag's token
    positions (`tag_prompt`), size (height, width). A query's score for a tag is the highest probability over the
    tag's tokens; it keeps its best tag if that score passes `threshold`; overlapping boxes of the same tag (IoU
    over `nms_iou`) keep the best one."""
    if not spans:
        return []
    probs = logits.float().sigmoid()
    per_tag = torch.stack(
        [probs[:, span].max(dim=1).values if span else probs.new_zeros(len(probs)) for span in spans], 1
    )
    scores, labels = per_tag.max(dim=1)
    height, width = size
    xyxy = center_to_corners_format(boxes.float()).clamp(0, 1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    order = [int(i) for i in scores.argsort(descending=True) if scores[i] > threshold]
    kept: list[int] = []
    for index in order:
        box = xyxy[index]
        if (box[2:] <= box[:2]).any():
            continue  # empty after clamping to the image
        same = [k for k in kept if labels[k] == labels[index]]
        if same and box_iou(box[None], xyxy[same]).max() > nms_iou:
            continue
        kept.append(index)
        if len(kept) == max_boxes:
            break
    return [(int(labels[i]), float(scores[i]), [round(float(v), 2) for v in xyxy[i]]) for i in kept]


def mask_from_logits(low_res: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """SAM2's low-resolution mask logits [h, w] for an image resized to a square -> the [H, W] mask at the image's
    size (bilinear upsampling, then logit > 0)."""
    full = F.interpolate(low_res[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return (full > 0).numpy()


# --- the models --------------------------------------------------------------------------------------------


def square_pixels(images: list[Image.Image], side: int) -> torch.Tensor:
    """Images resized to side x side, scaled to [0, 1] and normalised with ImageNet's statistics (RAM++ and SAM2)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    arrays = [
        np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255 for image in images
    ]
    return torch.stack([(torch.from_numpy(a).permute(2, 0, 1) - mean) / std for a in arrays])


class Labeller:
    """The three models and their settings; `label` turns a batch of images into COCO-ready labels."""

    def __init__(
        self,
        tagger: str,
        detector: str,
        segmenter: str,
        box_threshold: float = 0.3,
        tag_threshold: float | None = None,
        device: str = "cpu",
    ):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, Sam2Model

        from modeling_astrea.modeling_astrea_tagger import AstreaTaggerModel

        self.device = device
        self.tagger = AstreaTaggerModel.from_pretrained(tagger).to(device).eval()
        self.detector = GroundingDinoForObjectDetection.from_pretrained(detector).to(device).eval()
        self.detector_processor = AutoProcessor.from_pretrained(detector)
        self.segmenter = Sam2Model.from_pretrained(segmenter).to(device).eval()
        self.box_threshold, self.tag_threshold = box_threshold, tag_threshold

    @staticmethod
    def _side(config) -> int:
        size = config.image_size
        return size[0] if isinstance(size, (list, tuple)) else size

    @torch.no_grad()
    def label(self, images: list[Image.Image]) -> list[dict]:
        """Per image: {"tags", "objects": [{"label", "score", "bbox": [x, y, w, h], "segmentation": RLE}]}."""
        tag_side = self._side(self.tagger.config.vision_config)
        tags = self.tagger.predict_tags(square_pixels(images, tag_side).to(self.device), self.tag_threshold)
        limit = self.detector.config.max_text_len
        tokenizer = self.detector_processor.tokenizer
        prompts, spans, prompted = zip(*(tag_prompt(t, tokenizer, limit) for t in tags), strict=True)
        inputs = self.detector_processor(images=images, text=list(prompts), return_tensors="pt", padding=True)
        outputs = self.detector(**{k: v.to(self.device) for k, v in inputs.items()})
        found = [
            detections(
                outputs.logits[i].cpu(),
                outputs.pred_boxes[i].cpu(),
                spans[i],
                (im.height, im.width),
                self.box_threshold,
            )
            for i, im in enumerate(images)
        ]
        results = [{"tags": list(t), "objects": []} for t in tags]
        with_boxes = [i for i, boxes in enumerate(found) if boxes]
        if with_boxes:
            side = self._side(self.segmenter.config.vision_config.backbone_config)
            pixels = square_pixels([images[i] for i in with_boxes], side).to(self.device)
            count = max(len(found[i]) for i in with_boxes)
            prompt_boxes = torch.zeros(len(with_boxes), count, 4)
            for row, i in enumerate(with_boxes):  # boxes in the square input's pixels (padding rows repeat the first)
                scale = torch.tensor([side / images[i].width, side / images[i].height] * 2)
                boxes = torch.tensor([box for _, _, box in found[i]]) * scale
                prompt_boxes[row] = torch.cat([boxes, boxes[:1].expand(count - len(boxes), 4)])
            masks = self.segmenter(
                pixel_values=pixels, input_boxes=prompt_boxes.to(self.device), multimask_output=False
            )
            for row, i in enumerate(with_boxes):
                size = (images[i].height, images[i].width)
                for number, (tag, score, (x0, y0, x1, y1)) in enumerate(found[i]):
                    mask = mask_from_logits(masks.pred_masks[row, number, 0].cpu(), size)
                    results[i]["objects"].append(
                        {
                            "label": prompted[i][tag],
                            "score": round(score, 4),
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": coco_rle(mask),
                        }  # fmt: skip
                    )
        return results


# --- the run -----------------------------------------------------------------------------------------------


def read_progress(path: Path) -> dict[str, dict]:
    """The lines a run has written (a last line cut short by a kill is left out)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["id"]] = entry
    return done


def drop_partial_line(path: Path) -> None:
    """Cut a last line a kill left without its end, so that the next lines start on their own."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def write_batch(handle, entries: list[dict]) -> None:
    handle.write("".join(json.dumps(entry) + "\n" for entry in entries))
    handle.flush()
    os.fsync(handle.fileno())


def merge(out: Path, world: int) -> Path:
    """All processes' progress files -> `coco_instances.json` (written whole, then renamed into place)."""
    entries = {}
    for rank in range(world):
        entries.update(read_progress(out / f"progress-rank{rank}.jsonl"))
    images, annotations, categories = [], [], {}
    for number, entry in enumerate(sorted(entries.values(), key=lambda e: e["order"])):
        images.append({"id": number, "file_name": entry["file_name"], "width": entry["width"],
                       "height": entry["height"], "tags": entry["tags"]})  # fmt: skip
        for obj in entry["objects"]:
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": number,
                    "category_id": categories.setdefault(obj["label"], len(categories) + 1),
                    "bbox": obj["bbox"],
                    "segmentation": obj["segmentation"],
                    "score": obj["score"],
                    "iscrowd": 0,
                }  # fmt: skip
            )
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}  # fmt: skip
    target = out / "coco_instances.json"
    temporary = out / ".coco_instances.json.tmp"
    temporary.write_text(json.dumps(data))
    os.replace(temporary, target)
    return target


def run(args: argparse.Namespace) -> Path:
    from astrea.processing.image_processing_astrea import load_rgb_image

    rank, world = process_rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SourceArgs(format=args.format, path=args.path, image_root=args.image_root, phases=["prealign"])
    bad = BadRows(args.on_bad_row)
    records = read_annotations(spec, bad)
    bad.finish()
    root = Path(args.image_root) if args.image_root else Path(args.path).parent
    mine = [(order, record) for order, record in enumerate(records) if order % world == rank]
    progress_path = out / f"progress-rank{rank}.jsonl"
    drop_partial_line(progress_path)
    done = read_progress(progress_path)
    todo = [(order, record) for order, record in mine if record["id"] not in done]
    labeller = Labeller(
        args.tagger, args.detector, args.segmenter, args.box_threshold, args.tag_threshold, args.device
    )
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc=f"labels (process {rank})", unit="image", disable=None
    )
    with open(progress_path, "a") as handle:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            images = [load_rgb_image(record["image"]) for _, record in batch]
            labels = labeller.label(images)
            entries = []
            for (order, record), image, found in zip(batch, images, labels, strict=True):
                name = os.path.relpath(record["image"], root)
                entries.append({"id": record["id"], "order": order, "file_name": name, "width": image.width,
                                "height": image.height, **found})  # fmt: skip
            write_batch(handle, entries)
            bar.update(len(batch))
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        target = merge(out, world)
        print(f"wrote {target} ({len(records)} images); add it to a recipe's data.sources:")
        print(f"  - {{format: coco_instances, path: {target}, image_root: {root}, phases: [prealign]}}")
        return target
    return out / "coco_instances.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="astrea-data label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=ANNOTATION_FORMATS, default="coco_captions", help="the input's format")
    parser.add_argument("--path", required=True, help="the images with captions (COCO captions, LLaVA-Pretrain)")
    parser.add_argument("--image-root", help="folder of the relative image paths (the input file's by default)")
    parser.add_argument("--tagger", required=True, help="AstreaTaggerModel folder (RAM++ converted)")
    parser.add_argument("--detector", required=True, help="GroundingDinoForObjectDetection folder with its processor")
    parser.add_argument("--segmenter", required=True, help="Sam2Model folder")
    parser.add_argument("--out", required=True, help="output folder (coco_instances.json, progress files)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--box-threshold", type=float, default=0.3, help="Grounding DINO score to keep a box")
    parser.add_argument(
        "--tag-threshold", type=float, help="one tag probability for all tags (RAM++'s own by default)"
    )
    parser.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    thresholds = [args.box_threshold] + ([args.tag_threshold] if args.tag_threshold is not None else [])
    if args.batch_size < 1 or not all(0.0 <= t <= 1.0 for t in thresholds):
        parser.error("--batch-size must be positive and the thresholds probabilities")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "label":
        print(
            "usage: astrea-data label --path CAPTIONS --tagger DIR --detector DIR --segmenter DIR --out DIR",
            file=sys.stderr,
        )
        return 2
    args = parse_args(argv[1:])
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        run(args)
    except ValueError as error:
        print(f"astrea-data: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
