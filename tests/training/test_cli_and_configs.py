"""The astrea-train command line and the accelerate configs shipped beside the recipes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from astrea_testing import REPO

ACCELERATE = sorted((REPO / "training" / "recipes" / "accelerate").glob("*.yaml"))
TINY_RECIPE = REPO / "training" / "recipes" / "tiny.yaml"  # `make demo`'s


def astrea_train(*args, cwd=REPO):
    command = [str(Path(sys.executable).with_name("astrea-train")), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


DEMO_SCALED_DOWN = [  # `make demo`'s recipe with its data and step counts cut to seconds; everything else as shipped
    "data.num_train=16",
    "data.num_test=8",
    "data.num_unseen=4",
    "expert_pretraining.steps=2",
    "expert_pretraining.num_images=16",
    "expert_pretraining.batch_size=8",
    "prealign.stage_steps=[2,2,2,2]",  # two: the first step is all warm-up (learning rate 0)
    "prealign.batch_size=4",
    "instruct.steps=2",
    "instruct.batch_size=4",
    "eval.max_new_tokens=2",
]


def test_the_demo_recipe_runs_end_to_end_on_the_command_line(tmp_path):
    """`make demo`'s command on training/recipes/tiny.yaml itself, scaled down with --set: its model overrides,
    expert pre-training, pre-alignment with the LLM trained, instruction tuning and evaluation."""
    from astrea.training.pipeline import build_model
    from astrea.training.recipe import Recipe
    from modeling_astrea import AstreaForConditionalGeneration

    out = tmp_path / "demo"
    overrides = [arg for item in DEMO_SCALED_DOWN for arg in ("--set", item)]
    result = astrea_train(
        "all", "--recipe", str(TINY_RECIPE), "--output-dir", str(out), "--cache-dir",
        str(tmp_path / "cache"), *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| question type | accuracy | chance | n |" in result.stdout
    for kind in ("colour", "shape", "presence", "count", "position", "largest"):
        assert f"| {kind} |" in result.stdout, kind
    for kind in ("presence", "count"):  # asked of every image
        assert f"| {kind} (unseen renderer) |" in result.stdout, kind  # the split drawn in UNSEEN_STYLE
    for name in ("metrics.json", "router.png", "stages.png", "model/config.json", "model/processor_config.json"):
        assert (out / name).exists(), name
    stages = [stage["stage"] for stage in json.loads((out / "metrics.json").read_text())["stages"]]
    assert stages == ["1-caption", "2-classification", "3-detection", "4-segmentation", "instruct"]
    # it trained from the files it wrote: COCO for pre-alignment, LLaVA conversations for instruction tuning
    for name in ("coco_captions_train.json", "coco_instances_train.json", "llava_train.json", "llava_test.json"):
        assert (out / "data" / name).is_file(), name
    assert (out / "data" / "llava_unseen.json").is_file()
    assert len(list((out / "data" / "images").glob("*.png"))) == 16 + 8 + 4
    assert "data sources: {'prealign': 16, 'instruct':" in result.stderr

    recipe = Recipe.from_yaml(str(TINY_RECIPE), DEMO_SCALED_DOWN)
    initial, _ = build_model(recipe)  # the same seed: the weights the run started from
    trained = AstreaForConditionalGeneration.from_pretrained(out / "model")
    # the recipe's model overrides reached the saved model
    assert trained.config.image_grid_size == recipe.model.overrides["image_grid_size"]
    assert trained.config.text_config.hidden_size == recipe.model.text_overrides["hidden_size"]
    assert trained.config.text_config.head_dim == recipe.model.text_overrides["head_dim"]
    assert trained.config.caption_config.image_size == recipe.model.overrides["caption_config"]["image_size"]
    # expert pre-training ran: the experts are frozen in every later phase, so only it can have moved them
    start, end = initial.state_dict(), trained.state_dict()
    for name in ("caption", "classification", "detection", "segmentation"):
        keys = [k for k in start if k.startswith(f"model.experts.{name}.")]
        assert any(not torch.equal(start[k], end[k]) for k in keys), name
    # prealign.train_language_model: the LLM already moved in the first pre-alignment stage
    first = AstreaForConditionalGeneration.from_pretrained(out / "stages" / "1-caption" / "model").state_dict()
    llm = [k for k in start if k.startswith("model.language_model.layers.")]
    assert any(not torch.equal(start[k], first[k]) for k in llm)


def test_set_overrides_one_field_and_bad_ones_are_one_line_errors(tmp_path, capsys):
    from astrea.training import cli
    from astrea.training.recipe import Recipe

    recipe = Recipe.from_yaml(str(TINY_RECIPE), ["instruct.steps=7", "prealign.order=[caption]",
                              "prealign.stage_steps=[5]", "model.overrides.router_top_k=2"])  # fmt: skip
    shipped = Recipe.from_yaml(str(TINY_RECIPE))
    assert (recipe.instruct.steps, recipe.prealign.stage_steps) == (7, [5])
    assert recipe.model.overrides["router_top_k"] == 2
    assert recipe.model.overrides["image_grid_size"] == shipped.model.overrides["image_grid_size"]  # merged, kept
    assert recipe.instruct.learning_rate == shipped.instruct.learning_rate
    # YAML reads 1e-4 (no dot) as text: a number field takes it as the number it spells
    assert Recipe.from_yaml(TINY_RECIPE, ["instruct.learning_rate=1e-4"]).instruct.learning_rate == 1e-4
    for bad, message in [
        ("instruct.steps", "expected SECTION.KEY=VALUE"),
        ("instruct..steps=3", "expected SECTION.KEY=VALUE"),
        ("instruct.stepz=3", "unknown key 'instruct.stepz'"),
        ("prealign.stage_steps=[1, 2", "not valid YAML"),
        ("prealign.stage_steps=[1,2]", "prealign.stage_steps has 2 entries for 4 stages"),
        ("instruct.steps=abc", "instruct.steps must be an integer, got 'abc'"),
        ("prealign.stage_steps=[1,2,x,4]", "prealign.stage_steps[2] must be an integer, got 'x'"),
        ("instruct.lora=3", "instruct.lora must be true or false, got 3"),
    ]:
        code = cli.main(["all", "--recipe", str(TINY_RECIPE), "--output-dir", str(tmp_path / "run"),
                         "--set", bad])  # fmt: skip
        stderr = capsys.readouterr().err
        assert code == 2, bad
        assert message in stderr, (bad, stderr[-500:])
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()  # refused before any work


# The errors and the help run `astrea-train`'s main in this process (the console script itself runs above)


def test_help_lists_the_phases(capsys):
    from astrea.training import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for phase in ("prealign", "instruct", "all", "evaluate", "--resume", "--set"):
        assert phase in shown


def test_bad_recipe_is_a_one_line_error_before_any_work(tmp_path, capsys):
    from astrea.training import cli

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ninstruct:\n  stepz: 3\n")
    assert cli.main(["all", "--recipe", str(recipe)]) == 2
    assert "unknown key 'instruct.stepz'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    "instruct, message",
    [
        ({"focus_steps": 5}, "instruct.focus_steps needs instruct.focus_text"),
        ({"focus_steps": 5, "focus_text": "  "}, "instruct.focus_steps needs instruct.focus_text"),
        ({"refocus_steps": 5}, "instruct.refocus_steps returns to the mix after a focus"),
        ({"focus_steps": -1, "focus_text": "x"}, "instruct.focus_steps must be a whole number, 0 or more, not -1"),
        ({"focus_steps": 2, "focus_text": "x", "lora": True}, "does not combine with lora"),
    ],
)
def test_a_focus_stage_is_checked_in_the_recipe(tmp_path, capsys, instruct, message):
    from astrea.training import cli

    recipe = tmp_path / "focus.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "instruct": instruct}))
    assert cli.main(["all", "--recipe", str(recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("phase, workers", [("prealign", -1), ("instruct", 1.5)])
def test_dataloader_workers_are_checked_in_the_recipe(tmp_path, capsys, phase, workers):
    from astrea.training import cli

    recipe = tmp_path / "workers.yaml"
    settings = {"output_dir": str(tmp_path / "run"), phase: {"dataloader_num_workers": workers}}
    recipe.write_text(yaml.safe_dump(settings))
    assert cli.main(["all", "--recipe", str(recipe)]) == 2
    assert f"{phase}.dataloader_num_workers must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unwritable_cache_is_reported(tmp_path, capsys):
    from astrea.training import cli

    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{num_train: 4, num_test: 2}}\n")
    assert cli.main(["prealign", "--recipe", str(recipe), "--cache-dir", str(blocker / "cache")]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.stem for p in ACCELERATE])
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 8
    assert config.distributed_type.value in {"MULTI_GPU", "DEEPSPEED", "FSDP"}


def test_the_shipped_set_covers_zero2_zero3_fsdp_and_multi_node():
    assert {p.stem for p in ACCELERATE} >= {"deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_gpu", "multi_node"}


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "training" / "recipes").glob("*.yaml") if "pretrained" not in p.read_text())
)
def test_every_shipped_recipe_built_from_a_config_gives_a_valid_model(path):
    """Their model overrides combine into a valid config (router_mode: sample refuses router_prompt, for one)."""
    from astrea.training.pipeline import build_model
    from astrea.training.recipe import Recipe

    model, processor = build_model(Recipe.from_yaml(str(path)))
    assert processor.num_image_tokens == model.config.num_image_tokens
