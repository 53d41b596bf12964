"""A few steps of every phase on a micro recipe: what trains, what stays frozen, checkpoints, resume, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from astrea_testing import REPO, TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from astrea.training import pipeline
from astrea.training.recipe import Recipe
from modeling_astrea import AstreaForConditionalGeneration


def micro_recipe(tmp_path, cache_dir=None, **sections) -> Recipe:
    """A few steps of each phase; checkpoints only where a test asks for them (save_steps), and the feature cache in
    `cache_dir` (the session's shared one, whose entries are keyed by expert weights and image content)."""
    return Recipe.from_dict(micro_recipe_dict(tmp_path, cache_dir, **sections))


def micro_recipe_dict(tmp_path, cache_dir=None, **sections) -> dict:
    data = {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(cache_dir or tmp_path / "cache"),
        "model": {"config": str(TINY)},
        "data": {"num_train": 12, "num_test": 4},
        "prealign": {
            "stage_steps": [2, 2, 2, 2],
            "batch_size": 4,
            "save_steps": 1000,
            "logging_steps": 1,
            "learning_rate": 1e-2,
        },
        "instruct": {"steps": 3, "batch_size": 4, "save_steps": 1000, "logging_steps": 1, "learning_rate": 1e-2},
        "eval": {"batch_size": 8, "max_new_tokens": 2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


class StageWatch(TrainerCallback):
    """Per stage folder: the parameters that require grad when its training starts, and those that changed."""

    def __init__(self):
        self.stages: dict[str, tuple[set[str], set[str]]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot(model)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.stages[Path(args.output_dir).name] = (self.trainable, changed(self.before, model))


def module_prefixes(names: set[str]) -> set[str]:
    """model.projectors.caption.fc1.weight -> model.projectors.caption; the LLM and the LM head as a whole."""
    out = set()
    for name in names:
        parts = name.split(".")
        if name.startswith("model.language_model."):
            out.add("model.language_model")
        elif parts[0] == "lm_head":
            out.add("lm_head")
        elif name.startswith("model.image_position."):
            out.add("model.image_position")
        else:
            out.add(".".join(parts[:3]))
    return out


@pytest.mark.parametrize(
    "order, joint, train_llm",
    [("forward", False, False), ("reverse", False, True), ("forward", True, False)],
    ids=["forward", "reverse-with-llm", "joint"],
)
def test_prealign_unfreezes_only_each_stages_projector_and_residual(
    tmp_path, feature_cache_dir, order, joint, train_llm
):
    """What `pipeline.prealign` itself makes trainable, stage by stage (Sec. 3.1), and that only that moves (the
    visual tokens' 2-D position embedding, where the model has one, in every stage)."""
    experts = ["caption", "classification", "detection", "segmentation"]
    experts = experts[::-1] if order == "reverse" else experts
    prealign = {"order": experts, "joint": joint, "train_language_model": train_llm}
    if joint:
        prealign["stage_steps"] = [2]
    position = order == "reverse"
    model = {"config": str(TINY), "overrides": {"image_position_embedding": position}}
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir, prealign=prealign, model=model))
    watch = StageWatch()
    ws.callbacks.append(watch)
    pipeline.prealign(ws)
    every_stage = {"model.language_model", "lm_head"} if train_llm else set()
    every_stage |= {"model.image_position"} if position else set()
    if joint:
        expected = {"1-all": {f"model.projectors.{name}" for name in experts} | every_stage}
    else:
        expected = {
            f"{index + 1}-{name}": {f"model.projectors.{name}"}
            | ({f"model.residual_attention.{name}"} if index else set())
            | every_stage
            for index, name in enumerate(experts)
        }
    assert list(watch.stages) == list(expected)
    for stage, modules in expected.items():
        trainable, moved = watch.stages[stage]
        assert module_prefixes(trainable) == modules, stage
        assert moved <= trainable and module_prefixes(moved) == modules, stage  # each unfrozen part learnt
    assert ws.model.model.alignment is None  # back to the routed fusion after the last stage


@pytest.mark.parametrize("options", [False, True], ids=["paper", "prompt-router-and-positions"])
def test_instruct_trains_router_adapters_moco_and_llm_and_fills_the_queue(tmp_path, feature_cache_dir, options):
    overrides = {"router_prompt": options, "router_prompt_dropout": 0.0, "image_position_embedding": options}
    model = {"config": str(TINY), "overrides": overrides}
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir, model=model))
    before = snapshot(ws.model)
    pipeline.instruct(ws)
    moved = changed(before, ws.model)
    prefixes = ["model.router.", "model.adapters.", "moco.head.", "moco.text_head.", "model.language_model."]
    prefixes.append("lm_head.")
    for prefix in prefixes + ["model.prompt_router.", "model.image_position."] * options:
        assert any(n.startswith(prefix) for n in moved), prefix
    assert not any(n.startswith(("model.experts.", "model.projectors.")) for n in moved)
    assert int(ws.model.moco.queue_len) == 3 * 4  # 3 steps x 4 keys


