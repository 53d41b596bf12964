"""Training data in the formats people already have, read into two kinds of records.

- **Conversations** (instruction tuning): `{"id", "source", "type", "images": [image refs], "messages":
  [{"role", "content"}]}`, roles `system` / `user` / `assistant`, each image an `<image>` marker in the text where
  it goes; `type` is the row's `category` or `type` where it has one (evaluation groups by it), else the source,
  and `subgroup` a row's optional `subgroup` (evaluation also reports each type by it).
  From LLaVA conversation JSON (`format: llava`: `id`, `image` as one path or a list, `conversations` of
  `{"from": "human" | "gpt" | "system", "value"}`) and TRL's conversational format (`format: trl`: `messages` with
  typed content parts, `images`). Rows without images, with several images or several turns are all fine.
- **Annotations** (pre-alignment targets): `{"id", "source", "image": ref, "width", "height", "caption", "tags",
  "labels", "boxes", "masks"}`, boxes normalised `[x0, y0, x1, y1]` by the image's real size, masks as COCO
  segmentations (polygons or RLE, decoded at the image's size by `decode_mask`). From COCO captions
  (`coco_captions`), COCO instances (`coco_instances`: boxes `[x, y, w, h]` in pixels, categories, polygon or RLE
  segmentations) and LLaVA-Pretrain (`llava_pretrain`: the `blip_laion_cc_sbu_558k.json` layout, whose answer is
  the caption).

A source is a file (`.json`, `.jsonl`, `.parquet`), a `datasets` folder (`save_to_disk`), or a `datasets` Hub id
(for users who have the Hub). Image refs are file paths (resolved against the source's `image_root`) or
`datasets` image values. Every row is checked where it is read; a bad row is reported with its source, row id and
field, and either stops the run before any model is built (`on_bad_row: error`, the default) or is skipped and
counted (`on_bad_row: skip`).
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
NUM_FRAMES = 8  # frames sampled from a video, as the processor samples them
INSTRUCTION_FORMATS = ("llava", "trl")
ANNOTATION_FORMATS = ("coco_captions", "coco_instances", "llava_pretrain")
FORMATS = INSTRUCTION_FORMATS + ANNOTATION_FORMATS
PHASES = ("prealign", "instruct", "eval")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SourceArgs:
    """One entry of the recipe's `data.sources`."""

    format: str
    path: str
    image_root: str | None = None  # relative image paths are under this folder (else beside the file)
    phases: list[str] = field(default_factory=lambda: ["instruct"])  # which phases it feeds
    name: str | None = None  # how reports name it (the file name otherwise)
    num_samples: int | None = None  # use at most this many rows (the first ones)
    weight: float = 1.0  # repeat the source's rows this many times in the mix (fractions sample without repeats)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.sources: unknown format {self.format!r}; formats are {FORMATS}.")
        unknown = [phase for phase in self.phases if phase not in PHASES]
        if unknown:
            raise ValueError(f"data.sources ({self.path}): unknown phase {unknown[0]!r}; phases are {PHASES}.")
        if self.format in ANNOTATION_FORMATS and "instruct" in self.phases:
            raise ValueError(
                f"data.sources ({self.path}): {self.format} holds pre-alignment targets; give it phases: [prealign]."
            )
        if self.format in INSTRUCTION_FORMATS and "prealign" in self.phases:
            raise ValueError(
                f"data.sources ({self.path}): {self.format} holds conversations, for instruct or eval, not prealign."
            )
        if self.weight <= 0 or (self.num_samples is not None and self.num_samples <= 0):
            raise ValueError(f"data.sources ({self.path}): weight and num_samples must be positive.")
        self.name = self.name or Path(self.path).name


class BadRows:
    """The problems found in the rows read, by source; `finish` stops or logs them (see `on_bad_row`)."""

    def __init__(self, on_bad_row: str = "error"):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', not {on_bad_row!r}.")
        self.on_bad_row = on_bad_row
        self.problems: list[str] = []
        self.counts: Counter = Counter()

    def add(self, source: str, row_id, field_name: str, problem: str) -> None:
        self.problems.append(f"{source}, row {row_id}, {field_name}: {problem}")
        self.counts[source] += 1

    def finish(self) -> None:
        if not self.problems:
            return
        listed = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        if self.on_bad_row == "error":
            raise ValueError(
                f"{len(self.problems)} bad row(s) in the training data (set data.on_bad_row: skip to leave them "
                f"out):\n  {listed}{more}"
            )
        logger.warning(f"skipped {len(self.problems)} bad row(s): {dict(self.counts)}\n  {listed}{more}")


