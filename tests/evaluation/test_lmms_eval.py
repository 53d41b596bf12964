"""lmms-eval on Astrea: `astrea-eval lmms-tasks` writes a local benchmark as lmms-eval tasks, and the lmms-eval CLI
runs them on an Astrea folder through the `astrea` model registered by our entry point, offline. Its predictions
and scores are checked against `astrea-eval run` on the same model and rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from astrea.evaluation import benchmark, lmms_tasks
from astrea.evaluation.cli import main as astrea_eval


class FunctionTag(yaml.SafeLoader):
    """Reads lmms-eval's `!function utils.x` tags as plain strings."""


FunctionTag.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("lmms")
    assert astrea_eval(["synthetic", "--output", str(root / "bench"), "--num-images", "2"]) == 0
    (root / "model").symlink_to(tiny_folder, target_is_directory=True)
    return root


def test_lmms_tasks_writes_a_task_per_benchmark_task_and_a_group(workspace, capsys):
    data = workspace / "bench" / "all.jsonl"
    assert astrea_eval(["lmms-tasks", "--data", str(data), "--output", str(workspace / "tasks")]) == 0
    assert "--include_path" in capsys.readouterr().out
    folder = workspace / "tasks" / "astrea_synthetic"
    rows = benchmark.load_benchmark(data)
    asked = [row for row in rows if row["task"] != "retrieval"]
    tasks = sorted({row["task"] for row in asked})
    group = yaml.load((folder / "astrea_synthetic.yaml").read_text(), Loader=FunctionTag)
    assert group == {"group": "astrea_synthetic", "task": [f"astrea_synthetic_{task}" for task in group_order(asked)]}
    for task in tasks:
        config = yaml.load((folder / f"astrea_synthetic_{task}.yaml").read_text(), Loader=FunctionTag)
        assert config["dataset_path"] == "json" and config["output_type"] == "generate_until"
        assert config["generation_kwargs"]["max_new_tokens"] == benchmark.MAX_NEW_TOKENS.get(
            task, benchmark.SHORT_ANSWER_TOKENS
        )
        assert [m["metric"] for m in config["metric_list"]] == [m for m, _ in lmms_tasks.TASK_METRICS[task]]
        written = [json.loads(line) for line in (folder / f"astrea_synthetic_{task}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in written] == [r["id"] for r in asked if r["task"] == task]
        assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in written)


def group_order(rows):
    return list(dict.fromkeys(row["task"] for row in rows))


def test_hooks_score_like_astrea_eval(workspace):
    rows = [row for row in benchmark.load_benchmark(workspace / "bench" / "all.jsonl") if row["task"] != "retrieval"]
    predictions = {
        row["id"]: ("yes" if i % 3 else row["answers"][0] if row.get("answers") else "[0.1, 0.1, 0.5, 0.5]")
        for i, row in enumerate(rows)
    }
    expected = benchmark.score(rows, predictions)
    for task, metric_list in lmms_tasks.TASK_METRICS.items():
        task_rows = [row for row in rows if row["task"] == task]
        if not task_rows:
            continue
        results = [lmms_tasks.process_results(row, [predictions[row["id"]]]) for row in task_rows]
        for metric, aggregation in metric_list:
            values = [result[metric] for result in results]
            value = sum(values) / len(values) if aggregation == "mean" else getattr(lmms_tasks, metric)(values)
            assert value == pytest.approx(expected[task][metric]), (task, metric)


def test_bad_arguments_are_one_line_errors(workspace, capsys):
    assert astrea_eval(["lmms-tasks", "--data", str(workspace / "nope.jsonl"), "--output", "x"]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    data = str(workspace / "bench" / "all.jsonl")
    assert astrea_eval(["lmms-tasks", "--data", data, "--output", str(workspace / "x"), "--name", "a-b"]) == 2
    assert "--name must be a plain identifier" in capsys.readouterr().err


def test_lmms_eval_cli_runs_astrea_offline_and_agrees_with_astrea_eval(workspace):
    # astrea-eval's answers first; then the same rows with the references of every other vqa row set to those
    # answers, so that the vqa score is neither 0 nor 1 and a difference in lmms-eval's scoring path shows
    full = workspace / "bench" / "all.jsonl"
    out = workspace / "astrea-out"
    command = ["run", "--model", str(workspace / "model"), "--data", str(full), "--output", str(out)]
    assert astrea_eval(command + ["--batch-size", "1", "--no-progress"]) == 0
    ours = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["task"] != "retrieval":
            ours[record["id"]] = record["prediction"]
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    rows = [row for row in rows if row["task"] != "retrieval"]
    for index, row in enumerate(r for r in rows if r["task"] == "vqa"):
        row["answers"] = [ours[row["id"]]] if index % 2 == 0 and ours[row["id"]].strip() else ["not-an-answer"]
    agree = workspace / "bench" / "agree.jsonl"
    agree.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = benchmark.score(benchmark.load_benchmark(agree), ours)
    assert 0 < expected["vqa"]["vqa_accuracy"] < 1

    tasks = workspace / "cli-tasks"
    assert astrea_eval(["lmms-tasks", "--data", str(agree), "--output", str(tasks), "--name", "tiny_check"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workspace / "hf")}
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "astrea"]
    command += ["--model_args", f"pretrained={workspace / 'model'}", "--tasks", "tiny_check"]
    command += ["--include_path", str(tasks), "--batch_size", "1", "--device", "cpu"]
    command += ["--output_path", str(workspace / "lmms-out"), "--log_samples", "--verbosity", "WARNING"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=workspace)
    outputs = list((workspace / "lmms-out").rglob("*_results.json"))
    assert result.returncode == 0 and outputs, result.stdout[-3000:] + result.stderr[-3000:]  # it exits 0 on errors
    reported = json.loads(outputs[0].read_text())["results"]
    assert {name for name in reported if name != "tiny_check"} == {f"tiny_check_{task}" for task in expected}
    for task, summary in expected.items():
        (samples_file,) = (workspace / "lmms-out").rglob(f"*_samples_tiny_check_{task}.jsonl")
        samples = sorted(
            (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
        )
        task_ids = [row["id"] for row in rows if row["task"] == task]
        # same prompt, template and greedy decoding, no stop string: the same answers, row by row
        assert [sample["filtered_resps"] for sample in samples] == [ours[i].strip() for i in task_ids], task
        for metric, _ in lmms_tasks.TASK_METRICS[task]:
            assert reported[f"tiny_check_{task}"][f"{metric},none"] == pytest.approx(summary[metric]), (task, metric)


class Request:
    """What lmms-eval hands a simple model: `args` = (context, continuation or gen_kwargs, doc_to_visual, doc_id,
    task, split)."""

    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_continuations_log_probability(workspace):
    import torch
    from PIL import Image

    from astrea.evaluation.lmms_model import Astrea

    lmm = Astrea(pretrained=str(workspace / "model"), device="cpu")
    image = Image.new("RGB", (40, 30), "red")
    lmm.task_dict = {"t": {"test": [{"image": image}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    calls = []  # the experts run once for the three options of one question
    hook = lmm.model.model.experts["caption"].register_forward_hook(lambda *_: calls.append(1))
    options = [Request("What colour is it?", option, visual, 0, "t", "test") for option in (" red", " blue", " red")]
    (log_prob, greedy), blue, again = lmm.loglikelihood(options)
    hook.remove()
    assert len(calls) == 1 and again == (log_prob, greedy) and blue[0] != log_prob

    processor, model = lmm.processor, lmm.model
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
        add_generation_prompt=True,
    )
    prompt_length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=[image], text=[prompt + " red"], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    continuation_tokens = inputs["input_ids"].shape[1] - prompt_length
    assert continuation_tokens >= 1
    assert log_prob == pytest.approx(-output.loss_reg.item() * continuation_tokens, rel=1e-4)
    best = output.logits[0, prompt_length - 1 : -1].argmax(-1)
    assert greedy == bool((best == inputs["input_ids"][0, prompt_length:]).all())

    # generate_until: one batch per generation settings, answers in request order, cut at the stop strings
    def alone(tokens):
        output = model.generate(
            **processor(images=[image], text=[prompt], return_tensors="pt"), max_new_tokens=tokens, do_sample=False
        )
        return processor.decode(output[0, prompt_length:], skip_special_tokens=True)

    short, long = alone(2), alone(6)
    stop = long.strip()[len(long.strip()) // 2]  # a character inside the longer answer
    requests = [
        Request("What colour is it?", {"max_new_tokens": 6, "until": []}, visual, 0, "t", "test"),
        Request("What colour is it?", {"max_new_tokens": 2, "temperature": 0}, visual, 0, "t", "test"),
        Request("What colour is it?", {"max_new_tokens": 6, "until": [stop]}, visual, 0, "t", "test"),
    ]
    assert lmm.generate_until(requests) == [long.strip(), short.strip(), long.split(stop)[0].strip()]
    assert long.split(stop)[0].strip() != long.strip()
    with pytest.raises(ValueError, match=r"unknown --model_args \['colour'\]"):
        Astrea(pretrained=str(workspace / "model"), colour="blue")


def test_generate_until_in_batches_gives_the_answers_of_one_request_at_a_time(workspace):
    """--batch_size 3 on 7 requests of two generation settings: batches of 3, 1 and 3 prompts of different lengths
    (0, 1 or 2 images, short and long questions), left-padded; every answer must be the one it gets alone."""
    from PIL import Image

    from astrea.evaluation.lmms_model import Astrea

    docs = [
        {"images": [Image.new("RGB", (40, 30), "red")]},
        {"images": [Image.new("RGB", (20, 50), "blue"), Image.new("RGB", (30, 30), "green")]},
        {"images": []},
        {"images": [Image.new("RGB", (64, 64), "yellow")]},
        {"images": [Image.new("RGB", (50, 20), "purple")]},
    ]
    questions = ["What colour is it?", "Is there a big shape in the top left corner of this picture?", "Name it."]
    questions += ["How many?", "Describe the two images in detail, please, with every shape you see.", "Where?"]
    questions += ["Colour?"]
    settings = [{"max_new_tokens": 4, "until": []}, {"max_new_tokens": 3, "temperature": 0}]
    requests = [
        Request(question, dict(settings[i % 2]), lambda doc: doc["images"], doc_id, "t", "test")
        for i, (question, doc_id) in enumerate(zip(questions, [0, 1, 2, 3, 4, 3, 1], strict=True))
    ]
    answers, masks = {}, {1: [], 3: []}  # the attention mask of each batch the model gets
    for batch_size in (1, 3):
        lmm = Astrea(pretrained=str(workspace / "model"), device="cpu", batch_size=str(batch_size))
        lmm.task_dict = {"t": {"test": docs}}

        def record(texts, images, encode=lmm._inputs, seen=masks[batch_size]):
            batch = encode(texts, images)
            seen.append(batch["attention_mask"])
            return batch

        lmm._inputs = record
        answers[batch_size] = lmm.generate_until(requests)
    assert answers[3] == answers[1]
    assert len(set(answers[1])) >= 5 and all(answers[1])  # distinct answers: a mix-up of rows would show
    assert [len(mask) for mask in masks[1]] == [1] * 7 and [len(mask) for mask in masks[3]] == [3, 1, 3]
    assert all(mask[:, -1].all() for mask in masks[3]) and all((mask[:, 0] == 0).any() for mask in masks[3][::2])


def test_a_datasets_folder_becomes_tasks_with_each_image_stored_once(tmp_path):
    from datasets import Dataset, DatasetDict
    from PIL import Image

    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    base = {"task": "yes_no", "question": "Is it red?", "options": None}
    rows = [
        {**base, "id": "a", "image": red, "answers": ["yes"]},
        {**base, "id": "b", "image": red, "answers": ["no"]},
        {**base, "id": "c", "image": blue, "answers": ["no"]},
    ]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "folder"))
    lmms_tasks.write_lmms_tasks(tmp_path / "folder", tmp_path / "tasks", "from_ds")
    written = [json.loads(line) for line in (tmp_path / "tasks/from_ds/from_ds_yes_no.jsonl").read_text().splitlines()]
    assert len(list((tmp_path / "tasks/from_ds/images").iterdir())) == 2
    assert written[0]["image"] == written[1]["image"] != written[2]["image"]
    assert written[0]["image_id"] == written[1]["image_id"] != written[2]["image_id"]  # acc+ groups by image
