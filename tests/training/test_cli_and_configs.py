"""The astrea-train command line and the accelerate configs shipped beside the recipes."""

import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from astrea_testing import REPO

ACCELERATE = sorted((REPO / "training" / "recipes" / "accelerate").glob("*.yaml"))


def astrea_train(*args, cwd=REPO):
    command = [str(Path(sys.executable).with_name("astrea-train")), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_phases():
    result = astrea_train("--help")
    assert result.returncode == 0
    for phase in ("prealign", "instruct", "all", "evaluate", "--resume"):
        assert phase in result.stdout


def test_bad_recipe_is_a_one_line_error_before_any_work(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ninstruct:\n  stepz: 3\n")
    result = astrea_train("all", "--recipe", str(recipe))
    assert result.returncode == 2
    assert "unknown key 'instruct.stepz'" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_unwritable_cache_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{num_train: 4, num_test: 2}}\n")
    result = astrea_train("prealign", "--recipe", str(recipe), "--cache-dir", str(blocker / "cache"))
    assert result.returncode == 2
    assert "not writable" in result.stderr


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.stem for p in ACCELERATE])
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 8
    assert config.distributed_type.value in {"MULTI_GPU", "DEEPSPEED", "FSDP"}


def test_the_shipped_set_covers_zero2_zero3_fsdp_and_multi_node():
    assert {p.stem for p in ACCELERATE} >= {"deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_gpu", "multi_node"}
