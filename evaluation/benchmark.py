"""Benchmarks given as local files, and a model evaluated on them (what `astrea-eval run` does).

A benchmark is a JSONL file, one item per line, with images beside it (paths relative to the file's folder), or
a `datasets` folder (`save_to_disk`) with the same columns and `image` as an Image feature:

    id        str, unique
    task      one of TASKS (below)
    image     image path (JSONL) or image (datasets)
    question  the prompt (every task but retrieval)
    answers   list of reference strings: vqa (up to 10 human answers), multiple_choice (the right letter),
              yes_no ("yes"/"no"), relaxed, anls, caption (reference captions), retrieval (the image's captions)
    options   list of option texts (multiple_choice)
    box       [x0, y0, x1, y1], normalised to 0..1 (grounding)
    category  optional: the summary also breaks the task's metric down by it (MME's subtasks, question types...)
    image_id  optional: which rows share an image, for MME's acc+ (default: the image path, or its pixels)

Generated answers are greedy. Multiple-choice prompts list the options as "A. ..." lines, LLaVA's way.
"""

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from astrea.processing.image_processing_astrea import load_rgb_image

from . import metrics

#: task -> the metric its rows are scored with
TASKS = {
    "vqa": "VQA soft accuracy over the answers (exact match with one answer)",
    "multiple_choice": "accuracy of the option letter extracted from the answer",
    "yes_no": "MME acc per question and acc+ per image",
    "relaxed": "ChartQA relaxed accuracy (numbers within 5%)",
    "anls": "DocVQA ANLS",
    "caption": "BLEU-4 and CIDEr (pycocoevalcap)",
    "grounding": "accuracy at IoU > 0.5 of the first box in the answer",
    "retrieval": "recall@1/5/10 image->text and text->image, from the MoCo embeddings",
}
GROUNDING_IOU = 0.5  # a grounding answer is right above this IoU with the target box
MAX_NEW_TOKENS = {"caption": 64, "grounding": 32}  # other tasks: SHORT_ANSWER_TOKENS
SHORT_ANSWER_TOKENS = 16
#: the instruction a retrieval caption answers when MoCo's text side reads it (as in training's caption requests)
RETRIEVAL_PROMPT = "Describe the image briefly."
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


# --- reading and checking ----------------------------------------------------------------------------------


def load_benchmark(path: str | Path, split: str = "test") -> list[dict]:
    """The rows of a benchmark file or `datasets` folder (a DatasetDict's `split`), checked; a bad row is a
    ValueError that names its line (or index) and field."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Benchmark {path} does not exist.")
    if path.is_file():
        rows, where = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
            if isinstance(row.get("image"), str):
                row["image"] = str(path.parent / row["image"])
            rows.append(row)
            where.append(f"{path}, line {number}")
    else:
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"Benchmark {path} has no {split!r} split; it has {sorted(dataset)}.")
            dataset = dataset[split]
        rows = [dict(row) for row in dataset]
        where = [f"{path}, row {index}" for index in range(len(rows))]
    if not rows:
        raise ValueError(f"Benchmark {path} has no rows.")
    seen = {}
    for row, place in zip(rows, where, strict=True):
        check_row(row, place, from_file=path.is_file())
        if row["id"] in seen:
            raise ValueError(f"{place}: id {row['id']!r} repeats {seen[row['id']]}.")
        seen[row["id"]] = place
    return rows


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def check_row(row: dict, place: str, from_file: bool = False) -> None:
    def fail(message: str):
        raise ValueError(f"{place}: {message}")

    if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
        fail("`id` (a string) is missing.")
    row["id"] = str(row["id"])
    task = row.get("task")
    if task not in TASKS:
        fail(f"`task` is {task!r}; tasks are {', '.join(TASKS)}.")
    image = row.get("image")
    if image is None:
        fail("`image` is missing.")
    if from_file and not isinstance(image, str):
        fail(f"`image` must be a file path (relative to the JSONL file), got {type(image).__name__}.")
    if isinstance(image, str) and not Path(image).is_file():
        fail(f"image file {image} does not exist.")
    if task != "retrieval" and not (isinstance(row.get("question"), str) and row["question"].strip()):
        fail(f"`question` is missing (a {task} row needs one).")
    if task == "grounding":
        box = row.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            fail(f"`box` must be [x0, y0, x1, y1], got {box!r}.")
        if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            fail(f"`box` {box} must be normalised (0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1).")
        return
    if not _strings(row.get("answers")):
        fail(f"`answers` must be a non-empty list of strings, got {row.get('answers')!r}.")
    if task == "multiple_choice":
        options = row.get("options")
        if not (_strings(options) and len(options) >= 2):
            fail(f"`options` must list at least two option texts, got {options!r}.")
        letters = [chr(ord("A") + i) for i in range(len(options))]
        if row["answers"][0].strip().upper() not in letters:
            fail(f"the answer {row['answers'][0]!r} is not an option letter ({', '.join(letters)}).")
    if task == "yes_no" and row["answers"][0].strip().lower() not in ("yes", "no"):
        fail(f"a yes_no answer must be 'yes' or 'no', got {row['answers'][0]!r}.")


def prompt_text(row: dict) -> str:
    """The text the model is asked: the question, and a multiple-choice question's options."""
    if row["task"] != "multiple_choice":
        return row["question"]
    options = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(row["options"]))
    return f"{row['question']}\n{options}\n{MULTIPLE_CHOICE_SUFFIX}"