def test_instruct_with_dataloader_workers_trains_on_features_the_workers_read(
    tmp_path, feature_cache_dir, monkeypatch
):
    from astrea.training.collator import AstreaCollator

    collate, pids = AstreaCollator.__call__, tmp_path / "collating-pids"

    def recorded(self, examples):  # which process collates (a file: a worker's list would be its own copy)
        with pids.open("a") as file:
            file.write(f"{os.getpid()}\n")
        return collate(self, examples)

    monkeypatch.setattr(AstreaCollator, "__call__", recorded)
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir, instruct={"dataloader_num_workers": 1}))
    ws.track_heldout = False  # no held-out measure: only the worker reads the cache
    hits, before = ws.cache.hits, snapshot(ws.model)
    pipeline.instruct(ws)
    collators = set(pids.read_text().split())
    assert collators and str(os.getpid()) not in collators  # every batch was collated in a worker
    assert any(n.startswith("model.router.") for n in changed(before, ws.model))
    assert ws.cache.hits >= hits + 3 * 4 * 4  # 3 steps of 4 rows, each row's image from the 4 experts' entries
    assert int(ws.model.moco.queue_len) == 3 * 4


def test_dataloader_workers_leave_the_runs_random_numbers_alone(tmp_path, feature_cache_dir):
    """Over more than one epoch, with a model that draws random numbers (the router's prompt dropout), a run with a
    worker ends with the same weights as one without (kept-alive workers would not: later epochs' loaders would
    draw no seed from the global random state)."""
    model = {"config": str(TINY), "overrides": {"router_prompt": True, "router_prompt_dropout": 0.5}}
    weights, epochs = [], []

    class Epochs(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            epochs.append(state.epoch)

    for workers in (0, 1):
        instruct = {"dataloader_num_workers": workers, "steps": 6, "batch_size": 8}
        recipe = micro_recipe(tmp_path / str(workers), feature_cache_dir, model=model, instruct=instruct)
        recipe.data.num_train, recipe.data.num_test = 4, 2
        ws = pipeline.prepare(recipe, callbacks=[Epochs()])
        ws.track_heldout = False
        pipeline.instruct(ws)
        weights.append(snapshot(ws.model))
    assert len(epochs) == 2 and min(epochs) > 1  # the second epoch's loader is a new one
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=0, rtol=0, msg=name)


def test_focus_examples_are_single_questions_that_contain_the_text():
    examples = [
        {
            "keys": ["a"],
            "frames": [],
            "type": "mixed",
            "messages": [
                {"role": "user", "content": "<image>\nHow many objects are there?"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": "Is the red circle left or right of the blue square?"},
                {"role": "assistant", "content": "left"},
            ],
        },
        {
            "keys": [],
            "messages": [
                {"role": "user", "content": "Is left or right of 2?"},
                {"role": "assistant", "content": "no"},
            ],
        },
        {"key": "b", "prompt": "Is the red cross left or right of the green circle?", "answer": "right"},
        {
            "keys": ["f1", "f2", "f3"],
            "frames": [3],
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<video>\nIs the ball left or right of the box?"},
                {"role": "assistant", "content": "left"},
            ],
        },
    ]
    focus = pipeline.focus_examples(examples, " left or right of ")
    assert [f["messages"] for f in focus] == [
        [
            {"role": "user", "content": "<image>\nIs the red circle left or right of the blue square?"},
            {"role": "assistant", "content": "left"},
        ],
        [{"role": "user", "content": "Is left or right of 2?"}, {"role": "assistant", "content": "no"}],  # no image
        [
            {"role": "user", "content": "<image>\nIs the red cross left or right of the green circle?"},
            {"role": "assistant", "content": "right"},
        ],
        [  # a video's marker for its frames, and the system prompt kept
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "<video>\nIs the ball left or right of the box?"},
            {"role": "assistant", "content": "left"},
        ],
    ]
    assert [f["keys"] for f in focus] == [["a"], [], ["b"], ["f1", "f2", "f3"]] and focus[0]["type"] == "mixed"
    assert [f["frames"] for f in focus] == [[], [], [], [3]]
    assert pipeline.focus_examples(examples, "What colour") == []


