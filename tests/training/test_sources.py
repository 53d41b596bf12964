"""Reading training data in its public formats (small files written here in each format's real layout) and the
bad-row reports."""

import json

import numpy as np
import pytest
from PIL import Image

from astrea.training.sources import BadRows, SourceArgs, decode_mask, read_source


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 20)), ("c.jpg", (32, 16))):
        Image.new("RGB", size, "red").save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def write(path, data) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else "\n".join(json.dumps(row) for row in data))
    return str(path)


def llava_row(row_id, image, *turns, **extra) -> dict:
    """A LLaVA row: turns alternate human / gpt unless given as (role, text)."""
    roles = ("human", "gpt")
    turns = [turn if isinstance(turn, tuple) else (roles[i % 2], turn) for i, turn in enumerate(turns)]
    row = {"id": row_id, "conversations": [{"from": role, "value": value} for role, value in turns], **extra}
    if image is not None:
        row["image"] = image
    return row


def read(spec: dict, on_bad_row="error") -> tuple[list[dict], BadRows]:
    bad = BadRows(on_bad_row)
    return read_source(SourceArgs(**spec), bad), bad


def test_llava_conversations_multi_turn_multi_image_and_text_only(tmp_path, images):
    rows = [
        {
            "id": "one",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "two",
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ]
    for suffix in (".json", ".jsonl"):
        records, bad = read(
            {"format": "llava", "path": write(tmp_path / f"llava{suffix}", rows), "image_root": str(images)}
        )
        assert not bad.problems
        assert [r["id"] for r in records] == ["one", "two", "text"]
        assert [len(r["images"]) for r in records] == [1, 2, 0]
        assert records[1]["images"][1] == str(images / "b.png")
        assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_trl_messages_from_parquet_and_a_datasets_folder(tmp_path, images):
    from datasets import Dataset

    rows = [
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": [Image.open(images / "a.png")],
        }
    ]
    dataset = Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "trl.parquet"))
    dataset.save_to_disk(str(tmp_path / "trl-folder"))
    for path in (tmp_path / "trl.parquet", tmp_path / "trl-folder"):
        records, bad = read({"format": "trl", "path": str(path)})
        assert not bad.problems and len(records) == 1
        assert records[0]["messages"][1]["content"] == "<image>\nColour?"
        (image,) = records[0]["images"]  # the image itself, from the file
        assert isinstance(image, Image.Image) and image.size == (40, 30)


def coco(images_dir) -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
        ],
        "categories": [{"id": 5, "name": "dog"}, {"id": 6, "name": "cat"}],
        "annotations": [],
    }


def test_coco_instances_with_polygons_and_rle_at_the_image_size(tmp_path, images):
    from pycocotools import mask as coco_mask

    data = coco(images)
    square = np.zeros((20, 20), dtype=np.uint8)
    square[5:10, 2:12] = 1
    compressed = coco_mask.encode(np.asfortranarray(square))
    data["annotations"] = [
        # a polygon: the rectangle x 10..30, y 6..18 of the 40x30 image
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 6, 20, 12],
         "segmentation": [[10, 6, 30, 6, 30, 18, 10, 18]]},
        # compressed RLE (as pycocotools writes it, counts as text)
        {"id": 2, "image_id": 2, "category_id": 6, "bbox": [2, 5, 10, 5],
         "segmentation": {"size": [20, 20], "counts": compressed["counts"].decode()}},
        # uncompressed RLE (iscrowd): column-major runs, 0s first
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 1, 2], "iscrowd": 1,
         "segmentation": {"size": [20, 20], "counts": [0, 2, 398]}},
    ]  # fmt: skip
    records, bad = read(
        {
            "format": "coco_instances",
            "path": write(tmp_path / "instances.json", data),
            "phases": ["prealign"],
            "image_root": str(images),
        }
    )
    assert not bad.problems
    first, second = sorted(records, key=lambda r: r["id"])
    assert first["labels"] == ["dog"] and first["tags"] == ["dog"]
    assert first["boxes"] == [[10 / 40, 6 / 30, 30 / 40, 18 / 30]]  # normalised by the real size, not 64
    polygon = decode_mask(first["masks"][0], 30, 40)
    assert polygon.shape == (30, 40) and polygon[6:18, 10:30].mean() > 0.9 and polygon.sum() < 25 * 14
    assert second["labels"] == ["cat", "dog"] and second["tags"] == ["cat", "dog"]
    assert (decode_mask(second["masks"][0], 20, 20) == square.astype(bool)).all()
    crowd = decode_mask(second["masks"][1], 20, 20)
    assert crowd[:2, 0].all() and crowd.sum() == 2


