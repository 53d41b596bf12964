"""A benchmark in Astrea's local-file format (astrea/evaluation/benchmark.py) as lmms-eval tasks.

    astrea-eval lmms-tasks --data outputs/benchmarks/synthetic/all.jsonl --output outputs/lmms-tasks
    lmms-eval --model astrea --model_args pretrained=outputs/demo/model --include_path outputs/lmms-tasks \\
        --tasks astrea_synthetic --batch_size 16 --output_path outputs/lmms-eval

`write_lmms_tasks` writes one folder: per task of the benchmark (vqa, yes_no, ...) a JSONL of its rows (image
paths made absolute) and a task YAML (`dataset_path: json`, so nothing comes from the Hub), a group YAML naming
them all, and `utils.py`, which points lmms-eval's `!function` hooks at the functions below. Prompts, generation
lengths and scores are those of `astrea-eval run`, so both tools give the same numbers on the same model.
Retrieval rows are left out: lmms-eval has no embedding-retrieval task type.

This module does not import lmms-eval; `astrea.evaluation.lmms_model` holds the model class it runs.
"""

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from . import metrics
from .benchmark import MAX_NEW_TOKENS, SHORT_ANSWER_TOKENS, image_identity, load_benchmark, prompt_text, row_score

#: task -> (metric name, aggregation) for each metric its lmms-eval task reports
TASK_METRICS = {
    "vqa": [("vqa_accuracy", "mean")],
    "multiple_choice": [("accuracy", "mean")],
    "yes_no": [("acc", "mean"), ("acc_plus", "!function utils.acc_plus")],
    "relaxed": [("relaxed_accuracy", "mean")],
    "anls": [("anls", "mean")],
    "caption": [("bleu4", "!function utils.bleu4"), ("cider", "!function utils.cider")],
    "grounding": [("accuracy", "mean")],
}

UTILS = '''"""lmms-eval hooks of the tasks in this folder (written by `astrea-eval lmms-tasks`)."""

from astrea.evaluation.lmms_tasks import (  # noqa: F401
    acc_plus,
    bleu4,
    cider,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_results,
)
'''


# --- the hooks lmms-eval calls (through the folder's utils.py) ---------------------------------------------


def doc_to_visual(doc: dict) -> list:
    from astrea.processing.image_processing_astrea import load_rgb_image

    return [load_rgb_image(doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return prompt_text(doc)


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0] if doc.get("answers") else json.dumps(doc.get("box"))


def process_results(doc: dict, results: list[str]) -> dict:
    """One row's metrics; corpus-level ones (acc+, BLEU, CIDEr) pass what their aggregation needs."""
    prediction = results[0].strip()
    task = doc["task"]
    if task == "caption":
        item = (doc["id"], prediction, list(doc["answers"]))
        return {"bleu4": item, "cider": item}
    if task == "yes_no":
        return {"acc": row_score(doc, prediction), "acc_plus": (image_identity(doc), prediction, doc["answers"][0])}
    return {TASK_METRICS[task][0][0]: row_score(doc, prediction)}


def acc_plus(items: list[tuple]) -> float:
    image_ids, predictions, answers = zip(*items, strict=True)
    return metrics.mme_scores(image_ids, predictions, answers)["acc_plus"]


def _caption_scores(items: list[tuple]) -> dict[str, float]:
    return metrics.caption_scores({i: p for i, p, _ in items}, {i: refs for i, _, refs in items})


def bleu4(items: list[tuple]) -> float:
    return _caption_scores(items)["bleu4"]


def cider(items: list[tuple]) -> float:
    return _caption_scores(items)["cider"]


# --- writing the task folder ---------------------------------------------------------------------------------


def _task_yaml(name: str, task: str) -> str:
    tokens = MAX_NEW_TOKENS.get(task, SHORT_ANSWER_TOKENS)
    metric_lines = "".join(
        f"  - metric: {metric}\n    aggregation: {aggregation}\n    higher_is_better: true\n"
        for metric, aggregation in TASK_METRICS[task]
    )
    return (
        f"# Written by astrea-eval lmms-tasks: the {task} rows of an Astrea benchmark file.\n"
        f"task: {json.dumps(name)}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(name + '.jsonl')}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: !function utils.doc_to_target\n"
        # `until: []`: no stop string, as astrea-eval (lmms-eval would otherwise cut answers at a blank line)
        f"generation_kwargs:\n  max_new_tokens: {tokens}\n  do_sample: false\n  temperature: 0\n  until: []\n"
        "process_results: !function utils.process_results\n"
        f"metric_list:\n{metric_lines}"
        "metadata:\n  version: 1.0\n"
    )


def write_lmms_tasks(data: str | Path, output: str | Path, name: str = "astrea_synthetic", split: str = "test"):
    """Write the lmms-eval task folder `output/<name>/` for the benchmark `data` (a JSONL file or a `datasets`
    folder); returns {task name: rows}. The group task `<name>` runs them all."""
    if not name.isidentifier():
        raise ValueError(f"--name must be a plain identifier (letters, digits, _), got {name!r}.")
    rows = load_benchmark(data, split)
    by_task = defaultdict(list)
    for row in rows:
        if row["task"] != "retrieval":
            by_task[row["task"]].append(row)
    if not by_task:
        raise ValueError(f"Benchmark {data} has only retrieval rows, which lmms-eval cannot run.")
    folder = Path(output) / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob(f"{name}_*.yaml"), *folder.glob(f"{name}_*.jsonl")]:  # an earlier run's tasks
        stale.unlink()
    written = {}
    for task, task_rows in by_task.items():
        task_name = f"{name}_{task}"
        with open(folder / f"{task_name}.jsonl", "w") as file:
            for row in task_rows:
                if not isinstance(row["image"], str):  # a datasets folder's decoded image: stored once, beside
                    identity = image_identity(row)  # the pixels' hash unless the row names its image_id
                    path = folder / "images" / f"{hashlib.sha1(identity.encode()).hexdigest()}.png"
                    if not path.exists():
                        path.parent.mkdir(exist_ok=True)
                        row["image"].convert("RGB").save(path)
                    # rows of one image keep one identity (MME's acc+), as in astrea-eval
                    row = {**row, "image": str(path), "image_id": identity}
                file.write(json.dumps({**row, "image": str(Path(row["image"]).resolve())}) + "\n")
        (folder / f"{task_name}.yaml").write_text(_task_yaml(task_name, task))
        written[task_name] = len(task_rows)
    group = "".join(f"  - {json.dumps(task_name)}\n" for task_name in written)
    (folder / f"{name}.yaml").write_text(
        f"# Written by astrea-eval lmms-tasks\ngroup: {json.dumps(name)}\ntask:\n{group}"
    )
    (folder / "utils.py").write_text(UTILS)
    return written


__all__ = [
    "TASK_METRICS",
    "acc_plus",
    "bleu4",
    "cider",
    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "process_results",
    "write_lmms_tasks",
]