class StageRows(TrainerCallback):
    """Per stage folder: the user turns of the rows its Trainer trains on."""

    def __init__(self):
        self.questions: dict[str, list[str]] = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        rows = train_dataloader.dataset
        self.questions[Path(args.output_dir).name] = [
            message["content"]
            for row in rows
            for conversation in (row.get("branches") or [row["messages"]])
            for message in conversation
            if message["role"] == "user"
        ]


def test_a_focus_stage_trains_on_its_questions_alone_then_the_mix_again(tmp_path, feature_cache_dir):
    focus = {"focus_text": "How many objects", "focus_steps": 2, "refocus_steps": 1, "image_branches": 4}
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir, instruct=focus))
    watch = StageRows()
    ws.callbacks.append(watch)
    records = pipeline.instruct(ws)
    assert [(r["stage"], r["steps"]) for r in records] == [("instruct", 3), ("instruct-focus", 2), ("instruct-mix", 1)]
    assert list(watch.questions) == ["instruct", "instruct-focus", "instruct-mix"]
    focused = watch.questions["instruct-focus"]
    assert focused and all("How many objects" in question for question in focused)
    for mix in ("instruct", "instruct-mix"):
        assert any("How many objects" not in question for question in watch.questions[mix])
        assert len(watch.questions[mix]) > len(focused)
    stages = tmp_path / "run" / "stages"
    assert all((stages / name / "stage.json").is_file() for name in ("instruct-focus", "instruct-mix"))
    # a text no question contains is refused before that stage trains
    ws.recipe.instruct.focus_text = "What is the capital of"
    with pytest.raises(ValueError, match="no instruction question contains it"):
        pipeline.instruct(ws)


def test_instruct_with_lora_merges_into_a_plain_model(tmp_path, feature_cache_dir):
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir, instruct={"lora": True, "lora_rank": 4}))
    base = snapshot(ws.model)
    pipeline.instruct(ws)
    assert type(ws.model) is AstreaForConditionalGeneration
    merged = dict(ws.model.named_parameters())
    assert not torch.equal(
        merged["model.language_model.layers.0.self_attn.q_proj.weight"],
        base["model.language_model.layers.0.self_attn.q_proj.weight"],
    )
    assert not any("lora" in name for name in merged)
    ws.resume = True  # a resumed run loads the finished LoRA stage as a plain model
    again = pipeline.instruct(ws)
    assert [r["stage"] for r in again] == ["instruct"] and type(ws.model) is AstreaForConditionalGeneration


