"""A few steps of every phase on a micro recipe: what trains, what stays frozen, checkpoints, resume, errors."""

import json

import pytest
import torch
from transformers import TrainerCallback

from astrea.training import pipeline
from astrea.training.recipe import Recipe
from modeling_astrea import AstreaForConditionalGeneration


def micro_recipe(tmp_path, **sections) -> Recipe:
    data = {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "model": {"config": "examples/configs/tiny"},
        "data": {"num_train": 12, "num_test": 4},
        "prealign": {
            "stage_steps": [2, 2, 2, 2],
            "batch_size": 4,
            "save_steps": 1,
            "logging_steps": 1,
            "learning_rate": 1e-2,
        },
        "instruct": {"steps": 3, "batch_size": 4, "save_steps": 1, "logging_steps": 1, "learning_rate": 1e-2},
        "eval": {"batch_size": 8, "max_new_tokens": 2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Recipe.from_dict(data)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_each_prealign_stage_trains_only_its_projector_and_residual(tmp_path):
    ws = pipeline.prepare(micro_recipe(tmp_path))
    model = ws.model
    seen = []
    for stage in range(1, 5):
        recipe = ws.recipe
        recipe.prealign.stage_steps = [2] * stage + [0] * (4 - stage)
        before = snapshot(model)
        order = recipe.prealign.order[:stage]
        model.model.alignment = pipeline.AstreaAlignment(tuple(order), residual=True)
        current = order[-1]
        modules = [model.model.projectors[current]] + ([model.model.residual_attention[current]] if stage > 1 else [])
        pipeline.set_trainable(model, modules, language_model=False)
        examples = pipeline.prealign_examples(ws.data["train"], ws.keys["train"], order, 64)
        pipeline.run_stage(ws, f"{stage}-{current}", model, examples, recipe.prealign, 2, lambda: 0.0)
        moved = changed(before, model)
        allowed = {f"model.projectors.{current}.", f"model.residual_attention.{current}."}
        assert moved and all(n.startswith(tuple(allowed)) for n in moved), moved
        if stage > 1:
            assert any(n.startswith(f"model.residual_attention.{current}.") for n in moved)
        assert (ws.output_dir / "stages" / f"{stage}-{current}" / "stage.json").exists()
        seen.append(current)
    assert seen == ["caption", "classification", "detection", "segmentation"]


def test_instruct_trains_router_adapters_moco_and_llm_and_fills_the_queue(tmp_path):
    ws = pipeline.prepare(micro_recipe(tmp_path))
    before = snapshot(ws.model)
    pipeline.instruct(ws)
    moved = changed(before, ws.model)
    for prefix in ("model.router.", "model.adapters.", "moco.head.", "model.language_model.", "lm_head."):
        assert any(n.startswith(prefix) for n in moved), prefix
    assert not any(n.startswith(("model.experts.", "model.projectors.")) for n in moved)
    assert int(ws.model.moco.queue_len) == 3 * 4  # 3 steps x 4 keys


def test_instruct_with_lora_merges_into_a_plain_model(tmp_path):
    ws = pipeline.prepare(micro_recipe(tmp_path, instruct={"lora": True, "lora_rank": 4}))
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
    assert again["stage"] == "instruct" and type(ws.model) is AstreaForConditionalGeneration


def test_full_run_writes_model_metrics_and_plots(tmp_path):
    metrics = pipeline.run(micro_recipe(tmp_path))
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


class Interrupt(TrainerCallback):
    """Kills training (like Ctrl-C) at the start of a given step of a given stage."""

    def __init__(self, stage_dir_name: str, step: int):
        self.stage, self.step = stage_dir_name, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.stage) and state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_after_a_kill_gives_the_same_result(tmp_path):
    sections = {"prealign": {"stage_steps": [3, 3, 3, 3]}, "instruct": {"steps": 4}}
    reference = pipeline.run(micro_recipe(tmp_path / "a", **sections))
    recipe = micro_recipe(tmp_path / "b", **sections)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, callbacks=[Interrupt("2-classification", 2)])
    assert (tmp_path / "b" / "run" / "stages" / "1-caption" / "stage.json").exists()
    resumed = pipeline.run(recipe, resume=True)
    for kind, value in reference["accuracy"].items():
        assert resumed["accuracy"][kind] == pytest.approx(value, abs=1e-6), kind
    final_a = AstreaForConditionalGeneration.from_pretrained(tmp_path / "a" / "run" / "model").state_dict()
    final_b = AstreaForConditionalGeneration.from_pretrained(tmp_path / "b" / "run" / "model").state_dict()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


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
