"""Two CPU processes through `accelerate launch` (gloo DDP): instruction tuning runs, the MoCo queue is gathered."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
