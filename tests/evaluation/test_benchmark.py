"""Benchmark files: reading and checking them, scoring predictions, the synthetic converter, and astrea-eval."""

import json

import pytest
import torch
from PIL import Image

from astrea.evaluation import benchmark
from astrea.evaluation.cli import main as astrea_eval
from astrea.evaluation.synthetic import SPLITS, synthetic_rows, write_synthetic_benchmark
from astrea.training.data import build_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def image_dir(tmp_path):
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    return tmp_path


def row(**fields):
    return {"id": "q1", "task": "vqa", "image": "a.png", "question": "What?", "answers": ["red"], **fields}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"task": "vqqa"}, "`task` is 'vqqa'"),
        ({"image": "missing.png"}, "missing.png does not exist"),
        ({"question": ""}, "`question` is missing"),
        ({"answers": []}, "`answers` must be a non-empty list"),
        ({"task": "multiple_choice", "options": ["x", "y"], "answers": ["C"]}, "not an option letter (A, B)"),
        ({"task": "multiple_choice", "options": ["x"], "answers": ["A"]}, "at least two option texts"),
        ({"task": "yes_no", "answers": ["maybe"]}, "must be 'yes' or 'no'"),
        ({"task": "grounding", "box": [0.5, 0.1, 0.2, 0.4]}, "must be normalised"),
        ({"task": "grounding", "box": [1, 2]}, "`box` must be [x0, y0, x1, y1]"),
    ],
)
def test_a_bad_row_names_its_line_and_field(image_dir, fields, message):
    path = write_jsonl(image_dir / "bench.jsonl", [row(id="ok"), row(**fields)])
    with pytest.raises(ValueError) as error:
        benchmark.load_benchmark(path)
    assert "line 2" in str(error.value) and message in str(error.value)


def test_invalid_json_repeated_ids_and_empty_files_are_errors(image_dir):
    bad = image_dir / "bad.jsonl"
    bad.write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        benchmark.load_benchmark(bad)
    with pytest.raises(ValueError, match="id 'q1' repeats .*line 1"):
        benchmark.load_benchmark(write_jsonl(image_dir / "twice.jsonl", [row(), row()]))
    with pytest.raises(ValueError, match="has no rows"):
        benchmark.load_benchmark(write_jsonl(image_dir / "empty.jsonl", []))
    with pytest.raises(ValueError, match="does not exist"):
        benchmark.load_benchmark(image_dir / "nowhere.jsonl")


def test_a_datasets_folder_is_a_benchmark_too(image_dir):
    from datasets import Dataset, DatasetDict

    image = Image.open(image_dir / "a.png")
    rows = [{**row(id=str(i)), "image": image} for i in range(3)]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(image_dir / "folder"))
    loaded = benchmark.load_benchmark(image_dir / "folder")
    assert [r["id"] for r in loaded] == ["0", "1", "2"] and loaded[0]["image"].size == (32, 32)
    with pytest.raises(ValueError, match="no 'validation' split"):
        benchmark.load_benchmark(image_dir / "folder", split="validation")


def test_multiple_choice_prompts_list_their_options():
    text = benchmark.prompt_text(row(task="multiple_choice", question="Colour?", options=["red", "blue"]))
    assert text.splitlines()[:3] == ["Colour?", "A. red", "B. blue"]