# --- running a model ---------------------------------------------------------------------------------------


class PixelInputs:
    """Model inputs from the rows' images through the processor (the experts run)."""

    def __init__(self, processor):
        self.processor = processor

    def _images(self, rows):
        images = []
        for row in rows:
            try:
                images.append(load_rgb_image(row["image"]))
            except (ValueError, TypeError) as error:
                raise ValueError(f"row {row['id']!r}: {error}") from None
        return images

    def generation(self, rows: list[dict], prompts: list[str]) -> dict:
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
            for prompt in prompts
        ]
        return dict(
            self.processor(
                images=self._images(rows), text=texts, padding=True, padding_side="left", return_tensors="pt"
            )
        )

    def images(self, rows: list[dict]) -> dict:
        inputs = self.processor.image_processor(self._images(rows), return_tensors="pt")
        return {key: value for key, value in inputs.items() if key != "image_sizes"}


def _to(inputs: dict, device) -> dict:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if type(value) is dict:  # expert features; not model outputs, which stay as they are
            return {k: move(v) for k, v in value.items()}
        return value

    return {key: move(value) for key, value in inputs.items()}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


@torch.no_grad()
def predict(
    model,
    processor,
    rows: list[dict],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    inputs=None,
    progress: bool = True,
) -> dict[str, str]:
    """{row id: greedy answer} for every row that asks a question, batched by task (so each batch generates as
    many tokens as its task needs: MAX_NEW_TOKENS, or `max_new_tokens` for all)."""
    inputs = inputs or PixelInputs(processor)
    device = next(model.parameters()).device
    asked = [row for row in rows if row["task"] != "retrieval"]
    by_task = defaultdict(list)
    for row in asked:
        by_task[row["task"]].append(row)
    answers = {}
    with _progress(len(asked), "answering", progress) as bar:
        for task, task_rows in by_task.items():
            tokens = max_new_tokens or MAX_NEW_TOKENS.get(task, SHORT_ANSWER_TOKENS)
            for start in range(0, len(task_rows), batch_size):
                chunk = task_rows[start : start + batch_size]
                batch = _to(inputs.generation(chunk, [prompt_text(row) for row in chunk]), device)
                output = model.generate(**batch, max_new_tokens=tokens, do_sample=False)
                new = output[:, batch["input_ids"].shape[1] :]
                texts = processor.batch_decode(new, skip_special_tokens=True)
                answers.update({row["id"]: text.strip() for row, text in zip(chunk, texts, strict=True)})
                bar.update(len(chunk))
    return answers