def test_coco_captions_and_llava_pretrain(tmp_path, images):
    data = coco(images)
    data["annotations"] = [
        {"id": 1, "image_id": 1, "caption": "A red picture."},
        {"id": 2, "image_id": 1, "caption": "Another caption."},
        {"id": 3, "image_id": 2, "caption": "Small and red."},
    ]
    records, bad = read(
        {
            "format": "coco_captions",
            "path": write(tmp_path / "captions.json", data),
            "phases": ["prealign"],
            "image_root": str(images),
        }
    )
    assert not bad.problems and {r["caption"] for r in records} == {"A red picture.", "Small and red."}
    pretrain = [  # blip_laion_cc_sbu_558k.json
        {"id": "004539375", "image": "c.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
    ]  # fmt: skip
    spec = {"format": "llava_pretrain", "path": write(tmp_path / "blip.json", pretrain), "image_root": str(images)}
    records, bad = read({**spec, "phases": ["prealign"]})
    assert not bad.problems and records[0]["caption"].startswith("select luxury") and records[0]["id"] == "004539375"


BAD_ROWS = [  # (LLaVA row, the field the report names, words of the problem)
    (llava_row("r1", "missing.png", "<image>\nQ", "A"), "image", "does not exist"),
    (llava_row("r2", "a.png", "Q", "A"), "image", "0 <image> marker(s) in the text for 1 image(s)"),
    (llava_row("r3", "a.png"), "conversations", "empty conversation"),
    (llava_row("r4", None, ("robot", "Q"), "A"), "conversations[0].from", "unknown role 'robot'"),
    (llava_row("r5", None, "Q"), "conversations", "no assistant turn"),
]


def test_each_bad_row_is_named_and_stops_the_run_or_is_skipped_and_counted(tmp_path, images):
    good = llava_row("ok", "a.png", "<image>\nQ", "A")
    path = write(tmp_path / "data.json", [good] + [row for row, _, _ in BAD_ROWS])
    spec = {"format": "llava", "path": path, "image_root": str(images), "name": "mix"}
    bad = BadRows("error")
    read_source(SourceArgs(**spec), bad)
    with pytest.raises(ValueError, match="5 bad row\\(s\\)") as error:
        bad.finish()
    for row, field_name, problem in BAD_ROWS:
        assert f"mix, row {row['id']}, {field_name}: " in str(error.value) and problem in str(error.value)
    records, bad = read(spec, on_bad_row="skip")
    assert [r["id"] for r in records] == ["ok"] and bad.counts == {"mix": 5}
    bad.finish()  # logs, does not raise


def test_bad_coco_objects_drop_their_image(tmp_path, images):
    data = coco(images)
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [30, 6, 20, 12]},  # past the right edge (x 30..50 of 40)
        {"id": 2, "image_id": 2, "category_id": 6, "bbox": [2, 5, 10, 5],
         "segmentation": {"size": [20, 20], "counts": [3, 4]}},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": [2, 5, 10, 5]},
    ]  # fmt: skip
    records, bad = read(
        {"format": "coco_instances", "path": write(tmp_path / "bad.json", data), "phases": ["prealign"]}, "skip"
    )
    assert records == []
    text = "\n".join(bad.problems)
    assert "annotation 1 (image 1), bbox: [30, 6, 20, 12] is outside the 40x30 image" in text
    assert "annotation 2 (image 2), segmentation: does not decode (RLE counts sum to 7, not 20x20)" in text
    assert "annotation 3 (image 2), category_id: unknown category 9" in text


def test_a_missing_or_wrong_source_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read({"format": "llava", "path": str(tmp_path / "nowhere.json")})
    with pytest.raises(ValueError, match="not COCO JSON"):
        read({"format": "coco_captions", "path": write(tmp_path / "list.json", [{"a": 1}]), "phases": ["prealign"]})
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read({"format": "llava", "path": str(tmp_path / "bad.json")})
    with pytest.raises(ValueError, match="unknown format 'sharegpt'"):
        SourceArgs(format="sharegpt", path="x.json")
    with pytest.raises(ValueError, match="give it phases: \\[prealign\\]"):
        SourceArgs(format="coco_instances", path="x.json")


def test_num_samples_and_weight(tmp_path, images):
    rows = [
        {"id": str(i), "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": str(i)}]}
        for i in range(4)
    ]
    path = write(tmp_path / "w.json", rows)
    assert len(read({"format": "llava", "path": path, "num_samples": 3})[0]) == 3
    assert [r["id"] for r in read({"format": "llava", "path": path, "weight": 1.5})[0]] == [
        "0",
        "1",
        "2",
        "3",
        "0",
        "1",
    ]


def test_video_rows_read_their_frames_as_the_processor_samples_them(tmp_path, images):
    frames = tmp_path / "clip"
    frames.mkdir()
    for index in range(10):
        Image.new("RGB", (16, 16), (20 * index, 0, 0)).save(frames / f"{index:03d}.jpg")
    rows = [
        llava_row("folder", None, "<video>\nWhat happens?", "It darkens.", video="clip"),
        llava_row("list", "images/a.png", "<image>\nand <video>\nsame?", "no", video=["clip/000.jpg", "clip/005.jpg"]),
        llava_row("file", None, "<video>\nQ", "A", video="clip.mp4"),
        llava_row("unmarked", None, "Q", "A", video="clip"),
    ]
    records, bad = read(
        {"format": "llava", "path": write(tmp_path / "video.json", rows), "image_root": str(tmp_path)}, "skip"
    )
    assert len(records) == 2, bad.problems
    folder, listed = records
    assert folder["frames"] == [8] and len(folder["images"]) == 8  # 8 of the 10, spread evenly: first and last
    assert folder["images"][0].endswith("000.jpg") and folder["images"][-1].endswith("009.jpg")
    assert (
        listed["frames"] == [2] and listed["images"][0].endswith("a.png") and listed["images"][2].endswith("005.jpg")
    )
    text = "\n".join(bad.problems)
    assert "row file, video: clip.mp4 is not a folder of frames" in text
    assert "row unmarked, video: 0 <video> marker(s) in the text for 1 video(s)" in text