class RowError(ValueError):
    """A problem with one row: the field and what is wrong."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field_name, self.problem = field_name, problem


# --- reading files -----------------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict] | dict:
    """The rows of a source: a JSON list (or a COCO dict), JSON lines, parquet, a `datasets` folder, or a Hub id."""
    local = Path(path)
    if local.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(local))
        return list(data["train"] if isinstance(data, DatasetDict) else data)
    if local.is_file():
        suffix = local.suffix.lower()
        try:
            if suffix == ".json":
                return json.loads(local.read_text())
            if suffix == ".jsonl":
                return [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"data source {path} is not valid JSON ({error}).") from None
        if suffix == ".parquet":
            from datasets import Dataset

            return list(Dataset.from_parquet(str(local)))
        raise ValueError(f"data source {path}: unknown file type {suffix!r}; use .json, .jsonl or .parquet.")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):  # a Hub id such as "org/name"
        from datasets import load_dataset

        return list(load_dataset(path, split="train"))
    raise ValueError(f"data source {path} does not exist.")


def resolve_image(ref, image_root: Path):
    """A path (relative ones under `image_root`), or a `datasets` image value / PIL image as it is."""
    if isinstance(ref, str):
        path = Path(ref)
        return str(path if path.is_absolute() else image_root / path)
    if isinstance(ref, dict) and ref.get("bytes") is None and ref.get("path"):
        return resolve_image(ref["path"], image_root)
    return ref


def image_missing(ref) -> bool:
    if isinstance(ref, str):
        return not os.path.isfile(ref)
    if isinstance(ref, dict):
        return ref.get("bytes") is None
    return ref is None


# --- instruction formats -----------------------------------------------------------------------------------


def check_conversation(messages: list[dict], images: list, videos: int = 0) -> None:
    """Roles, non-empty turns, an assistant turn to learn from, one `<image>` marker per image and one `<video>`
    marker per video, in user turns."""
    if not messages:
        raise RowError("conversations", "empty conversation")
    for index, message in enumerate(messages):
        if message["role"] not in ("system", "user", "assistant"):
            raise RowError(f"conversations[{index}]", f"unknown role {message['role']!r}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise RowError(f"conversations[{index}]", "empty turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise RowError("conversations", "no assistant turn (nothing to learn from)")
    first = messages[1] if messages[0]["role"] == "system" and len(messages) > 1 else messages[0]
    if first["role"] != "user":
        raise RowError("conversations[0]", "the conversation must start with the user (after a system prompt)")
    for marker, given, what in ((IMAGE_MARKER, len(images), "image"), (VIDEO_MARKER, videos, "video")):
        markers = sum(message["content"].count(marker) for message in messages)
        if markers != given:
            raise RowError(what, f"{markers} {marker} marker(s) in the text for {given} {what}(s)")
        for message in messages:
            if message["role"] != "user" and marker in message["content"]:
                raise RowError("conversations", f"a {marker} marker outside a user turn")


def video_frames(video, image_root: Path) -> list:
    """A video's frames, sampled as the processor samples them (`NUM_FRAMES`, spread evenly): from a list of frame
    files, or a folder of them (in name order). Video files are not decoded here."""
    from astrea.processing.processing_astrea import sample_frames

    if isinstance(video, str):
        folder = Path(resolve_image(video, image_root))
        if not folder.is_dir():
            raise RowError("video", f"{video} is not a folder of frames (decode a video file to frames first)")
        frames = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    else:
        frames = [resolve_image(frame, image_root) for frame in video]
    if not frames:
        raise RowError("video", "no frames")
    return sample_frames(frames, NUM_FRAMES)


def llava_conversation(row: dict, image_root: Path) -> dict:
    """A LLaVA row; a video row's `video` (a folder of frames or a list of frame files) with a `<video>` marker."""
    if "conversations" not in row:
        raise RowError("conversations", "missing (is this LLaVA conversation JSON?)")
    images = row.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    messages = []
    for index, turn in enumerate(row["conversations"]):
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise RowError(f"conversations[{index}].from", f"unknown role {turn.get('from')!r}")
        messages.append({"role": role, "content": turn.get("value") or ""})
    videos = [] if row.get("video") is None else [row["video"]]
    check_conversation(messages, images, len(videos))
    images = [resolve_image(image, image_root) for image in images]
    if not videos:
        return {"images": images, "messages": messages, "frames": []}
    frames = video_frames(videos[0], image_root)
    # the images in placeholder order: the video's frames where its marker is
    text = "".join(m["content"] for m in messages)
    before = text[: text.index(VIDEO_MARKER)].count(IMAGE_MARKER)
    return {"images": images[:before] + frames + images[before:], "messages": messages, "frames": [len(frames)]}


