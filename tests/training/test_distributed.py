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
#: the micro recipe the launches share: a few steps of every phase, gradient accumulation 4 as the shipped DeepSpeed
#: configs say (and the 13B/34B recipes), MoCo on
DISTRIBUTED_RECIPE = {
    "model": {"config": str(REPO / "examples" / "configs" / "tiny")},
    "data": {"num_train": 16, "num_test": 4},
    "prealign": {"stage_steps": [1, 1, 1, 2], "batch_size": 2, "gradient_accumulation_steps": 4,
                 "save_steps": 1000, "logging_steps": 1, "learning_rate": 1.0e-2},
    "instruct": {"steps": 3, "batch_size": 2, "gradient_accumulation_steps": 4, "save_steps": 1000,
                 "logging_steps": 1, "learning_rate": 1.0e-2},
    "eval": {"batch_size": 8, "max_new_tokens": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """`astrea-train all` on 2 CPU processes under `accelerate launch` with each shipped config (their process count
    and precision overridden for this machine); {name: (completed process, output folder)}."""
    import yaml

    root = tmp_path_factory.mktemp("distributed")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**DISTRIBUTED_RECIPE, "cache_dir": str(root / "cache")}))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, config in ACCELERATE_CONFIGS.items():
        command = [
            str(accelerate), "launch", "--config_file", str(REPO / "training" / "recipes" / "accelerate" / config),
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--main_process_port", str(free_port()),
            "-m", "astrea.training.cli", "all", "--recipe", str(recipe), "--output-dir", str(root / name),
        ]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        runs[name] = (result, root / name)
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_each_shipped_config_runs_the_whole_recipe(launches, name):
    from safetensors import safe_open

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


@pytest.mark.distributed
def test_ddp_zero2_and_zero3_end_with_the_same_weights(launches):
    """The same data on each process, the same accumulation: DeepSpeed's ZeRO-2 and ZeRO-3 must end where DDP does,
    up to the order of floating-point sums; MoCo's momentum head included (under ZeRO-3 its EMA update works on
    gathered weights: done on the slices, it would change nothing)."""
    from modeling_astrea import AstreaForConditionalGeneration

    finals = {}
    for name, (result, out) in launches.items():
        assert result.returncode == 0, result.stderr[-4000:]
        finals[name] = AstreaForConditionalGeneration.from_pretrained(out / "model").state_dict()
    reference = finals["ddp"]
    for name in ("zero2", "zero3"):
        for key, tensor in reference.items():
            torch.testing.assert_close(finals[name][key], tensor, atol=1e-4, rtol=1e-3, msg=f"{name}: {key}")
