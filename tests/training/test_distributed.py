"""Two CPU processes through `accelerate launch` (gloo): DDP instruction tuning gathers the MoCo queue; and
(`make test-distributed`) the whole recipe under the shipped DDP, DeepSpeed ZeRO-2 and ZeRO-3 configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from astrea_testing import REPO


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), so two test runs on one machine do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_instruct_gathers_the_moco_queue(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / "tests" / "training" / "ddp_instruct.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2
        # 2 steps x 2 keys per process x 2 processes: each rank's queue holds both ranks' keys
        assert rank["queue_len"] == 2 * 2 * 2


ACCELERATE_CONFIGS = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
#: the micro recipe the launches share: a few steps of every phase, MoCo on, and gradient accumulation that differs
#: between the phases (the DeepSpeed configs take it from the recipe). Each optimizer step's samples stay inside the
#: first epoch (16 pre-alignment rows, 8 per step; 48 of the instruction rows), so a single process with twice the
#: accumulation sees the same samples in each step as 2 processes do
DISTRIBUTED_RECIPE = {
    "model": {"config": str(REPO / "examples" / "configs" / "tiny")},
    "data": {"num_train": 16, "num_test": 4},
    "prealign": {"stage_steps": [1, 1, 1, 2], "batch_size": 2, "gradient_accumulation_steps": 2,
                 "save_steps": 1000, "logging_steps": 1, "learning_rate": 1.0e-2},
    "instruct": {"steps": 3, "batch_size": 2, "gradient_accumulation_steps": 4, "save_steps": 1000,
                 "logging_steps": 1, "learning_rate": 1.0e-2},
    "eval": {"batch_size": 8, "max_new_tokens": 2},
    # pre-trained by the first process and loaded by the other (and by a resumed run) from the output folder
    "expert_pretraining": {"steps": 1, "batch_size": 4, "num_images": 8},
}  # fmt: skip


def with_changes(recipe: dict, **sections) -> dict:
    return {**recipe, **{name: {**recipe.get(name, {}), **changes} for name, changes in sections.items()}}


#: for the single-process comparison: what is per process by design goes. MoCo's loss depends on each process's own
#: batch (its in-batch keys, and the queue's order, as in MoCo), and each process draws its own residual-attention
#: gates (Eq. 3) from the same seed, so neither can match one process; with MoCo off and every gate open
#: (residual_prob 1) the forward is deterministic and the global batch the same
SINGLE_PROCESS_RECIPE = with_changes(
    DISTRIBUTED_RECIPE, model={"overrides": {"residual_prob": 1.0}}, instruct={"use_moco": False}
)


def accelerate_launch(config: str, processes: int, *argv) -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate), "launch", "--config_file", str(REPO / "training" / "recipes" / "accelerate" / config),
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(free_port()), *argv,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """`astrea-train all` on 2 CPU processes under `accelerate launch` with each shipped config (their process count
    and precision overridden for this machine); under ZeRO-3 again, killed (SIGKILL, every process) right after
    instruction tuning's checkpoint 2 and resumed with --resume; and without MoCo, on 2 processes (DDP) and on one
    process with twice the accumulation. {name: (completed process, output folder)}."""
    import yaml

    root = tmp_path_factory.mktemp("distributed")
    recipes = {
        "shared": DISTRIBUTED_RECIPE,
        "checkpointed": with_changes(DISTRIBUTED_RECIPE, instruct={"save_steps": 1}),
        "no-moco": SINGLE_PROCESS_RECIPE,
        "single": with_changes(
            SINGLE_PROCESS_RECIPE,
            prealign={"gradient_accumulation_steps": 4},
            instruct={"gradient_accumulation_steps": 8},
        ),
    }
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**recipe, "cache_dir": str(root / "cache")}))

    def cli(recipe: str, out: str, *extra) -> list[str]:
        return ["all", "--recipe", str(root / f"{recipe}.yaml"), "--output-dir", str(root / out), *extra]

    module = ["-m", "astrea.training.cli"]
    zero3, killer = "deepspeed_zero3.yaml", str(REPO / "tests" / "training" / "killed_run.py")
    commands = {
        **{n: accelerate_launch(file, 2, *module, *cli("shared", n)) for n, file in ACCELERATE_CONFIGS.items()},
        "zero3-killed": accelerate_launch(zero3, 2, killer, "instruct", "2", *cli("checkpointed", "zero3-resumed")),
        "zero3-resumed": accelerate_launch(zero3, 2, *module, *cli("checkpointed", "zero3-resumed", "--resume")),
        "ddp-no-moco": accelerate_launch("multi_gpu.yaml", 2, *module, *cli("no-moco", "ddp-no-moco")),
        "single": [sys.executable, *module, *cli("single", "single")],
    }  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, command in commands.items():
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        runs[name] = (result, root / command[command.index("--output-dir") + 1])
        if name == "zero3-killed":  # what the kill left, before --resume changes it
            stage = root / "zero3-resumed" / "stages" / "instruct"
            runs["after the kill"] = {
                "finished": (stage / "stage.json").exists(),
                "checkpoints": sorted(
                    p.name for p in stage.glob("checkpoint-*") if (p / "trainer_state.json").exists()
                ),
            }
    return runs


def final_weights(launches, name) -> dict[str, torch.Tensor]:
    from modeling_astrea import AstreaForConditionalGeneration

    result, out = launches[name]
    assert result.returncode == 0, result.stderr[-4000:]
    return AstreaForConditionalGeneration.from_pretrained(out / "model").state_dict()


def assert_same_weights(weights: dict, reference: dict, what: str, atol=1e-4, rtol=1e-3) -> None:
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, atol=atol, rtol=rtol, msg=f"{what}: {key}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_each_shipped_config_runs_the_whole_recipe(launches, name):
    from safetensors import safe_open
    from safetensors.torch import load_file

    result, out = launches[name]
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == [
        "1-caption", "2-classification", "3-detection", "4-segmentation", "instruct",
    ]  # fmt: skip
    for folder in [out / "model", *sorted((out / "stages").glob("*/model"))]:
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as weights:  # whole tensors: no ZeRO-3 slices written as the model
                assert all(0 not in weights.get_slice(key).get_shape() for key in weights.keys()), folder
    # the experts the first process pre-trained are those of the final model, and what the other process loaded
    assert "tiny experts: process 1 loads those process 0 pre-trained" in result.stderr
    experts = load_file(out / "pretrained_experts.safetensors")
    final = final_weights(launches, name)
    assert experts and all(torch.equal(final[key], tensor) for key, tensor in experts.items())


@pytest.mark.distributed
def test_ddp_zero2_and_zero3_end_with_the_same_weights(launches):
    """The same data on each process, the same accumulation: DeepSpeed's ZeRO-2 and ZeRO-3 must end where DDP does,
    up to the order of floating-point sums; MoCo's momentum head included (under ZeRO-3 its EMA update works on
    gathered weights: done on the slices, it would change nothing)."""
    reference = final_weights(launches, "ddp")
    for name in ("zero2", "zero3"):
        assert_same_weights(final_weights(launches, name), reference, name)


@pytest.mark.distributed
def test_a_zero3_run_killed_mid_stage_resumes_to_the_same_weights(launches):
    """Every process SIGKILLed right after instruction tuning's checkpoint 2 (the pre-alignment stages finished), then
    `--resume` under ZeRO-3: the finished stages load, instruction tuning continues from its DeepSpeed checkpoint
    (sharded optimizer state included) and ends where the uninterrupted ZeRO-3 run does."""
    killed, out = launches["zero3-killed"]
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-4000:]
    assert launches["after the kill"] == {"finished": False, "checkpoints": ["checkpoint-1", "checkpoint-2"]}
    resumed, _ = launches["zero3-resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage 4-segmentation: finished in an earlier run, loading it" in resumed.stderr
    assert "tiny experts: loading those the interrupted run pre-trained" in resumed.stderr
    record = json.loads((out / "stages" / "instruct" / "stage.json").read_text())
    assert record["resumed_from"] == 2 and [step for step, _ in record["loss"]] == [3]
    assert_same_weights(final_weights(launches, "zero3-resumed"), final_weights(launches, "zero3"), "resumed")


@pytest.mark.distributed
def test_two_processes_end_where_one_process_with_the_same_global_batch_does(launches):
    """2 processes x batch 2 x accumulation k against 1 process x batch 2 x accumulation 2k, in every phase: the same
    samples in each optimizer step, the loss normalised by the tokens of the whole global batch in both. What is
    left is the order of floating-point sums (a gradient all-reduced across 2 processes against one accumulated in
    one), about 1e-7 relative per sum in float32, which Adam's division by the gradient's running size can magnify
    for the smallest gradients over the 8 optimizer steps. Measured here: 2.5e-7 at most; DDP against ZeRO-2/3,
    1.3e-6. The tolerance, 1e-5, is ten times that."""
    single = final_weights(launches, "single")
    assert_same_weights(final_weights(launches, "ddp-no-moco"), single, "single process", atol=1e-5, rtol=1e-4)