def test_full_run_writes_model_metrics_and_plots(tmp_path, feature_cache_dir):
    metrics = pipeline.run(micro_recipe(tmp_path, feature_cache_dir))
    out = tmp_path / "run"
    for name in ("metrics.json", "router.png", "stages.png", "model/config.json", "model/processor_config.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["accuracy"]) == set(saved["chance"]) and saved["minutes"] > 0
    assert [s["stage"] for s in saved["stages"]] == [
        "1-caption",
        "2-classification",
        "3-detection",
        "4-segmentation",
        "instruct",
    ]
    assert metrics["feature_cache"]["hit_rate"] > 0.5
    AstreaForConditionalGeneration.from_pretrained(out / "model")


def astrea_train(*args, timeout=300) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("astrea-train")), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_resumed_run_loads_the_tiny_experts_its_first_run_pre_trained(tmp_path, feature_cache_dir, monkeypatch):
    """The tiny experts are pre-trained once per run and written beside its stages; `--resume` loads them rather
    than pre-training again (which on another machine or thread count gives other weights than the stages were
    aligned with), unless the recipe now asks for other experts."""
    pretraining = {"steps": 2, "batch_size": 4, "num_images": 8}
    recipe = micro_recipe(tmp_path, feature_cache_dir, expert_pretraining=pretraining)
    start = micro_recipe(tmp_path / "untrained", feature_cache_dir)  # the same model without pre-training
    untrained = pipeline.build_model(start)[0].model.experts.state_dict()
    first = pipeline.prepare(recipe).model.model.experts.state_dict()
    path = tmp_path / "run" / pipeline.EXPERTS_FILE
    saved = load_file(path)
    assert set(saved) == {f"model.experts.{name}" for name in first}
    assert all(torch.equal(saved[f"model.experts.{name}"], tensor) for name, tensor in first.items())
    assert any(not torch.equal(untrained[name], tensor) for name, tensor in first.items())  # they were trained
    # the file, not a second pre-training, is what a resumed run gets: altered here so the two cannot agree
    key = next(name for name in saved if name.startswith("model.experts.caption.") and "weight" in name)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    save_file({**saved, key: saved[key] + 1.0}, path, metadata=metadata)
    calls = []
    monkeypatch.setattr(pipeline, "pretrain_experts", lambda *args, **kwargs: calls.append(args) or {})
    resumed = pipeline.prepare(recipe, resume=True).model.state_dict()
    assert not calls
    for name, tensor in saved.items():
        torch.testing.assert_close(resumed[name], tensor + (1.0 if name == key else 0.0), rtol=0, atol=0)
    # other data to pre-train on, or other expert_pretraining settings: pre-trained again (by the stand-in here)
    # and written anew
    other_data = micro_recipe(tmp_path, feature_cache_dir, expert_pretraining=pretraining, data={"num_train": 13})
    pipeline.prepare(other_data, resume=True)
    assert len(calls) == 1
    changed_recipe = micro_recipe(tmp_path, feature_cache_dir, expert_pretraining={**pretraining, "steps": 3})
    pipeline.prepare(changed_recipe, resume=True)
    assert len(calls) == 2
    rewritten = load_file(path)  # what the stand-in left: the untrained experts
    assert all(torch.equal(rewritten[f"model.experts.{name}"], tensor) for name, tensor in untrained.items())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`astrea-train prealign` SIGKILLed right after stage 2 saved its checkpoint at step 2 (a child process, so
    nothing gets to clean up), then `astrea-train prealign --resume`; and the same recipe run without a kill."""
    root = tmp_path_factory.mktemp("resume")
    sections = {"prealign": {"stage_steps": [2, 3, 2, 2], "save_steps": 1}}
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(micro_recipe_dict(root, root / "cache", **sections)))
    killer = Path(__file__).with_name("killed_run.py")
    killed = subprocess.run(
        [sys.executable, str(killer), "2-classification", "2", "prealign", "--recipe", str(recipe_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stages = root / "run" / "stages"
    before = {
        "killed": killed,
        "checkpoints": sorted(p.name for p in (stages / "2-classification").glob("checkpoint-*")),
        "stage_2_finished": (stages / "2-classification" / "stage.json").exists(),
        "stage_1": (stages / "1-caption" / "stage.json").read_text(),
        "stage_1_weights": (stages / "1-caption" / "model" / "model.safetensors").stat().st_mtime_ns,
    }
    (stages / "2-classification" / "checkpoint-3").mkdir()  # as a kill in the middle of a save would leave it
    resumed = astrea_train("prealign", "--recipe", str(recipe_file), "--resume")
    reference = pipeline.run(micro_recipe(root / "reference", root / "cache", **sections), ("prealign",))
    return root, recipe_file, before, resumed, reference


def test_a_killed_stage_resumes_from_its_checkpoint_and_finished_stages_load(killed_and_resumed):
    root, _, before, resumed, _ = killed_and_resumed
    assert before["killed"].returncode == -signal.SIGKILL, before["killed"].stderr[-3000:]
    assert before["checkpoints"] == ["checkpoint-1", "checkpoint-2"] and not before["stage_2_finished"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stages = root / "run" / "stages"
    # stage 1 finished before the kill: loaded, not trained again
    assert "stage 1-caption: finished in an earlier run, loading it" in resumed.stderr
    assert (stages / "1-caption" / "stage.json").read_text() == before["stage_1"]
    assert (stages / "1-caption" / "model" / "model.safetensors").stat().st_mtime_ns == before["stage_1_weights"]
    # what it loaded: the weights stage 1 trained (its projector), under the model's own names, not a second model
    with safe_open(stages / "1-caption" / pipeline.TRAINED_FILE, "pt") as trained:
        assert trained.keys() and all(key.startswith("model.projectors.caption.") for key in trained.keys())
    # stage 2 continued from its last complete checkpoint (step 2; not the half-written checkpoint-3): only step 3
    # trained in the resumed run
    record = json.loads((stages / "2-classification" / "stage.json").read_text())
    assert record["resumed_from"] == 2
    assert [step for step, _ in record["loss"]] == [3]
    for later in ("3-detection", "4-segmentation"):
        assert json.loads((stages / later / "stage.json").read_text())["resumed_from"] is None


def test_the_resumed_run_ends_where_an_uninterrupted_one_does(killed_and_resumed):
    root, *_ = killed_and_resumed
    final_a = AstreaForConditionalGeneration.from_pretrained(root / "reference" / "run" / "model").state_dict()
    final_b = AstreaForConditionalGeneration.from_pretrained(root / "run" / "model").state_dict()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_instruct_from_a_model_folder_on_the_command_line(killed_and_resumed):
    """`astrea-train instruct --model DIR`, DIR the last pre-alignment stage's folder (as astrea-13b.yaml says):
    starts from that folder's weights (the projectors, which instruction tuning keeps frozen, come out unchanged),
    with the `--set model.overrides` given on top of its config, trains, evaluates and prints the table."""
    root, recipe_file, *_ = killed_and_resumed
    source = root / "run" / "stages" / "4-segmentation" / "model"
    result = astrea_train(
        "instruct", "--recipe", str(recipe_file), "--model", str(source), "--output-dir", str(root / "sft"),
        "--set", "model.overrides.router_aux_loss_coef=0.25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert AstreaForConditionalGeneration.from_pretrained(source).config.router_aux_loss_coef == 0.0
    assert json.loads((root / "sft" / "model" / "config.json").read_text())["router_aux_loss_coef"] == 0.25
    # an override that reshapes the folder's weights is a one-line error, before any training
    bad = astrea_train(
        "instruct", "--recipe", str(recipe_file), "--model", str(source), "--output-dir", str(root / "sft-bad"),
        "--set", "model.overrides.adapter_hidden_size=3",
    )  # fmt: skip
    assert bad.returncode == 2
    assert "astrea-train: model.overrides / model.text_overrides" in bad.stderr
    assert "change the shape of weights in" in bad.stderr and not (root / "sft-bad" / "stages").exists()
    assert "| question type | accuracy | chance | n |" in result.stdout
    metrics = json.loads((root / "sft" / "metrics.json").read_text())
    assert [stage["stage"] for stage in metrics["stages"]] == ["instruct"]
    start = AstreaForConditionalGeneration.from_pretrained(source).state_dict()
    tuned = AstreaForConditionalGeneration.from_pretrained(root / "sft" / "model").state_dict()
    projectors = [name for name in start if name.startswith("model.projectors.")]
    assert projectors and all(torch.equal(start[name], tuned[name]) for name in projectors)
    assert not torch.equal(start["model.router.weight"], tuned["model.router.weight"])


def test_bad_rows_are_named(tmp_path):
    from datasets import DatasetDict

    from astrea.training.data import build_dataset

    data = build_dataset(4, 2)
    broken = data["train"].cast_column("image", data["train"].features["image"].__class__(decode=False))
    rows = broken.to_list()
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    fixed = DatasetDict({"train": type(data["train"]).from_list(rows, features=broken.features), "test": data["test"]})
    fixed.save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError, match="train row 2: its image does not decode"):
        pipeline.prepare(micro_recipe(tmp_path, data={"path": str(tmp_path / "data")}))
    rows[2]["image"] = None
    DatasetDict(
        {"train": type(data["train"]).from_list(rows, features=broken.features), "test": data["test"]}
    ).save_to_disk(tmp_path / "data2")
    with pytest.raises(ValueError, match="train row 2 has no image"):
        pipeline.prepare(micro_recipe(tmp_path, data={"path": str(tmp_path / "data2")}))


def one_optimizer_step(ws, examples, batch_size: int, accumulation: int, use_moco: bool, **config):
    """One SGD step of instruction tuning from the same start: (parameters after, momentum head after, trainer)."""
    from datasets import Dataset

    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(ws.model.config).train()
    model.load_state_dict(ws.model.state_dict())
    model.config.use_moco = use_moco
    pipeline.set_trainable(
        model, [model.model.router, model.model.adapters, model.moco.head, model.moco.text_head], language_model=True
    )
    args = ws.recipe.instruct
    settings = pipeline.sft_config(args, 1, ws.output_dir / f"ga-{accumulation}", ws.recipe.seed)
    settings = dataclasses.replace(
        settings,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",  # an update proportional to the gradient (Adam's first step is its sign, whatever its scale)
        learning_rate=0.5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,  # no clipping: it would hide a wrong scale
        save_steps=1000,
        **config,
    )
    trainer = pipeline.AstreaSFTTrainer(
        model=model,
        args=settings,
        train_dataset=Dataset.from_list(examples),
        data_collator=ws.collator,
        processing_class=ws.processor.tokenizer,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_gradient_accumulation_gives_the_one_batch_update(tmp_path, feature_cache_dir):
    """Four micro-batches of 2 accumulated into one optimizer step move every parameter as one batch of the same 8
    examples does (the Trainer's `num_items_in_batch`: before, the model's mean loss per micro-batch made the
    accumulated gradient 4 times too large)."""
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir))
    examples = pipeline.instruction_examples(ws.data["train"], ws.keys["train"], ["questions"])[:8]
    start = {n: p.detach().clone() for n, p in ws.model.named_parameters()}
    whole, _ = one_optimizer_step(ws, examples, batch_size=8, accumulation=1, use_moco=False)
    accumulated, _ = one_optimizer_step(ws, examples, batch_size=2, accumulation=4, use_moco=False)
    moved = [n for n in whole if not torch.equal(whole[n], start[n])]
    assert any(n.startswith("model.language_model.") for n in moved) and any("router" in n for n in moved)
    for name in moved:
        torch.testing.assert_close(accumulated[name] - start[name], whole[name] - start[name], atol=2e-6, rtol=2e-3)


def test_the_momentum_head_moves_once_per_optimizer_step(tmp_path, feature_cache_dir):
    """Eq. 8 once per optimizer step, at its start (before its keys, as in MoCo): after one step of 4
    accumulated micro-batches theta_M = m * theta_M + (1 - m) * theta_E with the online head as it was before the
    step (before, once per micro-batch: m to the 4th)."""
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir))
    ws.model.moco.reset_momentum_head()
    with torch.no_grad():
        for p in ws.model.moco.text_head.parameters():
            p.add_(0.5)  # online and momentum text heads differ from the start
    momentum_before = [p.detach().clone() for p in ws.model.moco.momentum_head.parameters()]
    online_before = [p.detach().clone() for p in ws.model.moco.text_head.parameters()]
    examples = pipeline.instruction_examples(ws.data["train"], ws.keys["train"], ["questions"])[:8]
    after, trainer = one_optimizer_step(ws, examples, batch_size=2, accumulation=4, use_moco=True)
    m = ws.model.config.moco_momentum
    model = trainer.model
    assert model.moco.update_in_forward  # handed back after training
    momentum_after = list(model.moco.momentum_head.parameters())
    for momentum, old, online in zip(momentum_after, momentum_before, online_before, strict=True):
        torch.testing.assert_close(momentum, m * old + (1 - m) * online)
    assert any("moco.text_head" in n and not torch.equal(after[n], p) for n, p in ws.model.named_parameters())


def test_the_logged_loss_parts_are_means_under_gradient_accumulation(tmp_path, feature_cache_dir):
    """loss_reg in the log is each micro-batch's token mean (the model returns its share of the batch's loss)."""
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir))
    examples = pipeline.instruction_examples(ws.data["train"], ws.keys["train"], ["questions"])[:8]
    _, accumulated = one_optimizer_step(ws, examples, batch_size=2, accumulation=4, use_moco=False)
    _, whole = one_optimizer_step(ws, examples, batch_size=8, accumulation=1, use_moco=False)
    logged = [entry for entry in accumulated.state.log_history if "loss_reg" in entry][0]
    whole_logged = [entry for entry in whole.state.log_history if "loss_reg" in entry][0]
    # a mean of micro-batch means against the batch's mean: close, not a quarter of it
    assert float(logged["loss_reg"]) == pytest.approx(float(whole_logged["loss_reg"]), rel=0.05)
    assert float(logged["loss"]) == pytest.approx(float(whole_logged["loss"]), rel=1e-4)


def test_group_by_length_batches_examples_of_about_the_same_length(tmp_path, feature_cache_dir, monkeypatch):
    """With group_by_length the stage's batches hold examples of neighbouring lengths (short questions apart from
    long caption requests), so they carry less padding than the same stage with random batches."""
    from astrea.training.collator import AstreaCollator

    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir))
    ws.save_stages = ws.track_heldout = False
    examples = pipeline.instruction_examples(ws.data["train"], ws.keys["train"], ["questions", "caption"])[:40]
    lengths = [ws.collator.length(example) for example in examples]
    assert max(lengths) - min(lengths) > 10  # captions and questions: lengths that grouping can tell apart
    seen: list[list[int]] = []
    call = AstreaCollator.__call__

    def recording(self, batch_examples):
        batch = call(self, batch_examples)
        seen.append(batch["attention_mask"].sum(dim=1).tolist())
        return batch

    monkeypatch.setattr(AstreaCollator, "__call__", recording)

    def padding(group_by_length: bool, name: str) -> int:
        seen.clear()
        args = dataclasses.replace(ws.recipe.instruct, batch_size=4, group_by_length=group_by_length)
        pipeline.run_stage(ws, name, ws.model, examples, args, 10, None)
        assert len(seen) == 10 and sorted(sum(seen, [])) == sorted(lengths)  # one epoch: every example once
        return sum(max(batch) - n for batch in seen for n in batch)

    grouped, random_order = padding(True, "grouped"), padding(False, "random")
    ordered = sorted(lengths, reverse=True)
    least = sum(max(chunk) - n for i in range(0, 40, 4) for chunk in [ordered[i : i + 4]] for n in chunk)
    # (the sampler sorts within groups of a few batches, not the whole epoch: "least" is a bound, not the result)
    assert least <= grouped < random_order / 1.5


def test_length_groups_come_in_an_order_drawn_from_the_seed_and_the_epoch():
    """The grouped sampler's order is the same for the same seed and epoch (every process, and a resumed run, see
    the batches the first run saw), differs between epochs, and mixes the groups' batches instead of giving a run of
    steps the longest examples first; each batch still holds neighbouring lengths."""
    lengths = [(i * 37) % 400 for i in range(400)]
    sampler = pipeline.ShuffledLengthGroups(4, lengths, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and list(pipeline.ShuffledLengthGroups(4, lengths, seed=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    torch.manual_seed(0)  # the global random state plays no part
    sampler.set_epoch(0)
    assert list(sampler) == first
    batches = [[lengths[i] for i in first[b : b + 4]] for b in range(0, 400, 4)]
    maxima = [max(batch) for batch in batches]
    assert maxima != sorted(maxima, reverse=True)  # batches in a random order
    spreads = [max(batch) - min(batch) for batch in batches]
    assert sum(spreads) / len(spreads) < 20  # random batches of four would spread over about 240


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tmp_path, feature_cache_dir):
    """`compile_language_model` (run_stage): each LLM layer compiled in place for the stage, dynamic shapes; the loss
    and every gradient as in eager mode on batches of two lengths, the parameter names (what a checkpoint holds)
    unchanged, and the layers eager again after the stage."""
    ws = pipeline.prepare(micro_recipe(tmp_path, feature_cache_dir))
    model = ws.model
    pipeline.set_trainable(model, [model.model.router, model.model.adapters], language_model=True)
    model.eval()  # no dropout: the two passes see the same function
    model.config.use_moco = False
    examples = pipeline.instruction_examples(ws.data["train"], ws.keys["train"], ["questions", "caption"])
    short, long = sorted(examples, key=ws.collator.length)[:3], sorted(examples, key=ws.collator.length)[-3:]
    names = list(model.state_dict())

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**ws.collator(batch)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = [loss_and_grads(batch) for batch in (short, long)]
    layers = model.model.language_model.layers
    with pipeline.compiled_decoder_layers(model):
        assert all(layer._compiled_call_impl is not None for layer in layers)
        compiled = [loss_and_grads(batch) for batch in (short, long)]
        assert list(model.state_dict()) == names
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again, as before the stage
    for (loss, grads), (compiled_loss, compiled_grads) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-4)
        assert compiled_grads.keys() == grads.keys() and any(".layers." in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