def trl_conversation(row: dict, image_root: Path) -> dict:
    if "messages" not in row:
        raise RowError("messages", "missing (is this TRL's conversational format?)")
    images = row.get("images") or []
    messages = []
    for index, message in enumerate(row["messages"]):
        content = message.get("content")
        if isinstance(content, list):  # typed parts: images become markers where they are
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "image":
                    parts.append(IMAGE_MARKER + "\n")
                elif kind == "text":
                    parts.append(part.get("text") or "")
                else:
                    raise RowError(f"messages[{index}].content", f"unknown content part type {kind!r}")
            content = "".join(parts)
        messages.append({"role": message.get("role"), "content": content or ""})
    check_conversation(messages, images)
    return {"images": [resolve_image(image, image_root) for image in images], "messages": messages, "frames": []}


# --- annotation formats ------------------------------------------------------------------------------------


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE with a list of counts, or compressed RLE) -> [H, W] bool."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        if not segmentation or any(len(polygon) < 6 or len(polygon) % 2 for polygon in segmentation):
            raise ValueError("a polygon needs at least 3 (x, y) points")
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE of size {segmentation['size']} for an image of {height}x{width}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"RLE counts sum to {sum(counts)}, not {height}x{width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError("neither polygons nor RLE")
    mask = coco_mask.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"decodes to {mask.shape}, not ({height}, {width})")
    return mask.astype(bool)


def coco_rle(mask: np.ndarray) -> dict:
    """An [H, W] mask -> COCO's compressed RLE (counts as text, as COCO JSON holds them)."""
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def coco_images(data, source: str) -> dict:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"data source {source}: not COCO JSON (a dict with `images` and `annotations`).")
    return {image["id"]: image for image in data["images"]}


def read_annotations(spec: SourceArgs, bad: BadRows) -> list[dict]:
    """Annotation records of a COCO captions / instances or LLaVA-Pretrain source (one per image)."""
    data = read_rows(spec.path)
    root = Path(spec.image_root) if spec.image_root else Path(spec.path).parent
    records: dict = {}

    def record(image_id, image, width, height) -> dict:  # image: resolved (`resolve_image`)
        if image_id not in records:
            records[image_id] = {
                "id": str(image_id), "source": spec.name, "image": image,
                "width": width, "height": height, "caption": None, "tags": [], "labels": [], "boxes": [], "masks": [],
            }  # fmt: skip
        return records[image_id]

    dropped = set()
    if spec.format == "llava_pretrain":
        if not isinstance(data, list):
            raise ValueError(f"data source {spec.path}: not LLaVA-Pretrain JSON (a list of rows).")
        for index, row in enumerate(data):
            row_id = row.get("id", index)
            try:
                converted = llava_conversation(row, root)
                if len(converted["images"]) != 1:
                    raise RowError("image", f"{len(converted['images'])} images; a caption row has one")
                answers = [m["content"] for m in converted["messages"] if m["role"] == "assistant"]
                entry = record(row_id, converted["images"][0], None, None)
                entry["caption"] = answers[0].strip()
            except RowError as error:
                bad.add(spec.name, row_id, error.field_name, error.problem)
        return finish_annotations(list(records.values()), spec, bad)

    images = coco_images(data, spec.path)
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    if spec.format == "coco_instances" and data["annotations"] and not categories:
        raise ValueError(f"data source {spec.path}: COCO instances without `categories`.")
    for index, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id")
        row_id = f"annotation {annotation.get('id', index)} (image {image_id})"
        try:
            image = images.get(image_id)
            if image is None:
                raise RowError("image_id", f"no image with id {image_id}")
            width, height = image.get("width"), image.get("height")
            entry = record(image_id, resolve_image(image["file_name"], root), width, height)
            if spec.format == "coco_captions":
                caption = (annotation.get("caption") or "").strip()
                if not caption:
                    raise RowError("caption", "empty caption")
                entry["caption"] = entry["caption"] or caption  # the first caption of an image
                continue
            if not width or not height:
                raise RowError("images.width/height", "the image's size is needed to normalise boxes and masks")
            label = categories.get(annotation.get("category_id"))
            if label is None:
                raise RowError("category_id", f"unknown category {annotation.get('category_id')!r}")
            box = annotation.get("bbox")
            if not isinstance(box, list) or len(box) != 4:
                raise RowError("bbox", f"expected [x, y, w, h], got {box!r}")
            x, y, w, h = box
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
                raise RowError("bbox", f"{box} is outside the {width}x{height} image or empty")
            segmentation = annotation.get("segmentation")
            if segmentation is not None:
                try:
                    decode_mask(segmentation, height, width)
                except Exception as error:
                    raise RowError("segmentation", f"does not decode ({error})") from None
            entry["labels"].append(label)
            entry["boxes"].append([x / width, y / height, min(1.0, (x + w) / width), min(1.0, (y + h) / height)])
            entry["masks"].append(segmentation)
        except RowError as error:
            bad.add(spec.name, row_id, error.field_name, error.problem)
            dropped.add(image_id)  # an image with a bad object would teach a wrong target: it goes whole
    for image_id in dropped:
        records.pop(image_id, None)
    for image_id, entry in records.items():
        tags = images[image_id].get("tags")  # an image's own tags (what `astrea-data label` writes), else
        entry["tags"] = list(tags) if tags else list(dict.fromkeys(entry["labels"]))  # its categories, in order
    return finish_annotations(list(records.values()), spec, bad)