@torch.no_grad()
def retrieval_similarity(
    model, processor, rows: list[dict], batch_size: int = 16, inputs=None, progress: bool = True
) -> tuple[torch.Tensor, list[list[int]]]:
    """Cosine similarity of every retrieval row's image to every distinct caption ([images, texts], with the
    model's `get_image_embeddings` / `get_text_embeddings`), and the images each caption belongs to (a caption that
    two images share is one text, right for both). Captions are embedded as MoCo reads its texts in training: as the
    assistant's answer to a request for a description (`RETRIEVAL_PROMPT`) in the chat template, pooled over the
    answer."""
    inputs = inputs or PixelInputs(processor)
    device = next(model.parameters()).device
    chosen = [row for row in rows if row["task"] == "retrieval"]
    images = []
    with _progress(len(chosen), "embedding", progress) as bar:
        for start in range(0, len(chosen), batch_size):
            chunk = chosen[start : start + batch_size]
            images.append(model.get_image_embeddings(**_to(inputs.images(chunk), device)).float().cpu())
            bar.update(len(chunk))
    owners: dict[str, list[int]] = {}
    for index, row in enumerate(chosen):
        for text in dict.fromkeys(row["answers"]):
            owners.setdefault(text, []).append(index)
    texts = list(owners)
    request = [{"role": "user", "content": [{"type": "text", "text": RETRIEVAL_PROMPT}]}]
    prefix = processor.apply_chat_template(request, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    answer_start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    text_embeds = []
    for start in range(0, len(texts), batch_size):
        rendered = [
            processor.apply_chat_template(
                [*request, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
            )
            for text in texts[start : start + batch_size]
        ]
        tokens = tokenizer(rendered, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        answer = torch.arange(tokens["input_ids"].shape[1])[None, :] >= answer_start
        embeds = model.get_text_embeddings(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device), answer.to(device)
        )
        text_embeds.append(embeds.float().cpu())
    return torch.cat(images) @ torch.cat(text_embeds).t(), list(owners.values())


# --- scoring -----------------------------------------------------------------------------------------------


def row_score(row: dict, prediction: str) -> float | None:
    """One row's score under its task's metric (None for corpus-level metrics: captions, retrieval)."""
    task = row["task"]
    if task == "vqa":
        return metrics.vqa_accuracy(prediction, row["answers"])
    if task == "multiple_choice":
        return float(metrics.extract_option(prediction, row["options"]) == row["answers"][0].strip().upper())
    if task == "yes_no":
        return float(metrics.yes_no(prediction) == row["answers"][0].strip().lower())
    if task == "relaxed":
        return max(metrics.relaxed_accuracy(prediction, answer) for answer in row["answers"])
    if task == "anls":
        return metrics.anls(prediction, row["answers"])
    if task == "grounding":
        return float(grounding_iou(row, prediction) > GROUNDING_IOU)
    return None


def grounding_iou(row: dict, prediction: str) -> float:
    """IoU of the first box written in the answer with the row's box (0 without a box)."""
    boxes = metrics.parse_boxes(prediction)
    return metrics.box_iou(boxes[0], row["box"]) if boxes else 0.0


def image_identity(row: dict) -> str:
    if row.get("image_id") is not None:
        return str(row["image_id"])
    if isinstance(row["image"], str):
        return row["image"]
    return hashlib.sha1(load_rgb_image(row["image"], 0).tobytes()).hexdigest()


def _task_metrics(task: str, rows: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    answers = [predictions[row["id"]] for row in rows]
    if task == "caption":
        ids = [row["id"] for row in rows]
        return metrics.caption_scores(
            dict(zip(ids, answers, strict=True)), {row["id"]: row["answers"] for row in rows}
        )
    if task == "yes_no":
        image_ids = [image_identity(row) for row in rows]
        return metrics.mme_scores(image_ids, answers, [row["answers"][0] for row in rows])
    if task == "grounding":
        return {"accuracy": metrics.grounding_accuracy(answers, [row["box"] for row in rows])}
    name = {"vqa": "vqa_accuracy", "relaxed": "relaxed_accuracy", "anls": "anls"}.get(task, "accuracy")
    return {name: sum(row_score(row, answer) for row, answer in zip(rows, answers, strict=True)) / len(rows)}


def score(rows: list[dict], predictions: dict[str, str], retrieval=None) -> dict:
    """Per task: its metrics and count, and the same per category where rows name one. `retrieval` is
    (similarity, text_to_image) from `retrieval_similarity` when the benchmark has retrieval rows."""
    by_task = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    summary = {}
    for task, task_rows in by_task.items():
        if task == "retrieval":
            if retrieval is None:
                raise ValueError("the benchmark has retrieval rows: pass retrieval=(similarity, text_to_image).")
            summary[task] = {"count": len(task_rows), **metrics.retrieval_recall(*retrieval)}
            continue
        missing = [row["id"] for row in task_rows if row["id"] not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} {task} rows (first: {missing[0]!r}).")
        entry = {"count": len(task_rows), **_task_metrics(task, task_rows, predictions)}
        categories = defaultdict(list)
        for row in task_rows:
            if row.get("category") is not None:
                categories[str(row["category"])].append(row)
        if categories:
            entry["categories"] = {
                name: {"count": len(group), **_task_metrics(task, group, predictions)}
                for name, group in sorted(categories.items())
            }
        summary[task] = entry
    return summary


# --- the whole evaluation ----------------------------------------------------------------------------------


def evaluate(
    model,
    processor,
    rows: list[dict],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    inputs=None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """(per-row records, summary by task) of `model` on benchmark rows."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        predictions = predict(model, processor, rows, batch_size, max_new_tokens, inputs, progress)
        retrieval = None
        if any(row["task"] == "retrieval" for row in rows):
            retrieval = retrieval_similarity(model, processor, rows, batch_size, inputs, progress)
    finally:
        model.train(was_training)
    summary = {"count": len(rows), "tasks": score(rows, predictions, retrieval)}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    records = []
    for row in rows:
        record = {key: row[key] for key in ("id", "task", "question", "answers", "box", "category") if key in row}
        if isinstance(row["image"], str):
            record["image"] = row["image"]
        if row["id"] in predictions:
            record["prediction"] = predictions[row["id"]]
            record["score"] = row_score(row, predictions[row["id"]])
            if row["task"] == "grounding":
                record["iou"] = grounding_iou(row, predictions[row["id"]])
        records.append(record)
    return records, summary


def write_results(output_dir: str | Path, records: list[dict], summary: dict) -> Path:
    """`predictions.jsonl` (one record per row) and `summary.json` in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "predictions.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return output_dir


__all__ = [
    "TASKS",
    "PixelInputs",
    "check_row",
    "evaluate",
    "load_benchmark",
    "predict",
    "prompt_text",
    "retrieval_similarity",
    "row_score",
    "score",
    "write_results",
]