def test_scores_by_task_and_category_match_hand_computed_values(image_dir):
    rows = [
        row(id="v1", answers=["two"] * 2 + ["2"] + ["three"] * 7, category="count"),  # 3 of 10 say "2"
        row(id="v2", answers=["red"], category="colour"),
        row(id="m1", task="multiple_choice", options=["red", "blue"], answers=["B"]),
        row(id="m2", task="multiple_choice", options=["red", "blue"], answers=["A"]),
        row(id="y1", task="yes_no", answers=["yes"], image_id="i1"),
        row(id="y2", task="yes_no", answers=["no"], image_id="i1"),
        row(id="y3", task="yes_no", answers=["yes"], image_id="i2"),
        row(id="y4", task="yes_no", answers=["no"], image_id="i2"),
        row(id="g1", task="grounding", box=[0.0, 0.0, 0.5, 0.5]),
        row(id="g2", task="grounding", box=[0.0, 0.0, 0.5, 0.5]),
        row(id="r1", task="retrieval", answers=["red", "crimson"]),
        row(id="r2", task="retrieval", answers=["blue"]),
    ]
    predictions = {
        "v1": "2",
        "v2": "Red.",
        "m1": "The answer is B",
        "m2": "blue",
        "y1": "Yes",
        "y2": "no",
        "y3": "yes",
        "y4": "yes",
        "g1": "[0.00, 0.00, 0.50, 0.45]",  # IoU 0.9
        "g2": "somewhere [0.5, 0.5, 1.0, 1.0]",  # IoU 0
    }
    # texts "red", "crimson" (image 0), "blue" (image 1); "red" is closer to image 1, so 2 of 3 texts find theirs
    similarity = torch.tensor([[0.1, 0.9, 0.0], [0.3, 0.2, 0.8]])
    summary = benchmark.score(rows, predictions, (similarity, [[0], [0], [1]]))
    # VQA soft accuracy of "2" against three matching humans out of ten: 0.9 (leave-one-out average)
    assert summary["vqa"]["vqa_accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    assert summary["vqa"]["categories"]["count"]["vqa_accuracy"] == pytest.approx(0.9)
    assert summary["multiple_choice"]["accuracy"] == 0.5
    assert summary["yes_no"] == {"count": 4, "acc": 0.75, "acc_plus": 0.5}  # image i2 has one wrong
    assert summary["grounding"]["accuracy"] == 0.5
    assert summary["retrieval"]["i2t_r@1"] == 1.0 and summary["retrieval"]["t2i_r@1"] == pytest.approx(2 / 3)
    assert benchmark.row_score(rows[8], predictions["g1"]) == 1.0  # a hit (IoU 0.9 > 0.5), as the accuracy counts
    assert benchmark.grounding_iou(rows[8], predictions["g1"]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no prediction for 1 vqa rows"):
        benchmark.score(rows[:2], {"v1": "2"})


def test_the_synthetic_converter_writes_every_split_from_the_data_sets_labels(tmp_path):
    written = write_synthetic_benchmark(tmp_path / "bench", num_images=6, seed=3)
    assert set(written) == {f"{name}.jsonl" for name in (*SPLITS, "all")}
    assert written["all.jsonl"] == sum(written[f"{name}.jsonl"] for name in SPLITS)
    data = build_dataset(num_train=0, num_test=6, seed=3)["test"]
    loaded = {name: benchmark.load_benchmark(tmp_path / "bench" / f"{name}.jsonl") for name in SPLITS}
    assert written["yes_no.jsonl"] == 12 and written["caption.jsonl"] == written["retrieval.jsonl"] == 6
    assert [r["answers"][0] for r in loaded["caption"]] == data["caption"]
    assert len(loaded["vqa"]) == sum(len(q) for q in data["questions"])
    for item in loaded["multiple_choice"]:  # the letter points at the vqa answer of the same question
        same = next(r for r in loaded["vqa"] if r["id"] == item["id"].replace("mc-", "vqa-"))
        assert item["options"][ord(item["answers"][0]) - ord("A")] == same["answers"][0]
    for item in loaded["grounding"]:
        index = int(item["image_id"])
        label = item["question"].removeprefix("Where is the ").removesuffix("?")
        assert item["box"] == pytest.approx(data[index]["boxes"][data[index]["labels"].index(label)])
    assert Image.open(loaded["caption"][0]["image"]).size == (64, 64)
    again = synthetic_rows(data.remove_columns("image"), list(range(6)), seed=3)
    assert again == synthetic_rows(data.remove_columns("image"), list(range(6)), seed=3)  # seeded


@pytest.fixture(scope="module")
def model_folder(tiny_folder):
    return tiny_folder


def test_astrea_eval_writes_a_prediction_per_row_and_a_summary(tmp_path, model_folder, capsys):
    assert astrea_eval(["synthetic", "--output", str(tmp_path / "bench"), "--num-images", "3"]) == 0
    data = tmp_path / "bench" / "all.jsonl"
    code = astrea_eval(
        ["run", "--model", str(model_folder), "--data", str(data), "--output", str(tmp_path / "out")]
        + ["--batch-size", "4", "--max-new-tokens", "3", "--no-progress"]
    )
    assert code == 0
    rows = benchmark.load_benchmark(data)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert all(("prediction" in r) == (r["task"] != "retrieval") for r in records)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["tasks"]) == set(SPLITS) and summary["count"] == len(rows)
    assert summary["tasks"]["retrieval"]["count"] == 3
    assert all(0 <= summary["tasks"]["retrieval"][key] <= 1 for key in ("i2t_r@1", "t2i_r@1"))
    grounding = [r for r in records if r["task"] == "grounding"]
    assert grounding and all(r["score"] == float(r["iou"] > 0.5) for r in grounding)


class EmbeddingStub:
    """Stands in for a model: image embeddings one-hot per image, text embeddings from the text's first token."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def get_image_embeddings(self, index):
        return torch.nn.functional.one_hot(index, 8).float()

    def get_text_embeddings(self, input_ids, attention_mask, pool_mask):
        first = (pool_mask & attention_mask.bool()).int().argmax(dim=1)  # the answer's first token
        return torch.nn.functional.one_hot(input_ids.gather(1, first[:, None])[:, 0] % 8, 8).float()


class IndexInputs:
    def images(self, rows):
        return {"index": torch.tensor([int(row["id"]) for row in rows])}


def test_retrieval_similarity_is_images_by_distinct_texts_with_shared_captions_owned_by_both():
    words = {"USER:": 5, benchmark.RETRIEVAL_PROMPT: 6, "ASSISTANT:": 7, "red": 0, "blue": 1, "green": 2}

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            if isinstance(texts, str):
                return {"input_ids": [words[w] for w in texts.split("|")]}
            ids = torch.tensor([[words[w] for w in text.split("|")] for text in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Processor:
        tokenizer = Tokenizer()

        def apply_chat_template(self, messages, add_generation_prompt=False):
            text = "USER:|" + messages[0]["content"][0]["text"] + "|ASSISTANT:"
            return text + "".join("|" + m["content"][0]["text"] for m in messages[1:])

    rows = [
        {"id": "0", "task": "retrieval", "answers": ["red", "blue"]},
        {"id": "1", "task": "retrieval", "answers": ["red"]},  # the same caption as image 0's first
        {"id": "2", "task": "retrieval", "answers": ["green"]},
    ]
    similarity, owners = benchmark.retrieval_similarity(
        EmbeddingStub(), Processor(), rows, batch_size=2, inputs=IndexInputs(), progress=False
    )
    # texts: red, blue, green, each read as the answer to the description request (embedded from its answer)
    assert similarity.shape == (3, 3) and owners == [[0, 1], [0], [2]]
    assert similarity[0, 0] == 1 and similarity[1, 1] == 1 and similarity[2, 2] == 1


def test_astrea_eval_rejects_bad_arguments_with_one_line(tmp_path, model_folder, capsys):
    assert astrea_eval(["run", "--model", str(tmp_path), "--data", "x.jsonl", "--output", str(tmp_path)]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    args = ["run", "--model", str(model_folder), "--data", "x.jsonl", "--output", str(tmp_path), "--batch-size", "0"]
    assert astrea_eval(args) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    args = ["run", "--model", str(model_folder), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path)]
    assert astrea_eval(args) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