def finish_annotations(records: list[dict], spec: SourceArgs, bad: BadRows) -> list[dict]:
    kept = []
    for entry in records:
        if image_missing(entry["image"]):
            bad.add(spec.name, entry["id"], "image", f"file {entry['image']} does not exist")
        else:
            kept.append(entry)
    return limit(kept, spec)


def read_conversations(spec: SourceArgs, bad: BadRows) -> list[dict]:
    """Conversation records of a LLaVA or TRL source."""
    rows = read_rows(spec.path)
    if not isinstance(rows, list):
        raise ValueError(f"data source {spec.path}: expected a list of rows, got a {type(rows).__name__}.")
    root = Path(spec.image_root) if spec.image_root else Path(spec.path).parent
    convert = llava_conversation if spec.format == "llava" else trl_conversation
    records = []
    for index, row in enumerate(rows):
        row_id = row.get("id", index) if isinstance(row, dict) else index
        try:
            if not isinstance(row, dict):
                raise RowError("row", f"expected an object, got {type(row).__name__}")
            record = convert(row, root)
            missing = [image for image in record["images"] if image_missing(image)]
            if missing:
                raise RowError("image", f"file {missing[0]} does not exist")
        except RowError as error:
            bad.add(spec.name, row_id, error.field_name, error.problem)
            continue
        kind = row.get("category") or row.get("type")  # a question type, where the data has one (evaluation)
        record = {"id": str(row_id), "source": spec.name, "type": str(kind or spec.name), **record}
        if row.get("subgroup") is not None:  # a finer group within the type that evaluation also reports
            record["subgroup"] = str(row["subgroup"])
        records.append(record)
    return limit(records, spec)


def limit(records: list[dict], spec: SourceArgs) -> list[dict]:
    """The source's `num_samples` (the first rows), then its `weight` (whole repeats, and a share of one more)."""
    if spec.num_samples is not None:
        records = records[: spec.num_samples]
    whole, part = divmod(spec.weight, 1.0)
    return records * int(whole) + records[: round(part * len(records))]


def read_source(spec: SourceArgs, bad: BadRows) -> list[dict]:
    if spec.format in INSTRUCTION_FORMATS:
        return read_conversations(spec, bad)
    return read_annotations(spec, bad)


__all__ = [
    "BadRows",
    "FORMATS",
    "SourceArgs",
    "coco_rle",
    "decode_mask",
    "read_annotations",
    "read_conversations",
    "read_rows",
    "read_source",
]
